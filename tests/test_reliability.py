"""Long runs: exact resume (also mid-epoch), stop signals, divergence, atomic checkpoints, full disks."""
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import deepplain.checkpoints as checkpoints
from deepplain import curves
import deepplain.training as training
from deepplain.checkpoints import AtomicCheckpointIO, remove_stale_temporaries
from deepplain.cli import main
from deepplain.errors import DivergenceError

REPO = Path(__file__).resolve().parents[1]
SMALL_VAN = ["--model", "van", "--depth", "3", "--width", "16", "--dataset", "fake", "--arch", "mlp", "--epochs", "3",
             "--batch-size", "50", "--schedule", "multistep", "--milestones", "2", "--lr", "0.05", "--no-progress",
             "--diag-every", "5"]


class At(L.Callback):
    """Runs ``action(trainer, pl_module)`` once, at the start of the given epoch and batch."""

    def __init__(self, epoch, batch, action):
        self.epoch, self.batch, self.action, self.done = epoch, batch, action, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.done and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            self.done = True
            self.action(trainer, pl_module)


def ctrl_c(trainer, pl_module):
    os.kill(os.getpid(), signal.SIGINT)  # what a terminal's Ctrl-C does; handled at the end of this batch


def with_extra_callback(monkeypatch, callback):
    real = training.make_diagnostics
    monkeypatch.setattr(training, "make_diagnostics", lambda config: [*real(config), callback])


def state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_run(a_dir, b_dir):
    a, b = state(a_dir / "checkpoints" / "last.ckpt"), state(b_dir / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer_states"][0]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer_states"][0]["state"].values()]
    assert len(momentum_a) == len(momentum_b) and all(torch.allclose(x, y, atol=1e-6)
                                                      for x, y in zip(momentum_a, momentum_b))
    assert [s["last_epoch"] for s in a["lr_schedulers"]] == [s["last_epoch"] for s in b["lr_schedulers"]]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a_dir, b_dir))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "alpha_removed_step"):
        if sa.get(key) is None:
            assert sb.get(key) is None, key
        else:
            assert sa[key] == pytest.approx(sb[key], rel=1e-5, abs=1e-6), key
    return a, b


