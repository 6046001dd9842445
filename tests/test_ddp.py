"""Several processes: 2-process DDP on CPU (gloo), torchrun, SIGTERM to a DDP job, concurrent runs, and a
rendezvous that never completes."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY_VAN = ["--model", "van", "--depth", "3", "--width", "16", "--dataset", "usps", "--epochs", "1",
            "--limit-train-batches", "4", "--limit-val-batches", "2", "--no-progress", "--diag-every", "2"]
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def clean_env(**extra):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("DEEPPLAIN_RUN_DIR", None)
    return env


def run(args, cwd, timeout=600, **env):
    return subprocess.run([sys.executable, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_callbacks_in_foreign_module_under_ddp(tmp_path):
    proc = run([str(REPO / "tests/scripts/ddp_run.py"), "foreign", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "foreign.json").read_text())
    assert result["world_size"] == 2 and result["weights_equal"]
    assert result["max_row_norm"] <= 1.0 + 1e-5
    assert result["saturation_layers"] == ["body.1", "body.3", "body.5", "body.7"]
    versions = list((tmp_path / "foreign").glob("version_*"))
    assert len(versions) == 1  # rank zero alone writes
    acc = EventAccumulator(str(versions[0])).Reload()
    assert "saturation/depth_max/max_abs" in acc.Tags()["scalars"] and "overview/layers_dead" in acc.Tags()["scalars"]
    assert "condition/depth_max/log10_kappa" in acc.Tags()["scalars"]
    assert (versions[0] / "diagnostics.csv").is_file()


def test_van_lambdas_identical_across_ranks(tmp_path):
    proc = run([str(REPO / "tests/scripts/ddp_run.py"), "van", str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "van.json").read_text())
    assert result["world_size"] == 2 and result["lambda_equal"] and result["alpha_equal"]
    assert result["lambda_max"] < -1.0 and result["steps"] == 16  # 256 samples / 2 ranks / 16 per batch x 2 epochs


def test_train_py_with_ddp_and_a_relative_data_folder_writes_one_run(tmp_path, data_root):
    """DEEPPLAIN_DATA given relative to where the user started; the run (and its DDP worker) find it."""
    (tmp_path / "start").mkdir()
    relative = os.path.relpath(data_root, tmp_path / "start")
    runs = tmp_path / "runs"
    proc = run([str(REPO / "train.py"), *TINY_VAN, *DDP, "--logdir", str(runs)], tmp_path / "start",
               DEEPPLAIN_DATA=relative)
    assert proc.returncode == 0, proc.stderr[-3000:]
    versions = list(runs.glob("*/version_*"))
    assert len(versions) == 1, versions
    summary = json.loads((versions[0] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4
    assert summary["data_root"] == str(data_root.resolve())
    assert (versions[0] / "checkpoints" / "last.ckpt").is_file()


def test_torchrun_writes_one_run_folder(tmp_path):
    runs = tmp_path / "runs"
    proc = run(["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), str(REPO / "train.py"), *TINY_VAN, *DDP,
                "--logdir", str(runs)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.name for p in runs.glob("*/*"))
    assert folders == ["version_0"], folders  # no stray folder made by rank 1
    summary = json.loads(next(runs.glob("*/version_0/summary.json")).read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 4


def test_sigterm_to_a_ddp_process_group_preempts_instead_of_hanging(tmp_path):
    runs = tmp_path / "runs"
    flags = ["--model", "plain", "--depth", "4", "--width", "32", "--dataset", "fake", "--arch", "mlp", "--epochs",
             "1000", "--batch-size", "20", "--no-progress", "--diagnostics", "none", *DDP, "--logdir", str(runs)]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *flags], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob("*/version_0/checkpoints/last.ckpt")):
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM does: every process of the job
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the DDP run hung after SIGTERM")
    assert proc.returncode == 143, err[-3000:]
    run_dir = next(runs.glob("*/version_0"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == summary["global_step"]


def test_two_runs_started_together_get_their_own_folders(tmp_path):
    runs = tmp_path / "runs"
    args = [sys.executable, str(REPO / "train.py"), "--model", "plain", "--depth", "3", "--width", "16", "--dataset",
            "fake", "--arch", "mlp", "--epochs", "1", "--limit-train-batches", "3", "--diagnostics", "none",
            "--no-progress", "--logdir", str(runs), "--name", "same"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-1500:] for r in results]
    assert sorted(p.name for p in (runs / "same").iterdir()) == ["version_0", "version_1"]
    for version in ("version_0", "version_1"):
        summary = json.loads((runs / "same" / version / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["run_dir"].endswith(version)


def test_a_rank_that_never_arrives_ends_the_run_with_one_line(tmp_path):
    """Started as rank 0 of 2 with nobody else: the rendezvous times out after --dist-timeout, with a message."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TORCHELASTIC_RUN_ID": "lonely"}
    start = time.time()
    proc = run([str(REPO / "train.py"), *TINY_VAN, *DDP, "--dist-timeout", "15", "--logdir", str(tmp_path / "runs")],
               tmp_path, timeout=300, **env)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 4 and len(lines) == 1, proc.stderr[-3000:]
    assert "could not reach each other within --dist-timeout 15 s" in lines[0]
    assert "Traceback" not in proc.stderr and time.time() - start < 200


@pytest.mark.fast
def test_a_run_leaves_its_process_group_before_the_process_exits(tmp_path):
    """train.py's run ends with the process group destroyed: gloo's threads still up at interpreter teardown can
    abort a finished run with SIGABRT (seen once in this suite's DDP test)."""
    import torch.distributed as dist

    from deepplain.training import leave_process_group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
    leave_process_group()  # nothing to leave: a no-op
