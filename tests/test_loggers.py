"""Every logger a Lightning project uses gets the diagnostics' views: the real Weights & Biases (offline) and
MLflow (a SQLite store) packages, in a drop-in fit and through ``train.py --logger``; where the run's files land;
one clean line per warning; the HParams table's columns."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import read_events
from deepplain import cli, hparams_table
from deepplain.config import merge
from deepplain.registry import build_model
from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, DiagnosticWarning, GradientFlowMonitor
from deepplain.callbacks.outputs import mlflow_key, run_folder
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from tensorboard.plugins.hparams import backend_context
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torch import nn

from tests.foreign import ForeignMLP, loaders

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("saturation/depth_time/max_abs", "condition/depth_time/log10_kappa", "grad_flow/depth_time/norm",
          "grad_flow/profile")


def keep_trackers_at(home: Path, monkeypatch) -> None:
    """W&B and MLflow keep their settings and caches in ``home``, never go online, and take no setting of the
    developer's."""
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def trackers_at_home(tmp_path, monkeypatch):
    keep_trackers_at(tmp_path, monkeypatch)


def drop_in_fit(logger, root: Path, epochs: int = 2):
    torch.manual_seed(0)
    train, val = loaders("mlp")
    callbacks = [ActivationSaturationMonitor(every_n_steps=4, max_overhead=None),
                 ConditionNumberProbe(every_n_steps=4, max_overhead=None),
                 GradientFlowMonitor(every_n_steps=4, max_overhead=None), ModelCheckpoint()]
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", callbacks=callbacks, logger=logger,
                        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ForeignMLP(), train, val)
    return trainer


def assert_run_folder(trainer) -> Path:
    """The run's files are in the folder Lightning also chose for this logger's checkpoints."""
    folder = run_folder(trainer)
    assert folder == Path(trainer.checkpoint_callback.dirpath).parent
    assert (folder / "diagnostics.csv").stat().st_size > 1000 and (folder / "overview.png").is_file()
    for tag in IMAGES:
        assert (folder / "figures" / f"{tag}.png").is_file(), tag
    return folder


def test_wandb_offline_run_gets_scalars_images_and_the_run_files(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path / "wb"), project="dropin", offline=True)
    trainer = drop_in_fit(logger, tmp_path / "root")
    folder = assert_run_folder(trainer)
    assert folder == tmp_path / "wb" / "dropin" / logger.version
    files = Path(logger.experiment.dir)
    wandb.finish()
    media = {p.relative_to(files / "media" / "images").as_posix() for p in (files / "media" / "images").rglob("*.png")}
    for tag in IMAGES:  # log_image names each file <key>_<step>_<hash>.png, "/" in the key as folders
        assert any(name.startswith(f"{tag}_") for name in media), (tag, sorted(media)[:5])
    # the scalars are in the run's record (W&B 0.31 ships no reader of its offline format: the keys are looked up)
    record = next(files.parent.glob("*.wandb")).read_bytes()
    for key in ("overview/layers_vanished", "grad_flow/depth_max/norm", "saturation/depth_time/max_abs"):
        assert key.encode() in record, key
    for name in ("diagnostics.csv", "overview.png", "figures/grad_flow/profile.png"):
        assert (files / "deepplain" / name).read_bytes() == (folder / name).read_bytes(), name


def test_mlflow_sqlite_run_gets_scalars_images_and_the_run_files(tmp_path):
    logger = MLFlowLogger(experiment_name="dropin", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                          artifact_location=(tmp_path / "artifacts").as_uri())
    trainer = drop_in_fit(logger, tmp_path / "root")
    folder = assert_run_folder(trainer)
    assert folder == tmp_path / "root" / logger.experiment_id / logger.run_id  # no save_dir: default_root_dir
    client, run = logger.experiment, logger.run_id
    history = client.get_metric_history(run, "overview/layers_vanished")
    assert [m.step for m in history][0] == 0 and len(history) >= 3
    images = [a.path for a in client.list_artifacts(run, "images")]
    for tag in IMAGES:  # log_image(key=..., step=...): images/<key with ~ for />+step+<step>+...png
        assert any(p.startswith(f"images/{tag.replace('/', '~')}+step+") and p.endswith(".png") for p in images), tag
    local = Path(client.download_artifacts(run, "deepplain", str(tmp_path / "download")))
    for name in ("diagnostics.csv", "overview.png", "figures/grad_flow/profile.png"):
        assert (local / name).read_bytes() == (folder / name).read_bytes(), name
    assert mlflow_key("saturation#2/depth_time/max_abs") == "saturation-2/depth_time/max_abs"


