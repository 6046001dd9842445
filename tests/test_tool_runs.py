"""Reliability of the experiment tools on real runs: a sweep row is what was measured, nothing written is lost,
the sweep is a good parent to its trainings, and runs fail before training rather than after."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from deepplain.callbacks import MaxNormConstraint
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from deepplain import experiments
from deepplain.checkpoints import RunCheckpoint
from deepplain.cli import main as train_main
from deepplain.errors import ConfigError
from deepplain.family_modules import PlainNetModule, VANModule
from deepplain.inputs import FolderLock
from deepplain.sweep import main as sweep_main
from deepplain.sweep import read_csv
from tests.foreign import ForeignMLP, loaders

REPO = Path(__file__).resolve().parents[1]
TINY = ["--limit-train-batches", "2", "--limit-val-batches", "1", "--diagnostics", "none", "--width", "16"]
GRID = ["--dataset", "usps", "--models", "plain", "--depths", "1", "--seeds", "0", "--epochs", "1"]
FAKE = ["--model", "plain", "--depth", "2", "--width", "16", "--dataset", "fake", "--arch", "mlp", "--no-progress",
        "--diagnostics", "none"]


@pytest.mark.slow
def test_a_sweep_row_is_what_was_measured(tmp_path, capsys):
    out = tmp_path / "s"
    assert sweep_main(["--out", str(out), *GRID, "--", *TINY]) == 0
    first = read_csv(out / "results.csv")[0]
    assert json.loads((out / "runs" / "plain-d1-s0" / "run.json").read_text())["flags"][-len(TINY):] == TINY
    capsys.readouterr()
    # the same grid with other settings: refused before anything trains, the earlier results untouched
    assert sweep_main(["--out", str(out), *GRID, "--", *TINY, "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "was trained with other settings" in err and "--lr" in err and "0.5" in err
    assert read_csv(out / "results.csv") == [first] and not (out / "runs" / "plain-d1-s0" / "version_1").exists()
    # the same settings: skipped, the row unchanged
    assert sweep_main(["--out", str(out), *GRID, "--", *TINY]) == 0
    assert "skipped (done)" in capsys.readouterr().out and read_csv(out / "results.csv") == [first]
    # the same settings as a new variant: trained, and its row records its flags
    assert sweep_main(["--out", str(out), *GRID, "--variant", "fast=--lr 0.5", "--", *TINY]) == 0
    rows = {r["run_id"]: r for r in read_csv(out / "results.csv")}
    assert rows["plain-d1-s0-fast"]["flags"].startswith("--lr 0.5") and rows["plain-d1-s0"] == first


def start_until_checkpoint(argv: list[str], cwd, ckpt, env: dict) -> subprocess.Popen:
    """Start a tool and return it, still running, once a training has written ``ckpt``."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert ckpt.exists(), proc.communicate()[1][-2000:]
    return proc


def usps_sweep_argv(out: Path) -> list[str]:
    """A one-run sweep of 4 epochs x 40 steps: long enough to be stopped inside."""
    return [sys.executable, "-m", "deepplain.sweep", "--out", str(out), "--dataset", "usps", "--models", "plain",
            "--depths", "1", "--seeds", "0", "--epochs", "4", "--", "--limit-train-batches", "40", "--diagnostics",
            "none", "--width", "16", "--val-split", "0"]


def sigterm_after_first_checkpoint(argv: list[str], cwd, ckpt, env: dict) -> None:
    """Start a tool, send it SIGTERM once a training has written ``ckpt``; it must exit 143 with one message."""
    proc = start_until_checkpoint(argv, cwd, ckpt, env)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "preempted: the running trainings saved their step" in err


