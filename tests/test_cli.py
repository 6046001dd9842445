"""train.py: a real run's outputs, presets and defaults, every family, and one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deepplain.cli import build_parser, main
from deepplain.config import merge
from deepplain.errors import ConfigError
from deepplain.datamodules import get_datamodule
from deepplain.family_modules import PlainNetModule, VANModule

REPO = Path(__file__).resolve().parents[1]
SUMMARY_FIELDS = {"model", "depth", "dataset", "parameters", "epochs_done", "train_loss", "train_acc", "val_loss",
                  "val_acc", "test_loss", "test_acc", "wall_seconds", "samples_per_second", "status"}


def only_run(runs: Path) -> Path:
    found = sorted(runs.glob("*/version_*"))
    assert len(found) == 1, found
    return found[0]


def test_usps_plain_run_writes_events_checkpoints_and_summary(runs):
    assert main(["--model", "plain", "--depth", "10", "--dataset", "usps", "--epochs", "1", "--logdir", str(runs),
                 "--no-progress"]) == 0
    run = only_run(runs)
    assert run.parent.name == "plain-mlp-10-usps"
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["status"] == "completed" and summary["epochs_done"] == 1 and summary["dataset"] == "usps"
    assert summary["parameters"] > 800_000 and summary["samples_per_second"] > 0
    for key in ("train_loss", "val_loss", "test_loss"):
        assert 0 < summary[key] < 5
    for key in ("train_acc", "val_acc", "test_acc"):
        assert 0.3 < summary[key] <= 1
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((run / "checkpoints").glob("best-*.ckpt"))) == 1
    acc = EventAccumulator(str(run)).Reload()
    assert {"train/loss_epoch", "val/acc", "test/acc"} <= set(acc.Tags()["scalars"])
    # a second run never reuses the first one's folder
    assert main(["--model", "plain", "--depth", "3", "--dataset", "usps", "--fast-dev-run", "--logdir", str(runs),
                 "--name", "plain-mlp-10-usps", "--no-progress", "--diagnostics", "none"]) == 0
    assert (runs / "plain-mlp-10-usps" / "version_1" / "summary.json").is_file()
    assert json.loads((run / "summary.json").read_text()) == summary


def test_logged_metrics_equal_the_model_on_its_data(runs):
    """The epoch metrics are computed once per epoch from the metric states: the final val/test loss and accuracy
    equal the saved model's on those splits; the logger gets the step loss at its logging steps (no progress bar
    here: the module logs it only then) and every epoch's train/val values once."""
    assert main(["--model", "plain", "--depth", "2", "--width", "16", "--dataset", "usps", "--epochs", "2",
                 "--batch-size", "256", "--logdir", str(runs), "--no-progress", "--diagnostics", "none"]) == 0
    run = only_run(runs)
    summary = json.loads((run / "summary.json").read_text())
    module = PlainNetModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    dm = get_datamodule("usps", batch_size=256, val_split=0.1, seed=0)
    dm.setup()
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        logits, labels = zip(*((module(x), y) for x, y in loader))
        logits, labels = torch.cat(logits), torch.cat(labels)
        with torch.no_grad():
            assert summary[f"{split}_loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
        assert summary[f"{split}_acc"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()), abs=1e-6)
    acc = EventAccumulator(str(run)).Reload()
    steps_per_epoch = 26  # 6,562 training images / 256
    every = 26  # log_every_n_steps: min(50, batches per epoch)
    assert [e.step for e in acc.Scalars("train/loss_step")] == [every - 1, 2 * every - 1]
    for tag in ("train/loss_epoch", "train/acc", "val/loss", "val/acc"):
        assert [e.step for e in acc.Scalars(tag)] == [steps_per_epoch - 1, 2 * steps_per_epoch - 1], tag


def test_checkpoint_rebuilds_model_without_arguments(runs):
    main(["--model", "van", "--depth", "3", "--dataset", "usps", "--epochs", "1", "--limit-train-batches", "3",
          "--logdir", str(runs), "--no-progress", "--diagnostics", "none"])
    module = VANModule.load_from_checkpoint(only_run(runs) / "checkpoints" / "last.ckpt")
    assert module.hparams.model == "van" and len(module.model.skip_gates()) == 3


