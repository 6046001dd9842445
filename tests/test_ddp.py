"""Two-process DDP on CPU (gloo): callbacks in a foreign module, VAN lambdas in sync, and train.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(args, tmp_path, timeout=600):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("DEEPPLAIN_RUN_DIR", None)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_callbacks_in_foreign_module_under_ddp(tmp_path):
    proc = run([str(REPO / "tests/scripts/ddp_run.py"), "foreign", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "foreign.json").read_text())
    assert result["world_size"] == 2 and result["weights_equal"]
    assert result["max_row_norm"] <= 1.0 + 1e-5
    assert result["saturation_layers"] == ["body.1", "body.3", "body.5", "body.7"]
    versions = list((tmp_path / "foreign").glob("version_*"))
    assert len(versions) == 1  # rank zero alone writes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(versions[0])).Reload()
    assert "saturation/train/mean_abs/body.1" in acc.Tags()["scalars"]
    assert "condition/kappa/body.1" in acc.Tags()["scalars"]


def test_van_lambdas_identical_across_ranks(tmp_path):
    proc = run([str(REPO / "tests/scripts/ddp_run.py"), "van", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "van.json").read_text())
    assert result["world_size"] == 2 and result["lambda_equal"] and result["alpha_equal"]
    assert result["lambda_max"] < -1.0 and result["steps"] == 16  # 256 samples / 2 ranks / 16 per batch x 2 epochs


def test_train_py_with_ddp_writes_one_run(tmp_path):
    runs = tmp_path / "runs"
    proc = run([str(REPO / "train.py"), "--model", "van", "--depth", "3", "--dataset", "usps", "--epochs", "1",
                "--limit-train-batches", "4", "--limit-val-batches", "2", "--accelerator", "cpu", "--devices", "2",
                "--strategy", "ddp", "--logdir", str(runs), "--no-progress", "--diag-every", "2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = list(runs.glob("*/version_*"))
    assert len(versions) == 1, versions
    summary = json.loads((versions[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert (versions[0] / "checkpoints" / "last.ckpt").is_file()