@pytest.mark.slow
def test_sigterm_to_an_experiment_stops_its_trainings_and_leaves_none_running(tmp_path):
    out = tmp_path / "t2"
    argv = [sys.executable, "-m", "deepplain.experiments", "ablation", "--depth", "2", "--epochs", "4", "--out",
            str(out), "--", "--limit-train-batches", "40", "--width", "16"]
    ckpt = out / "runs" / "plain-d2-s0-bn" / "version_0" / "checkpoints" / "last.ckpt"
    sigterm_after_first_checkpoint(argv, tmp_path, ckpt, {**os.environ, "PYTHONWARNINGS": "ignore"})
    summary = json.loads((out / "runs" / "plain-d2-s0-bn" / "version_0" / "summary.json").read_text())
    assert summary["status"] == "preempted"
    leftover = subprocess.run(["pgrep", "-f", str(out / "runs")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # no training left running as an orphan


@pytest.mark.slow
def test_sigterm_to_a_sweep_stops_its_training_which_the_next_sweep_resumes(tmp_path):
    out = tmp_path / "s"
    argv = usps_sweep_argv(out)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ckpt = out / "runs" / "plain-d1-s0" / "version_0" / "checkpoints" / "last.ckpt"
    sigterm_after_first_checkpoint(argv, tmp_path, ckpt, env)
    row, = read_csv(out / "results.csv")
    assert row["status"] == "preempted"
    summary = json.loads((out / "runs" / "plain-d1-s0" / "version_0" / "summary.json").read_text())
    assert summary["status"] == "preempted" and 40 <= summary["global_step"] < 160  # stopped inside the run
    leftover = subprocess.run(["pgrep", "-f", str(out / "runs")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # no training left running as an orphan
    # the same command continues the run from its last.ckpt, in the same folder
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "--resume" in (out / "runs" / "plain-d1-s0" / "train.log").read_text().splitlines()[-1] or any(
        line.startswith("$ ") and "--resume" in line
        for line in (out / "runs" / "plain-d1-s0" / "train.log").read_text().splitlines())
    assert not (out / "runs" / "plain-d1-s0" / "version_1").exists()
    row, = read_csv(out / "results.csv")
    assert row["status"] == "completed" and row["global_step"] == "160"


@pytest.mark.slow
def test_a_training_killed_before_its_summary_is_resumed_by_the_next_sweep(tmp_path):
    """SIGKILL (the OOM killer, a reboot) leaves a last.ckpt and no summary.json: that run resumes, not restarts."""
    out = tmp_path / "k"
    argv = usps_sweep_argv(out)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run_root = out / "runs" / "plain-d1-s0"
    ckpt = run_root / "version_0" / "checkpoints" / "last.ckpt"
    sweep = start_until_checkpoint(argv, tmp_path, ckpt, env)
    training = subprocess.run(["pgrep", "-f", str(out / "runs")], capture_output=True, text=True).stdout.split()
    assert len(training) == 1
    os.kill(int(training[0]), signal.SIGKILL)
    sweep.communicate(timeout=240)
    assert not (run_root / "version_0" / "summary.json").exists()
    row, = read_csv(out / "results.csv")
    assert row["status"].startswith("failed (killed by SIGKILL; the same command resumes it")
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]

    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    commands = [line for line in (run_root / "train.log").read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" not in commands[0]
    assert commands[1].split()[4:6] == ["--resume", str(ckpt)]
    assert not (run_root / "version_1").exists()
    summary = json.loads((run_root / "version_0" / "summary.json").read_text())
    assert summary["status"] == "completed" and 40 <= killed_at < 160
    row, = read_csv(out / "results.csv")
    assert row["status"] == "completed" and row["global_step"] == "160"


def fake_run(tmp_path, *flags, epochs=2) -> Path:
    assert train_main([*FAKE, "--epochs", str(epochs), "--logdir", str(tmp_path / "runs"), *flags]) == 0
    return next((tmp_path / "runs").glob("*/version_0"))


def test_resume_takes_only_last_ckpt_and_one_process_at_a_time(tmp_path, capsys):
    run = fake_run(tmp_path, epochs=1)
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert train_main(["--resume", str(best), "--epochs", "2"]) == 2
    assert "continues a run in place from the file named last.ckpt in its checkpoints folder" in capsys.readouterr().err
    with FolderLock(run, "--resume: the run folder"):  # another process is resuming this run
        assert train_main(["--resume", str(run / "checkpoints" / "last.ckpt"), "--epochs", "2", "--no-progress"]) == 2
    assert "is in use by another process" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_a_moved_run_folder_keeps_its_best_checkpoint(tmp_path):
    run = fake_run(tmp_path, "--lr", "0.05", epochs=2)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    key = next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint") and "val/acc" in k)
    best_score = float(ckpt["callbacks"][key]["best_model_score"])
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    # one more epoch with a learning rate that cannot improve on the best
    assert train_main(["--resume", str(moved / "checkpoints" / "last.ckpt"), "--epochs", "3", "--no-progress"]) == 0
    summary = json.loads((moved / "summary.json").read_text())
    after = torch.load(moved / "checkpoints" / "last.ckpt", weights_only=False)["callbacks"][key]
    assert float(after["best_model_score"]) >= best_score  # the score survived the move
    assert summary["best_checkpoint"].startswith(str(moved))


def test_family_modules_predict_and_refuse_another_familys_checkpoint(tmp_path):
    van = VANModule(model="van", depth=2, arch="mlp", input_shape=(1, 8, 8), num_classes=3,
                    model_options={"width": 8})
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    loader = DataLoader(TensorDataset(torch.randn(6, 1, 8, 8), torch.zeros(6, dtype=torch.long)), batch_size=4)
    out = trainer.predict(van, loader)
    assert [o.shape for o in out] == [(4, 3), (2, 3)]
    trainer.strategy.connect(van)
    trainer.save_checkpoint(tmp_path / "van.ckpt")
    refused = (r"PlainNetModule is the plain family's module, but this checkpoint or argument is a van model; "
               r"use deepplain.family_modules.module_class\('van'\)")
    with pytest.raises(ConfigError, match=refused):
        PlainNetModule.load_from_checkpoint(tmp_path / "van.ckpt")
    assert isinstance(VANModule.load_from_checkpoint(tmp_path / "van.ckpt"), VANModule)


def test_max_norm_leaves_frozen_layers_alone(tmp_path):
    module = ForeignMLP(lr=5.0)
    frozen = module.body[2]
    with torch.no_grad():
        frozen.weight.mul_(100)
    frozen.weight.requires_grad_(False)
    before = frozen.weight.clone()
    L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[MaxNormConstraint(0.5)]).fit(module, loaders()[0])
    assert torch.equal(frozen.weight, before)
    assert (module.body[0].weight.norm(dim=1) <= 0.5 + 1e-5).all()


def test_a_last_batch_of_one_sample_is_left_out_and_said(tmp_path, caplog):
    """fake has 1,800 training samples: batch 1799 leaves one, which batch norm cannot take."""
    data_log = logging.getLogger("deepplain.data")  # the CLI's "deepplain" logger does not propagate
    data_log.addHandler(caplog.handler)
    try:
        run = fake_run(tmp_path, "--batch-size", "1799", epochs=1)
    finally:
        data_log.removeHandler(caplog.handler)
    assert any("leave a last batch of 1 sample, which batch norm cannot normalise" in r.getMessage()
               for r in caplog.records)
    assert json.loads((run / "summary.json").read_text())["global_step"] == 1


@pytest.fixture
def image_folder(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / "imf" / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype("uint8")).save(
                    folder / f"{i}.png")
    return tmp_path / "imf"


@pytest.mark.parametrize("fault,message", [("empty class", "class folder .*/train/b has no images"),
                                           ("corrupt image", r"train/a/1.png is not a readable image")])
def test_image_folder_data_faults_are_bad_input_and_leave_nothing(fault, message, image_folder, tmp_path, capsys):
    if fault == "empty class":
        shutil.rmtree(image_folder / "train" / "b")
        (image_folder / "train" / "b").mkdir()
    else:
        (image_folder / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    code = train_main(["--model", "plain", "--depth", "5", "--dataset", "imagefolder", "--data-dir", str(image_folder),
                       "--image-size", "8", "--epochs", "1", "--no-progress", "--num-workers", "0", "--diagnostics",
                       "none", "--logdir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not list((tmp_path / "runs").rglob("version_*")) if (tmp_path / "runs").exists() else True


@pytest.mark.slow
def test_the_experiments_analysis_reads_the_data_as_the_run_did(tmp_path, monkeypatch):
    """A run trained with --data-dir (and no $DEEPPLAIN_DATA) is analysed on that data, not on the defaults."""
    data = tmp_path / "data"
    shutil.copytree(Path(os.environ["DEEPPLAIN_DATA"]) / "usps", data / "usps")
    monkeypatch.setenv("DEEPPLAIN_DATA", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    assert train_main(["--model", "plain", "--depth", "2", "--width", "16", "--dataset", "usps", "--epochs", "1",
                       "--data-dir", str(data), "--limit-train-batches", "2", "--limit-val-batches", "1",
                       "--no-progress", "--diagnostics", "none", "--logdir", str(tmp_path / "runs")]) == 0
    run = next((tmp_path / "runs").glob("*/version_0"))
    result = experiments.analyse(run / "checkpoints" / "last.ckpt", max_samples=64)
    assert result["samples"] == 64 and len(result["stats"]) == 2


@pytest.mark.fast
def test_run_checkpoint_relocates_a_moved_folders_record(tmp_path):
    """Lightning's ModelCheckpoint drops the best score when the folder moved; RunCheckpoint keeps it."""

    old, new = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints"
    state = {"dirpath": str(old), "monitor": "val/acc", "best_model_score": torch.tensor(0.9),
             "best_model_path": str(old / "best-epoch001.ckpt"), "kth_best_model_path": str(old / "best-epoch001.ckpt"),
             "kth_value": torch.tensor(0.9), "last_model_path": str(old / "last.ckpt"),
             "best_k_models": {str(old / "best-epoch001.ckpt"): torch.tensor(0.9)}}
    plain = ModelCheckpoint(dirpath=new, monitor="val/acc", mode="max")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        plain.load_state_dict(dict(state))
    assert plain.best_model_score is None  # what a moved run lost before
    ours = RunCheckpoint(dirpath=new, monitor="val/acc", mode="max")
    ours.load_state_dict(dict(state))
    assert float(ours.best_model_score) == pytest.approx(0.9)
    assert ours.best_model_path == str(new / "best-epoch001.ckpt")
    assert list(ours.best_k_models) == [str(new / "best-epoch001.ckpt")]
    assert ours.state_key == plain.state_key  # earlier checkpoints' state still restores
