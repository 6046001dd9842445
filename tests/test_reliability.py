"""Long runs: exact resume, divergence guard, Ctrl-C, mixed precision for every family."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import deepplain.cli as cli
from deepplain.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL_VAN = ["--model", "van", "--depth", "3", "--width", "16", "--dataset", "fake", "--arch", "mlp", "--epochs", "3",
             "--batch-size", "50", "--schedule", "multistep", "--milestones", "2", "--lr", "0.05", "--no-progress",
             "--diag-every", "5"]


class StopAt(L.Callback):
    """Raises KeyboardInterrupt (what Ctrl-C does) at the start of an epoch."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


class PoisonAt(L.Callback):
    """Sets a weight to NaN at the start of an epoch, as an exploding update would."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                next(p for n, p in pl_module.named_parameters() if n.endswith("weight")).fill_(float("nan"))


def with_extra_callback(monkeypatch, callback):
    real = cli.build_diagnostics
    monkeypatch.setattr(cli, "build_diagnostics", lambda config: [*real(config), callback])


def state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_interrupted_then_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    assert main([*SMALL_VAN, "--logdir", str(tmp_path / "a")]) == 0
    reference = next((tmp_path / "a").glob("*/version_0"))

    with monkeypatch.context() as m:
        with_extra_callback(m, StopAt(epoch=1))
        assert main([*SMALL_VAN, "--logdir", str(tmp_path / "b")]) == 130
    run = next((tmp_path / "b").glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 1
    assert (run / "checkpoints" / "interrupted.ckpt").is_file()

    assert main(["--resume", str(run / "checkpoints" / "last.ckpt"), "--no-progress"]) == 0
    assert not (run.parent / "version_1").exists()  # same run folder, same TensorBoard run
    resumed = json.loads((run / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["epochs_done"] == 3
    assert resumed["global_step"] == expected["global_step"]
    for key in ("train_loss", "val_loss", "val_acc", "test_loss", "test_acc"):
        assert resumed[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    a, b = state(reference / "checkpoints" / "last.ckpt"), state(run / "checkpoints" / "last.ckpt")
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    assert any("lagrange_lambda" in k for k in a["state_dict"])
    momentum_a = [s["momentum_buffer"] for s in a["optimizer_states"][0]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer_states"][0]["state"].values()]
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(momentum_a, momentum_b))
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 3
    assert "ConditionNumberProbe" in b["callbacks"] and b["callbacks"]["ConditionNumberProbe"]["probe"]["inputs"] is not None
    assert len(list(run.glob("events.out.tfevents.*"))) >= 2  # both parts logged into the same folder


def test_resume_refuses_changed_model_flags(tmp_path, capsys):
    assert main([*SMALL_VAN, "--epochs", "1", "--logdir", str(tmp_path)]) == 0
    ckpt = next(tmp_path.glob("*/version_0/checkpoints/last.ckpt"))
    assert main(["--resume", str(ckpt), "--depth", "5"]) == 2
    assert "these flags cannot change: --depth" in capsys.readouterr().err


def test_divergence_stops_with_step_and_layer_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    with_extra_callback(monkeypatch, PoisonAt(epoch=1))
    code = main([*SMALL_VAN, "--logdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training diverged: non-finite loss at step 36" in lines[0], err
    assert "first non-finite layer output: model.stem.1" in lines[0]
    run = next(tmp_path.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 36" in summary["error"]
    last = state(run / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                      if v.is_floating_point())


def test_ctrl_c_saves_checkpoint_and_summary(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--model", "plain", "--depth", "4", "--dataset",
                             "fake", "--arch", "mlp", "--epochs", "1000", "--logdir", str(runs), "--no-progress",
                             "--diagnostics", "none"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/version_0/checkpoints/last.ckpt")):
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run = next(runs.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupt_checkpoint"].endswith("interrupted.ckpt")
    assert (run / "checkpoints" / "interrupted.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert "Traceback" not in err


FAMILIES = [("plain", "mlp", 4, "usps"), ("van", "mlp", 3, "usps"), ("dirac", "mlp", 3, "usps"),
            ("resnet", "mlp", 3, "usps"), ("highway", "mlp", 3, "usps"), ("plain", "conv", 5, "fake"),
            ("van", "conv", 10, "fake"), ("dirac", "conv", 10, "fake"), ("resnet", "conv", 8, "fake")]


@pytest.mark.parametrize("model,arch,depth,dataset", FAMILIES)
def test_bf16_mixed_every_family_with_all_diagnostics(model, arch, depth, dataset, tmp_path):
    code = main(["--model", model, "--arch", arch, "--depth", str(depth), "--dataset", dataset, "--epochs", "1",
                 "--limit-train-batches", "3", "--limit-val-batches", "1", "--precision", "bf16-mixed",
                 "--diagnostics", "all", "--diag-every", "1", "--batch-size", "32", "--logdir", str(tmp_path),
                 "--no-progress", "--max-norm", "3"])
    assert code == 0
    summary = json.loads(next(tmp_path.glob("*/version_0/summary.json")).read_text())
    assert summary["status"] == "completed" and math.isfinite(summary["train_loss"])