class UnreachableTracker(WandbLogger):
    """A tracker whose image calls fail (a server gone), as a project's own logger subclass might."""

    def log_image(self, *args, **kwargs):
        raise ConnectionError("tracker unreachable")


def test_a_tracker_that_fails_is_named_once_and_the_fit_goes_on(tmp_path):
    logger = UnreachableTracker(save_dir=str(tmp_path / "wb"), project="failing", offline=True)
    with pytest.warns(DiagnosticWarning) as caught:
        torch.manual_seed(0)
        train, _ = loaders("mlp")
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=logger, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[GradientFlowMonitor(every_n_steps=2)],
                            default_root_dir=str(tmp_path / "root"))
        trainer.fit(ForeignMLP(), train)
    wandb.finish()
    said = [str(w.message) for w in caught if "could not take" in str(w.message)]
    assert len(said) == 1 and "Weights & Biases" in said[0] and "tracker unreachable" in said[0]
    assert trainer.global_step == 16 and (run_folder(trainer) / "figures" / "grad_flow" / "profile.png").is_file()


@pytest.mark.fast
def test_run_folder_without_a_logger_is_the_default_root_dir(tmp_path, monkeypatch):
    trainer = L.Trainer(logger=False, default_root_dir=str(tmp_path / "here"))
    assert run_folder(trainer) == tmp_path / "here"
    trainer = L.Trainer(logger=[CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb")])
    assert run_folder(trainer) == Path(trainer.loggers[0].log_dir)
    # MLflow's file store (deprecated, still used): the run's own folder inside the store, not the store's root
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = MLFlowLogger(experiment_name="files", save_dir=str(tmp_path / "mlruns"))
    trainer = L.Trainer(logger=store)
    assert run_folder(trainer) == tmp_path / "mlruns" / store.experiment_id / store.run_id


# -- train.py --logger -----------------------------------------------------------------------------------
TINY = ["--model", "plain", "--depth", "3", "--width", "16", "--dataset", "usps", "--limit-train-batches", "6",
        "--limit-val-batches", "2", "--batch-size", "32", "--no-progress"]


def train_py(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One train.py run with every --logger, then its --resume for one more epoch."""
    home = tmp_path_factory.mktemp("logged")
    with pytest.MonkeyPatch.context() as env:
        keep_trackers_at(home, env)
        first = train_py("--epochs", "1", "--logger", "wandb,mlflow,csv", "--logdir", str(home / "runs"), cwd=home)
        run = home / "runs" / "plain-mlp-3-usps" / "version_0"
        again = train_py("--resume", str(run / "checkpoints" / "last.ckpt"), "--epochs", "2", cwd=home)
    return home, run, first, again


def test_train_py_writes_tensorboard_and_each_named_logger(logged_run):
    home, run, first, again = logged_run
    assert first.returncode == 0, first.stderr[-2000:]
    assert again.returncode == 0, again.stderr[-2000:]
    # TensorBoard, as always, and the run folder's files
    tags = read_events(run).Tags()
    assert "saturation/depth_time/max_abs" in tags["images"] and "overview/layers_vanished" in tags["scalars"]
    assert {"summary.json", "config.json", "diagnostics.csv", "overview.png"} <= {p.name for p in run.iterdir()}
    # CSV
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "overview/layers_vanished" in header and "val/acc" in header
    # W&B, offline: one run for the run folder, continued by --resume
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({p.name.rsplit("-", 1)[1] for p in offline}) == 1
    files = offline[0] / "files"
    assert any((files / "media" / "images" / "saturation" / "depth_time").glob("max_abs_*.png"))
    assert (files / "deepplain" / "diagnostics.csv").is_file() and (files / "deepplain" / "overview.png").is_file()
    record = next(offline[0].glob("*.wandb")).read_bytes()  # the W&B config (no offline reader: looked up)
    assert b"dataset" in record and b'"usps"' in record and b"val/acc" in record
    # MLflow: one SQLite store per logdir, the run's identity as params, continued by --resume
    client = mlflow.MlflowClient(f"sqlite:///{home / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("deepplain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    logged = runs[0]
    assert logged.data.tags.get("resumed/epochs") == "2" and logged.data.params["epochs"] == "1"
    assert logged.info.run_name == "plain-mlp-3-usps/version_0"
    assert {"depth": "3", "dataset": "usps", "model": "plain"}.items() <= logged.data.params.items()
    steps = [m.step for m in client.get_metric_history(logged.info.run_id, "val/acc")]
    assert len(steps) == 2  # one value per epoch, the resumed epoch included
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id, "deepplain")}
    assert {"deepplain/diagnostics.csv", "deepplain/overview.png", "deepplain/figures"} <= artifacts
    assert Path(experiment.artifact_location.removeprefix("file://")) == home / "runs" / "mlartifacts"


def test_train_py_prints_warnings_as_one_line_without_our_source(logged_run):
    _, _, first, _ = logged_run
    for line in (first.stdout + first.stderr).splitlines():
        assert not ("Warning:" in line and ".py:" in line), line  # Python's default: file:line: Category: message
        assert "warn(" not in line and "rank_zero_warn" not in line, line


def test_hparams_table_puts_the_identifying_options_first(logged_run):
    _, run, _, _ = logged_run
    events = read_events(run)
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    assert [h.name for h in experiment.hparam_infos] == list(hparams_table.KEYS)  # every family's: one column set
    backend_context._sort_and_reduce_to_hparams_limit(experiment, 1000)  # what TensorBoard's backend does with it
    shown = [h.name for h in experiment.hparam_infos][:5]  # and its frontend ticks the first five
    assert shown == ["activation", "dataset", "depth", "lr", "model"]
    assert [h.name for h in experiment.hparam_infos][5:7] == ["norm", "width"]
    assert [m.name.tag for m in experiment.metric_infos] == [f"hparam/{k}" for k in hparams_table.METRICS]
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["depth"].number_value == 3 and start.hparams["dataset"].string_value == "usps"
    assert start.hparams["activation"].string_value == "relu"  # left unset: the value the run trains with


@pytest.mark.fast
def test_run_identity_names_what_the_run_trains_with():
    identity = hparams_table.run_identity(merge({"model": "plain", "dataset": "usps", "depth": 3}))
    model = build_model("plain", 3, arch="mlp", input_shape=(1, 16, 16), num_classes=10)
    assert identity["activation"] == "relu" and any(isinstance(m, nn.ReLU) for m in model.modules())
    assert identity["norm"] == "bn" and any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert identity["width"] == 300 and max(m.out_features for m in model.modules() if isinstance(m, nn.Linear)) == 300
    van = hparams_table.run_identity(merge({"model": "van", "dataset": "usps"}))
    assert "activation" not in van and van["alpha_mode"] == "lagrangian"  # an option of another family is no column


@pytest.mark.fast
def test_a_logger_whose_package_is_missing_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an install without the extra has: import fails
    code = cli.main([*TINY, "--epochs", "1", "--logger", "csv,wandb", "--logdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == ('error: --logger wandb needs the wandb package: pip install "deepplain[wandb]" (from a clone: '
                   'pip install -e ".[wandb]")')
    assert not (tmp_path / "runs").exists()  # before anything was written


@pytest.mark.fast
def test_a_tracker_that_cannot_start_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    code = cli.main([*TINY, "--epochs", "1", "--logger", "mlflow", "--logdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: --logger mlflow could not start its "
                                                                       "run: "), err


@pytest.mark.fast
@pytest.mark.parametrize("spec, message", [
    ("tensorbord", "unknown logger tensorbord; valid: a comma list of wandb, mlflow, csv (tensorboard is always "
                   "written)"),
    ("csv,,wandb", "--logger 'csv,,wandb' has an empty name"),
    ("csv,csv", "--logger names csv twice"),
])
def test_bad_logger_names_are_one_line(tmp_path, capsys, spec, message):
    code = cli.main([*TINY, "--logger", spec, "--logdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_core_install_never_imports_the_trackers():
    code = ("import sys, deepplain.callbacks, deepplain.cli, deepplain.training; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow', 'comet_ml')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-1000:]


DROP_IN = """
import sys, warnings
import lightning as L, torch
from deepplain.callbacks import ActivationSaturationMonitor, DiagnosticWarning
from tests.foreign import ForeignMLP, loaders
if sys.argv[1:] == ["strict"]:
    warnings.filterwarnings("error", category=DiagnosticWarning)
torch.manual_seed(0)
L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False, callbacks=[ActivationSaturationMonitor()]).fit(ForeignMLP(), loaders()[0])
"""


def test_a_diagnostic_warning_is_one_clean_line_in_a_drop_in_fit_and_still_a_warning(tmp_path):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(DROP_IN)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stderr.splitlines()
    ours = [line for line in lines if "ActivationSaturationMonitor: activations vanished" in line]
    assert len(ours) == 1 and ours[0].startswith("warning: ActivationSaturationMonitor: activations vanished"), ours
    assert not any("saturation.py" in line or "warn(" in line for line in lines), out.stderr[-2000:]
    # a project's warning filters still reach it: as an error, the same fit stops at that warning
    strict = subprocess.run([sys.executable, "-c", textwrap.dedent(DROP_IN), "strict"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert strict.returncode != 0 and "DiagnosticWarning" in strict.stderr