@pytest.mark.parametrize("model,depth", [("plain", 4), ("van", 3), ("dirac", 3), ("resnet", 3), ("highway", 3)])
def test_fast_dev_run_every_family_on_usps(model, depth, runs):
    assert main(["--model", model, "--depth", str(depth), "--dataset", "usps", "--fast-dev-run", "--logdir",
                 str(runs), "--no-progress"]) == 0
    assert json.loads((only_run(runs) / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("model,depth,extra", [("plain", 8, []), ("van", 10, []), ("dirac", 10, []),
                                               ("resnet", 8, []), ("plain", 50, ["--layout", "oyedotun-50"]),
                                               ("resnext", 11, ["--width", "1", "--cardinality", "2",
                                                                "--bottleneck-width", "2"]),
                                               ("plain", 11, ["--layout", "resnet"]),
                                               ("plain", 8, ["--layout", "coursework", "--norm", "none"]),
                                               ("resnet", 14, ["--layout", "coursework", "--norm", "none"])])
def test_fast_dev_run_conv_forms_on_cifar10(model, depth, extra, runs, tiny_cifar):
    assert main(["--model", model, "--depth", str(depth), "--dataset", "cifar10", "--data-dir", str(tiny_cifar),
                 "--skip-checksums", "--fast-dev-run", "--batch-size", "8", "--logdir", str(runs), "--no-progress",
                 *extra]) == 0


@pytest.mark.fast
def test_default_recipe_is_van26_on_cifar10():
    config = merge({"model": "van", "depth": 26})
    assert (config.dataset, config.arch, config.optimizer, config.lr, config.momentum) == (
        "cifar10", "conv", "sgd", 0.1, 0.9)
    assert (config.epochs, config.milestones, config.batch_size, config.schedule) == (
        165, [82, 125], 128, "multistep")
    assert merge({"model": "plain", "dataset": "usps"}).arch == "mlp"
    highway = merge({"model": "highway"})  # no conv form: its MLP form, on CIFAR-10 too
    assert (highway.arch, highway.dataset, highway.depth) == ("mlp", "cifar10", 10)


@pytest.mark.fast
def test_preset_loads_and_flags_override():
    config = merge({"preset": "oyedotun-mlp-100", "depth": 20})
    assert config.depth == 20 and config.width == 300 and config.activation == "lrelu"
    assert config.max_norm == 3.0 and config.norm == "bn" and config.init == "he-uniform"
    assert merge({"preset": "van-26-cifar10"}).lambda_lr_ratio == 0.1
    assert merge({"preset": "dirac-28-10-cifar10"}).width == 10


@pytest.mark.fast
def test_help_lists_presets(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("oyedotun-mlp-100", "oyedotun-conv-50", "van-26-cifar10", "van-mlp-mnist", "dirac-28-10-cifar10"):
        assert name in out


@pytest.mark.fast
def test_print_config_round_trips_through_config(tmp_path, capsys):
    """--print-config writes the merged configuration; --config replays it, and flags win over it."""
    assert main(["--preset", "oyedotun-mlp-100", "--depth", "7", "--epochs", "2", "--print-config"]) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["depth"] == 7 and config["width"] == 300 and config["max_norm"] == 3.0 and config["epochs"] == 2
    path = tmp_path / "run.yaml"
    path.write_text(printed)
    assert main(["--config", str(path), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config
    assert main(["--config", str(path), "--depth", "9", "--no-progress", "--print-config"]) == 0
    replayed = yaml.safe_load(capsys.readouterr().out)
    assert replayed["depth"] == 9 and replayed["progress"] is False and replayed["width"] == 300


def test_config_file_runs_a_training(tmp_path, runs):
    path = tmp_path / "tiny.yaml"
    path.write_text("model: plain\ndepth: 3\nwidth: 16\ndataset: usps\nepochs: 1\nlimit_train_batches: 2\n"
                    "limit-val-batches: 1\ndiagnostics: none\nmilestones: [0.5]\nprogress: false\n")
    assert main(["--config", str(path), "--logdir", str(runs)]) == 0
    summary = json.loads((only_run(runs) / "summary.json").read_text())
    assert summary["config"]["width"] == 16 and summary["global_step"] == 2 and summary["status"] == "completed"


def test_missing_dataset_names_paths_in_a_real_process(tmp_path):
    env = {"DEEPPLAIN_DATA": str(tmp_path / "nothing"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--model", "plain", "--dataset", "mnist",
                           "--logdir", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: MNIST not found: searched") and str(tmp_path / "nothing") in lines[0]
    assert "MNIST/raw/train-images-idx3-ubyte.gz" in lines[0] and "Traceback" not in proc.stderr


def test_a_warning_reaches_the_user_as_one_clean_line():
    """train.py's warnings (a diagnostic's finding among them) show the message, not our source file and line."""
    code = ("import warnings; from deepplain import cli; cli._setup_logging(); "
            "warnings.warn('ActivationSaturationMonitor: activations exploded in 51 layer(s) at step 57')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "warning: ActivationSaturationMonitor: activations exploded in 51 layer(s) at step 57\n"


@pytest.mark.fast
def test_config_check_rejects_van_flags_elsewhere():
    with pytest.raises(ConfigError, match="--lambda-lr-ratio applies to --model van only"):
        merge({"model": "plain", "dataset": "usps", "lambda_lr_ratio": 0.5})


def test_dirac_imagenet_form_on_an_image_folder(tmp_path, runs):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["--model", "dirac", "--depth", "18", "--dataset", "imagefolder", "--data-dir",
                 str(tmp_path / "images"), "--image-size", "64", "--batch-size", "4", "--fast-dev-run",
                 "--logdir", str(runs), "--no-progress"]) == 0
    summary = json.loads((only_run(runs) / "summary.json").read_text())
    assert summary["config"]["arch"] == "conv" and summary["split_sizes"] == {"train": 8, "val": 8, "test": 8}
    assert summary["parameters"] > 11_000_000  # the ImageNet layout, 2 classes


def test_dirac_module_logs_mean_a_and_b_per_layer(runs):
    assert main(["--model", "dirac", "--depth", "3", "--dataset", "usps", "--epochs", "1", "--limit-train-batches",
                 "2", "--limit-val-batches", "1", "--diagnostics", "none", "--logdir", str(runs), "--no-progress"]) == 0
    acc = EventAccumulator(str(only_run(runs))).Reload()
    tags = acc.Tags()["scalars"]
    for i in range(3):
        assert f"dirac/a/features.{i}.dirac" in tags and f"dirac/b/features.{i}.dirac" in tags
    assert acc.Scalars("dirac/a/features.0.dirac")[0].value == pytest.approx(1.0, abs=0.05)  # a starts at 1


@pytest.mark.parametrize("flag,classifier_bounded", [([], False), (["--max-norm-classifier"], True)])
def test_max_norm_leaves_the_classifier_free_unless_asked(flag, classifier_bounded, runs):
    """The PlainNet paper bounds every hidden unit's weights; the output layer is free by default."""
    assert main(["--model", "plain", "--depth", "3", "--width", "300", "--dataset", "usps", "--epochs", "1",
                 "--limit-train-batches", "5", "--limit-val-batches", "1", "--lr", "2", "--max-norm", "1",
                 "--diagnostics", "condition", "--diag-every", "5", "--logdir", str(runs), "--no-progress",
                 *flag]) == 0  # --diag-every: every layer whatever the machine's load (no time plan)
    run = only_run(runs)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = state["state_dict"]
    for i in (1, 2, 3):
        assert (weights[f"model.features.{i}.linear.weight"].norm(dim=1) <= 1 + 1e-5).all()
    assert bool((weights["model.classifier.weight"].norm(dim=1) <= 1 + 1e-5).all()) == classifier_bounded
    # the representation probe has twice as many samples as the widest layer has units (300)
    probe = next(v for k, v in state["callbacks"].items() if k.startswith("ConditionNumberProbe"))
    assert probe["probe"]["inputs"].shape[0] == 600