@pytest.mark.parametrize("batch", [0, 13], ids=["at-epoch-start", "mid-epoch"])
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(batch, tmp_path, monkeypatch, capsys):
    assert main([*SMALL_VAN, "--logdir", str(tmp_path / "a")]) == 0
    reference = next((tmp_path / "a").glob("*/version_0"))
    with monkeypatch.context() as m:
        with_extra_callback(m, At(epoch=1, batch=batch, action=ctrl_c))
        assert main([*SMALL_VAN, "--logdir", str(tmp_path / "b")]) == 130
    assert "continue with --resume" in capsys.readouterr().err
    run = next((tmp_path / "b").glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["global_step"] == 36 + batch + 1  # stopped after that batch
    assert summary["interrupt_checkpoint"].endswith("last.ckpt") and summary["resume_from"].endswith("last.ckpt")
    assert main(["--resume", str(run / "checkpoints" / "last.ckpt"), "--no-progress"]) == 0
    assert not (run.parent / "version_1").exists()  # same run folder, same TensorBoard run
    a, b = assert_same_run(reference, run)
    assert any("lagrange_lambda" in k for k in a["state_dict"])
    probes = [state["probe"] for state in b["callbacks"].values() if "probe" in state]
    assert len(probes) == 2 and sum(p.get("inputs") is not None for p in probes) == 1  # one shared probe, saved once


def test_sigterm_preempts_with_a_resumable_checkpoint_of_that_step(tmp_path):
    """What a cluster does before it kills a job: SIGTERM. The run saves the step it is at, says "preempted",
    exits 143, and --resume ends exactly where an uninterrupted run ends."""
    flags = ["--model", "plain", "--depth", "4", "--width", "32", "--dataset", "fake", "--arch", "mlp", "--epochs",
             "4", "--batch-size", "20", "--no-progress", "--diagnostics", "none"]
    assert main([*flags, "--logdir", str(tmp_path / "a")]) == 0
    reference = next((tmp_path / "a").glob("*/version_0"))
    runs = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags, "--logdir", str(runs)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/version_0/checkpoints/last.ckpt")):
        time.sleep(0.05)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    run = next(runs.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted" and "Traceback" not in err
    assert "weights_only" not in err  # Lightning's note when a save does not say what it keeps
    saved = state(run / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == summary["global_step"] and saved["global_step"] % 90 != 0  # mid-epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--resume", str(run / "checkpoints" / "last.ckpt"), "--no-progress"]) == 0
    # the run's own checkpoints are in its folder on a resume: nothing to warn about
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert_same_run(reference, run)


class Poison(L.Callback):
    """At one step, sets a parameter to NaN (as a bad update would) or the learning rate to inf."""

    def __init__(self, step, what):
        self.step, self.what = step, what

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.what != "lr":
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.what].fill_(float("nan"))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and self.what == "lr":
            for group in optimizer.param_groups:
                group["lr"] = float("inf")


def test_divergence_names_the_layer_that_went_non_finite_on_that_step(tmp_path, monkeypatch, capsys):
    with_extra_callback(monkeypatch, Poison(7, "model.blocks.1.gate.bias"))
    code = main(["--model", "highway", "--depth", "3", "--width", "16", "--dataset", "usps", "--epochs", "2",
                 "--limit-train-batches", "5", "--diagnostics", "none", "--logdir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "non-finite loss at step 7" in lines[0], err
    assert "first non-finite layer output: model.blocks.1.gate;" in lines[0]
    assert "first non-finite parameter: model.blocks.1.gate.bias" in lines[0]
    run = next(tmp_path.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and "step 7" in summary["error"]
    last = state(run / "checkpoints" / "last.ckpt")  # epoch 0's, finite
    assert last["global_step"] == 5 and all(torch.isfinite(v).all() for v in last["state_dict"].values()
                                             if v.is_floating_point())


@pytest.mark.parametrize("step,expected_last", [(4, None), (9, 5)], ids=["first-epoch", "second-epoch"])
def test_non_finite_weights_never_replace_a_checkpoint(step, expected_last, tmp_path, monkeypatch, capsys):
    """The last update of an epoch with an infinite learning rate: the loss was finite, the weights are NaN.
    The epoch-end check stops the run before ModelCheckpoint could save them."""
    with_extra_callback(monkeypatch, Poison(step, "lr"))
    code = main(["--model", "plain", "--depth", "3", "--width", "16", "--dataset", "usps", "--epochs", "3",
                 "--limit-train-batches", "5", "--diagnostics", "none", "--logdir", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3 and f"the weights became non-finite by step {step + 1}" in err, err
    run = next(tmp_path.glob("*/version_0"))
    ckpts = list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else []
    if expected_last is None:
        assert not ckpts
    else:
        for path in ckpts:
            saved = state(path)
            assert saved["global_step"] == expected_last
            assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


@pytest.mark.fast
def test_atomic_io_refuses_non_finite_weights_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(DivergenceError, match="refusing to save last.ckpt: w holds non-finite values"):
        io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, math.nan])}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("half-way through the write")
    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "extra": Unpicklable()}, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_full_disk_keeps_the_previous_checkpoint_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def save_until_full(obj, fh, *args, **kwargs):
        calls.append(obj.get("global_step"))
        if obj.get("global_step", 0) > 5:  # the second epoch's saves find the disk full half-way
            fh.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, fh, *args, **kwargs)
    monkeypatch.setattr(checkpoints.torch, "save", save_until_full)
    code = main(["--model", "plain", "--depth", "3", "--width", "16", "--dataset", "usps", "--epochs", "3",
                 "--limit-train-batches", "5", "--diagnostics", "none", "--logdir", str(tmp_path), "--no-progress"])
    monkeypatch.setattr(checkpoints.torch, "save", real_save)
    err = capsys.readouterr().err
    assert code == 4 and "no space left to save" in err and "the previous checkpoint is kept" in err
    run = next(tmp_path.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left" in summary["error"]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert all(not n.startswith(".") for n in names)  # no temporary file left behind
    assert state(run / "checkpoints" / "last.ckpt")["global_step"] == 5


KILLED_SAVE = """
import sys, time, torch
from deepplain.checkpoints import AtomicCheckpointIO
real = torch.save
def slow(obj, fh, *a, **k):
    fh.write(b"x" * 1000); fh.flush(); print("writing", flush=True); time.sleep(60)
torch.save = slow
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, sys.argv[1])
"""


def test_kill_9_during_a_save_leaves_the_old_checkpoint_whole(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait(timeout=30)
    assert path.read_bytes() == before  # a whole, loadable checkpoint
    assert state(path)["state_dict"]["w"].sum() == 1000
    stale = [p for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(stale) == 1 and stale[0].name.startswith(".last.ckpt.")  # in the same folder, never in /tmp
    assert remove_stale_temporaries(path.parent) == stale and [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_resume_with_more_epochs_rebuilds_the_schedule(tmp_path):
    flags = ["--model", "plain", "--depth", "3", "--width", "16", "--dataset", "usps", "--limit-train-batches", "2",
             "--limit-val-batches", "1", "--diagnostics", "none", "--schedule", "cosine", "--lr", "0.1",
             "--no-progress"]
    assert main([*flags, "--epochs", "4", "--logdir", str(tmp_path / "fresh")]) == 0
    assert main([*flags, "--epochs", "2", "--logdir", str(tmp_path / "short")]) == 0
    short = next((tmp_path / "short").glob("*/version_0"))
    assert main(["--resume", str(short / "checkpoints" / "last.ckpt"), "--epochs", "4", "--no-progress"]) == 0

    def rates(run):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload()
        tag = next(t for t in acc.Tags()["scalars"] if t.startswith("lr-"))
        return [round(e.value, 6) for e in curves.scalars(acc, tag)]  # step order, whatever the files' order
    fresh = rates(next((tmp_path / "fresh").glob("*/version_0")))
    assert fresh == pytest.approx([0.1, 0.085355, 0.05, 0.014645], abs=1e-6)
    resumed = rates(short)  # epochs 0-1 ran under the 2-epoch schedule, 2-3 under the 4-epoch one
    assert resumed == pytest.approx([0.1, 0.05, 0.05, 0.014645], abs=1e-6)
    assert all(b <= a for a, b in zip(resumed, resumed[1:]))  # never rising again


def test_ctrl_c_in_a_real_process_saves_checkpoint_and_summary(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--model", "plain", "--depth", "4", "--dataset",
                             "fake", "--arch", "mlp", "--epochs", "1000", "--logdir", str(runs), "--no-progress",
                             "--diagnostics", "none"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs.glob("*/version_0/checkpoints/last.ckpt")):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run = next(runs.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupt_checkpoint"].endswith("last.ckpt")
    assert state(run / "checkpoints" / "last.ckpt")["global_step"] == summary["global_step"]
    assert "Traceback" not in err and "continue with --resume" in err


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


@pytest.mark.parametrize("precision,recorded", [("64", "64-true"), ("16-mixed", "bf16-mixed")])
def test_other_precisions_run_and_are_recorded_as_run(precision, recorded, tmp_path, capsys):
    assert main(["--model", "van", "--depth", "3", "--width", "16", "--dataset", "usps", "--epochs", "1",
                 "--limit-train-batches", "3", "--limit-val-batches", "1", "--precision", precision, "--diag-every",
                 "1", "--logdir", str(tmp_path), "--no-progress"]) == 0
    run = next(tmp_path.glob("*/version_0"))
    assert json.loads((run / "config.json").read_text())["precision"] == recorded
    assert json.loads((run / "summary.json").read_text())["precision"] == recorded
    if recorded != precision and precision != "64":
        assert f"--precision {precision} runs as {recorded}" in capsys.readouterr().err
