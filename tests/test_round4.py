"""Reliability, round 4: one process per run folder, a report for every run that ends, and the last tracebacks and
silent results (each test fails without its fix)."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe
from deepplain.callbacks.records import DiagnosticsTable
from torch import nn

from deepplain import curves, experiments
from deepplain.cli import main as train_main
from deepplain.errors import ConfigError
from deepplain.inputs import FolderLock, read_results_csv
from deepplain.sweep import main as sweep_main
from deepplain.sweep import read_csv
from tests.foreign import ForeignMLP, loaders
from tests.test_tool_runs import sigterm_after_first_checkpoint, start_until_checkpoint, usps_sweep_argv

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model", "plain", "--depth", "6", "--width", "16", "--dataset", "usps", "--epochs", "2", "--no-progress",
         "--limit-train-batches", "10"]


# -- a report and overview.png for every run that ends ----------------------------------------------------------------
def test_a_diverged_run_ends_with_its_report_and_overview(tmp_path, capsys):
    assert train_main([*SMALL, "--lr", "1e4", "--logdir", str(tmp_path / "runs")]) == 3
    out = capsys.readouterr().out
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert "trainability report" in out and "run diverged" in out and str(run) in out
    assert (run / "overview.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"the run diverged after 0 complete epoch\(s\) and step \d+, before a whole "
                                         r"epoch was validated"):
        curves.read_curves(run)


class CtrlC(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 12:
            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_run_ends_with_its_report_and_overview(tmp_path, capsys, monkeypatch):
    import deepplain.training as training
    real = training.make_diagnostics
    monkeypatch.setattr(training, "make_diagnostics", lambda config: [*real(config), CtrlC()])
    assert train_main([*SMALL, "--logdir", str(tmp_path / "runs")]) == 130
    out = capsys.readouterr().out
    run = next((tmp_path / "runs").glob("*/version_0"))
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert "trainability report" in out and "run interrupted" in out
    assert (run / "overview.png").stat().st_size > 1000 and (run / "checkpoints" / "last.ckpt").is_file()


# -- one process per run folder ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_live_run_refuses_a_resume_of_its_folder(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = [sys.executable, str(REPO / "train.py"), "--model", "plain", "--depth", "4", "--width", "16", "--dataset",
            "usps", "--epochs", "40", "--no-progress", "--diagnostics", "none", "--logdir", str(runs), "--name", "live"]
    ckpt = runs / "live" / "version_0" / "checkpoints" / "last.ckpt"
    proc = start_until_checkpoint(argv, tmp_path, ckpt, {**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        assert train_main(["--resume", str(ckpt), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by another process (pid {proc.pid})" in err and len(err.splitlines()) == 1
        assert proc.poll() is None  # the first run trains on, alone
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert json.loads((ckpt.parent.parent / "summary.json").read_text())["status"] == "preempted"


@pytest.mark.slow
def test_a_killed_sweeps_training_stops_with_it_and_the_rerun_resumes_it(tmp_path):
    """SIGKILL to the sweep's process group (what the OOM killer or a closed terminal does): its training gets
    SIGTERM, saves its step and ends; the same sweep command then resumes it, never beside it."""
    out = tmp_path / "k"
    argv = usps_sweep_argv(out)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = out / "runs" / "plain-d1-s0" / "version_0"
    # the sweep in a process group of its own, as a terminal starts it: the whole group is killed
    sweep = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "last.ckpt").exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.05)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.communicate(timeout=60)
    deadline = time.time() + 120
    while not (run / "summary.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    again = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    row, = read_csv(out / "results.csv")
    assert row["status"] == "completed" and row["global_step"] == "160" and not run.with_name("version_1").exists()


@pytest.mark.slow
def test_a_sweep_never_resumes_a_folder_another_process_holds(tmp_path):
    out = tmp_path / "s"
    argv = usps_sweep_argv(out)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = out / "runs" / "plain-d1-s0" / "version_0"
    sigterm_after_first_checkpoint(argv, tmp_path, run / "checkpoints" / "last.ckpt", env)  # a resumable run
    before = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    with FolderLock(run, "the run folder"):  # an orphan still training it
        assert sweep_main(argv[3:]) == 1
    row, = read_csv(out / "results.csv")
    assert f"is in use by pid {os.getpid()}" in row["status"] and row["status"].startswith("failed")
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before  # nothing trained into it


# -- tracebacks and silent results --------------------------------------------------------------------------------------
class NaNLayer(nn.Module):
    def forward(self, x):
        return x * math.nan


def test_a_layer_of_nan_does_not_stop_the_users_fit(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    module = ForeignMLP()
    module.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), NaNLayer(), nn.ReLU())
    monitor = ActivationSaturationMonitor(every_n_steps=1, max_overhead=None, histogram_layers=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(max_steps=3, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path)), enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                  limit_val_batches=1).fit(module, *loaders())
    assert math.isnan(monitor.last_stats["body.5"]["mean_abs"]) and monitor.samples_taken == 3


@pytest.mark.fast
def test_a_diagnostics_table_cut_mid_row_loses_the_fragment_on_resume(tmp_path):
    path = tmp_path / "diagnostics.csv"
    path.write_text("step,callback,statistic,layer,value\n0,grad_flow,norm,a,1.0\n5,grad_flow,norm,a,2.0\n10,grad")
    table = DiagnosticsTable(path, start_step=20)
    table.close()
    with open(path, newline="") as handle:
        assert [r["step"] for r in csv.DictReader(handle)] == ["0", "5"]


@pytest.mark.fast
def test_results_tables_check_ranges_and_read_excels_bom(tmp_path):
    header = "run_id,model,depth,seed,status,test_acc\n"
    for body, message in (("a,plain,4,0,completed,1.7\n", "test_acc 1.7 is not an accuracy in [0, 1]"),
                          ("a,plain,4,0,completed,inf\n", "test_acc inf is not an accuracy in [0, 1]"),
                          ("a,plain,-4,0,completed,0.5\n", "depth -4 is below 1")):
        (tmp_path / "r.csv").write_text(header + body)
        with pytest.raises(ConfigError, match=re.escape(f"line 2: {message}")):
            read_results_csv(tmp_path / "r.csv")
    (tmp_path / "r.csv").write_bytes(("\ufeff" + header + "a,plain,4,0,completed,0.5\n").encode("utf-8"))
    assert read_results_csv(tmp_path / "r.csv")[0]["run_id"] == "a"


def fit(callbacks, module=None, steps=3):
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=callbacks).fit(module or ForeignMLP(), loaders()[0])


def test_condition_probe_arguments_and_probes_that_cannot_measure_are_said():
    seen = []
    module = ForeignMLP()
    module.training_step = lambda batch, i: seen.append(i)
    with pytest.raises(ValueError, match=r"heatmap_layers \[999\] name no watched layer; there are 4"):
        fit([ConditionNumberProbe(heatmap_layers=[999])], module)
    assert seen == []  # at setup, before the first step
    assert ConditionNumberProbe(weight_norms="inf").weight_norms == ("inf",)
    with pytest.warns(UserWarning, match="none of the 4 watched layers produced an output"):
        fit([ConditionNumberProbe(every_n_steps=1, max_overhead=None, probe_fn=lambda module, x: None)])
    short = ConditionNumberProbe(every_n_steps=1, max_overhead=None, probe_size=20)
    with pytest.warns(UserWarning, match=r"4 layer\(s\) have fewer probe rows than units.*body.1 \(20 rows, 32 units"):
        fit([short])
    assert all(math.isinf(row["kappa"]) for row in short.last_stats.values())


@pytest.mark.fast
def test_experiment_arguments_are_checked_before_anything_trains(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # argparse's one line and exit 2
        experiments.main(["ablation", "--epochs", "3", "--out", str(tmp_path / "a"), "--lrs", "0.1,0.1"])
    assert stopped.value.code == 2 and "0.1 given twice" in capsys.readouterr().err and not (tmp_path / "a").exists()
    typo = tmp_path / "tpyo"
    assert experiments.main(["ablation", "--epochs", "3", "--out", str(typo), "--table-only"]) == 2
    assert "--table-only: " in capsys.readouterr().err and not typo.exists()


def test_sweep_settings_compare_as_flags_not_as_text(tmp_path, capsys):
    out = tmp_path / "s"
    grid = ["--out", str(out), "--dataset", "usps", "--models", "plain", "--depths", "1", "--seeds", "0"]
    tiny = ["--limit-train-batches", "2", "--limit-val-batches", "1", "--diagnostics", "none", "--width", "8"]
    assert sweep_main([*grid, "--epochs", "1", "--", *tiny]) == 0
    assert sweep_main([*grid, "--epochs", "1", "--", *tiny[4:], *tiny[:4]]) == 0  # another order: the same run
    assert "skipped (done)" in capsys.readouterr().out
    assert sweep_main([*grid, "--epochs", "2", "--", *tiny]) == 2
    assert "was trained with other settings (--epochs 1 -> 2)" in capsys.readouterr().err


def test_resume_messages_name_the_real_problem(tmp_path, capsys):
    assert train_main([*SMALL, "--epochs", "1", "--logdir", str(tmp_path / "runs"), "--diagnostics", "none"]) == 0
    run = next((tmp_path / "runs").glob("*/version_0"))
    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 2
    assert f"{run} is a folder: pass {run / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
    copy = run / "checkpoints" / "copy.ckpt"
    copy.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes())
    assert train_main(["--resume", str(copy)]) == 2
    assert "copy.ckpt is another file (a best-* checkpoint or a copy)" in capsys.readouterr().err
    stray = tmp_path / "notes.txt"  # any file outside a run folder is no run's checkpoint, whatever its name
    stray.write_text("hello")
    assert train_main(["--resume", str(stray)]) == 2
    assert f"{stray} is not in a deepplain run folder ({tmp_path / 'config.json'} not found)" in capsys.readouterr().err


def test_the_same_callbacks_in_a_second_fit_log_what_they_logged_in_the_first():
    from deepplain.callbacks import GradientFlowMonitor

    from tests.test_any_model import RecordingLogger
    callbacks = [ActivationSaturationMonitor(every_n_steps=2, max_overhead=None),
                 ConditionNumberProbe(every_n_steps=2, max_overhead=None),
                 GradientFlowMonitor(every_n_steps=2, max_overhead=None)]
    logged, counts = [], []
    for _ in range(2):
        logger = RecordingLogger()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(max_steps=5, accelerator="cpu", logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, log_every_n_steps=1,
                      limit_val_batches=1, val_check_interval=2).fit(ForeignMLP(), *loaders())
        logged.append(logger.tags)
        counts.append([cb.samples_taken for cb in callbacks])
    assert logged[0] == logged[1] and counts[0] == counts[1] and min(counts[0]) >= 3
