"""Sweep runner (resume, CSV schema), plots, and the PlainNet experiments' analysis on tiny runs."""
import csv
import json
import math
import sys

import pytest
import torch
from deepplain.datamodules import get_datamodule
from torch.utils.tensorboard import SummaryWriter

from deepplain import curves, experiments, plots
from deepplain import sweep as sweeps
from deepplain.cli import main
from deepplain.errors import ConfigError
from deepplain.schema import to_argv
from deepplain.sweep import CSV_FIELDS, Run, grid, parse_variant, read_csv
from deepplain.sweep import main as sweep_main

TINY = ["--", "--limit-train-batches", "2", "--limit-val-batches", "1", "--diagnostics", "none", "--width", "16"]


def sweep(out, *extra):
    return sweep_main(["--out", str(out), "--dataset", "usps", "--models", "plain,van", "--depths", "1,2",
                       "--seeds", "0", "--epochs", "1", *extra, *TINY])


@pytest.mark.slow
def test_sweep_runs_grid_writes_csv_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep(out) == 0
    rows = read_csv(out / "results.csv")
    with open(out / "results.csv") as fh:
        assert next(csv.reader(fh)) == CSV_FIELDS
    assert sorted(r["run_id"] for r in rows) == ["plain-d1-s0", "plain-d2-s0", "van-d1-s0", "van-d2-s0"]
    assert all(r["status"] == "completed" and r["dataset"] == "usps" for r in rows)
    assert all(0 <= float(r["test_acc"]) <= 1 and int(r["parameters"]) > 0 for r in rows)
    capsys.readouterr()

    # an interrupted sweep: one run never finished, another was interrupted
    (out / "runs" / "van-d2-s0" / "version_0" / "summary.json").unlink()
    interrupted = out / "runs" / "plain-d1-s0" / "version_0" / "summary.json"
    summary = json.loads(interrupted.read_text())
    interrupted.write_text(json.dumps({**summary, "status": "interrupted"}))
    assert sweep(out) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (done)") == 2
    assert (out / "runs" / "van-d2-s0" / "version_1" / "summary.json").is_file()
    assert (out / "runs" / "plain-d1-s0" / "version_1" / "summary.json").is_file()
    assert not (out / "runs" / "plain-d2-s0" / "version_1").exists()
    assert len(read_csv(out / "results.csv")) == 4

    # a sweep with another grid into the same folder adds its rows and keeps the earlier ones
    assert sweep_main(["--out", str(out), "--dataset", "usps", "--models", "plain", "--depths", "3", "--seeds", "0",
                       "--epochs", "1", *TINY]) == 0
    assert sorted(r["run_id"] for r in read_csv(out / "results.csv")) == [
        "plain-d1-s0", "plain-d2-s0", "plain-d3-s0", "van-d1-s0", "van-d2-s0"]


def test_sweep_records_invalid_runs_as_failed(tmp_path):
    out = tmp_path / "bad"
    code = sweep_main(["--out", str(out), "--dataset", "usps", "--models", "van", "--depths", "27", "--epochs", "1",
                       "--", "--arch", "conv"])
    assert code == 1
    row, = read_csv(out / "results.csv")
    assert row["status"].startswith("failed (exit 2")
    assert "van conv depth must be 8n+2" in (out / "runs" / "van-d27-s0" / "train.log").read_text()


@pytest.mark.fast
def test_grid_and_variants():
    runs = grid(["plain"], [3, 5], [0, 1], [parse_variant("bn=--norm bn"), parse_variant("none=")], ["--lr", "0.1"])
    assert len(runs) == 8 and runs[0].run_id == "plain-d3-s0-bn" and runs[0].flags == ["--norm", "bn", "--lr", "0.1"]
    assert Run("van", 10, 2).run_id == "van-d10-s2"
    with pytest.raises(ConfigError, match="NAME=FLAGS"):
        parse_variant("--norm bn")


def fake_rows():
    rows = []
    for model, accs in (("plain", {1: [0.9, 0.8], 10: [0.5, 0.3]}), ("van", {1: [0.9, 0.9], 10: [0.85, 0.87]})):
        for depth, values in accs.items():
            for seed, acc in enumerate(values):
                rows.append({"model": model, "variant": "", "depth": str(depth), "seed": str(seed),
                             "status": "completed", "test_acc": str(acc), "train_acc": str(min(1.0, acc + 0.05))})
    rows.append({"model": "plain", "variant": "", "depth": "10", "seed": "2", "status": "diverged", "test_acc": "0.1",
                 "train_acc": "0.1"})
    return rows


@pytest.mark.fast
def test_aggregate_mean_and_spread_over_seeds():
    table = plots.aggregate(fake_rows(), "test_acc")
    mean, std, n = table["plain"][10]
    assert (mean, n) == (pytest.approx(0.4), 2) and std == pytest.approx(0.1)  # the diverged run is left out
    assert table["van"][1] == (pytest.approx(0.9), 0.0, 2)
    md = plots.markdown_table(fake_rows())
    assert "| plain | 85.00 ± 5.00 | 40.00 ± 10.00 |" in md


@pytest.mark.fast
def test_runs_of_different_budgets_are_labelled_not_averaged():
    rows = [dict(r, epochs_done="50") for r in fake_rows()]
    rows.append({"model": "van", "variant": "lambda0", "depth": "1", "seed": "0", "status": "completed",
                 "test_acc": "0.7", "train_acc": "0.7", "epochs_done": "10"})
    table = plots.aggregate(rows, "test_acc")
    assert sorted(table) == ["plain, 50 ep", "van (lambda0), 10 ep", "van, 50 ep"]
    assert table["van (lambda0), 10 ep"][1] == (pytest.approx(0.7), 0.0, 1)


@pytest.mark.fast
def test_curves_read_from_event_files(tmp_path):

    steps_per_epoch, residuals = 10, [1.0, 0.6, 0.2, 0.0]
    with SummaryWriter(str(tmp_path / "run" / "version_0")) as writer:
        for epoch in range(3):
            last = (epoch + 1) * steps_per_epoch - 1
            writer.add_scalar("train/acc", 0.5 + 0.1 * epoch, last)
            writer.add_scalar("val/acc", 0.4 + 0.1 * epoch, last)
        for i, r in enumerate(residuals):
            writer.add_scalar("alpha/residual", r, 10 * i)
    got = curves.read_curves(tmp_path / "run")
    assert [e for e, _ in got["train_error"]] == [1.0, 2.0, 3.0]
    assert [v for _, v in got["eval_error"]] == pytest.approx([0.6, 0.5, 0.4])
    assert got["alpha_residual"] == [(pytest.approx(i), pytest.approx(r)) for i, r in enumerate(residuals)]
    out = tmp_path / "fig.png"
    assert curves.main(["--run", f"van={tmp_path / 'run'}", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
    assert curves.main(["--run", f"x={tmp_path / 'nothing'}", "--out", str(out)]) == 2
    assert curves.main(["--run", str(tmp_path / "run"), "--out", str(out)]) == 2


@pytest.mark.fast
def test_plots_write_figures(tmp_path):
    paths = plots.plot_sweep(fake_rows(), tmp_path / "fig", "tiny")
    assert [p.name for p in paths] == ["accuracy_vs_depth.png", "error_vs_depth.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    assert plots.main(["--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path)]) == 2


@pytest.mark.fast
def test_a_series_at_one_depth_shows_its_spread_as_an_error_bar():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    plots._plot_curves(ax, {"van": {1: (0.8, 0.02, 2), 2: (0.7, 0.01, 2)}, "van (literal)": {2: (0.6, 0.03, 2)}})
    bar, = ax.containers  # only the one-depth series: the other has a band
    (segment,), = [c.get_segments() for c in bar.lines[2]]
    assert segment.ravel().tolist() == pytest.approx([2, 0.57, 2, 0.63])
    plt.close(fig)


def row(name, lr, status="completed", train=None, val=None, test=None, **after):
    return {"configuration": experiments.slug(name), "lr": lr, "status": status, "train_acc": train,
            "val_acc": val, "test_acc": test, "run_dir": "", "held_out": lr is not None, **after}


@pytest.mark.fast
def test_ablation_table_lists_paper_rows():
    rows = [row("BN + LReLU + max-norm", None, train="0.99", test="0.95", train_acc_eval=0.999, best_val_acc=0.96,
                best_epoch=177), row("LReLU", None, "diverged", "0.2"), row("BN", None, train="0.5", test="0.4")]
    table = experiments.ablation_table(rows)
    assert "| model component | train error (ours) | train error, eval mode | test error (ours) | best test error " \
           "(epoch) | train error (paper) | test error (paper) |" in table
    assert "| LReLU | diverged | diverged | diverged | diverged | 92.37% | 92.03% |" in table
    assert "| BN + LReLU + max-norm | 1.00% | 0.10% | 5.00% | 4.00% (177) | 0.11% | 5.48% |" in table
    assert "| BN | 50.00% | - | 60.00% | - | 84.56% | 83.21% |" in table  # finished, not measured after training
    assert "| BN + max-norm | missing | missing | missing | missing | 82.90% | 81.86% |" in table
    assert len(experiments.ABLATION) == 7


@pytest.mark.fast
def test_learning_rate_grid_picks_the_best_held_out_accuracy():
    rows = [row("BN", 0.001, train="0.5", val="0.50", test="0.49"), row("BN", 0.01, train="0.9", val="0.80",
                                                                          test="0.78"),
            row("BN", 0.1, "diverged", val="0.95"), row("LReLU", 0.01, train="0.2", val="0.2", test="0.2")]
    chosen = experiments.best_per_configuration(rows)
    assert chosen["bn"]["lr"] == 0.01  # a diverged run is never chosen over a finished one
    table = experiments.ablation_table(rows)
    assert "| BN | 0.01 | 10.00% | - | 22.00% | - | 84.56% | 83.21% |" in table
    assert "best held-out error (epoch)" in table
    grid = experiments.grid_table(rows)
    assert "| BN | 50.00% / 50.00% / 51.00% | 10.00% / 20.00% / 22.00% | diverged / diverged / diverged |" in grid


@pytest.mark.fast
def test_experiments_use_the_preset_recipe():
    flags = to_argv(experiments.recipe_options())
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--weight-decay"] == "0.0001" and pairs["--lr"] == "0.01" and pairs["--momentum"] == "0.9"
    assert pairs["--batch-size"] == "128" and pairs["--width"] == "300" and pairs["--init"] == "he-uniform"
    assert pairs["--schedule"] == "multistep" and pairs["--milestones"] == "0.5,0.75"
    assert pairs["--val-split"] == "0"  # the whole training split, as the paper
    assert not {"--norm", "--activation", "--max-norm", "--depth", "--epochs"} & set(pairs)
    held = dict(zip(*[iter(to_argv(experiments.recipe_options(lr=0.1, held_out=True)))] * 2))
    assert held["--lr"] == "0.1" and held["--val-split"] == "0.1"


@pytest.mark.fast
def test_one_learning_rate_per_row_trains_each_row_once_in_the_order_given(tmp_path, monkeypatch):
    planned = []
    monkeypatch.setattr(experiments, "run_grid_stoppable", lambda runs, *a, **k: planned.extend(runs) or
                        [{"run_id": r.run_id, "status": "completed"} for r in runs])
    rates = "bn_lrelu=0.01,bn=0.001,bn_maxnorm=0.001,lrelu=0.001,maxnorm=0.001,lrelu_maxnorm=0.001,bn_lrelu_maxnorm=0.1"
    experiments.main(["ablation", "--epochs", "3", "--out", str(tmp_path / "t2"), "--lr-per-row", rates])
    assert [r.run_id for r in planned] == [f"plain-d100-s0-{pair.replace('=', '-lr')}" for pair in rates.split(",")]
    for run, pair in zip(planned, rates.split(",")):
        flags = dict(zip(run.flags[::2], run.flags[1::2]))
        assert flags["--lr"] == pair.split("=")[1] and flags["--val-split"] == "0"  # the whole training split
    assert dict(zip(planned[0].flags[::2], planned[0].flags[1::2]))["--activation"] == "lrelu"
    assert "| BN + LReLU + max-norm | 0.1 |" in (tmp_path / "t2" / "ablation.md").read_text()


@pytest.mark.fast
def test_the_table_so_far_trains_nothing(tmp_path, capsys):
    rates = "bn_lrelu=0.01,bn=0.001,bn_maxnorm=0.001,lrelu=0.001,maxnorm=0.001,lrelu_maxnorm=0.001,bn_lrelu_maxnorm=0.1"
    stopped = tmp_path / "t2" / "runs" / "plain-d100-s0-lrelu-lr0.001" / "version_0"
    stopped.mkdir(parents=True)
    (stopped / "summary.json").write_text(json.dumps({"status": "preempted", "epochs_done": 130}))
    (stopped / "checkpoints").mkdir()
    torch.save({"epoch": 130}, stopped / "checkpoints" / "last.ckpt")  # the step it was stopped at
    # a resumed row training now: its last.ckpt is ahead of the summary its stop wrote
    resumed = tmp_path / "t2" / "runs" / "plain-d100-s0-bn_maxnorm-lr0.001" / "version_0"
    (resumed / "checkpoints").mkdir(parents=True)
    (resumed / "summary.json").write_text(json.dumps({"status": "preempted", "epochs_done": 100}))
    torch.save({"epoch": 160}, resumed / "checkpoints" / "last.ckpt")
    # a row training for the first time: a checkpoint, no summary yet
    first = tmp_path / "t2" / "runs" / "plain-d100-s0-maxnorm-lr0.001" / "version_0"
    (first / "checkpoints").mkdir(parents=True)
    torch.save({"epoch": 42}, first / "checkpoints" / "last.ckpt")
    assert experiments.main(["ablation", "--epochs", "300", "--out", str(tmp_path / "t2"), "--lr-per-row", rates,
                             "--table-only"]) == 1  # not every row finished
    table = (tmp_path / "t2" / "ablation.md").read_text()
    assert "| LReLU | 0.001 | preempted after 130 epochs | preempted after 130 epochs |" in table
    assert "| BN + max-norm | 0.001 | unfinished after 160 epochs |" in table
    assert "| Max-norm | 0.001 | unfinished after 42 epochs |" in table
    assert "| BN | 0.001 | not started | not started |" in table
    assert sorted(p.name for p in (tmp_path / "t2" / "runs").iterdir()) == [
        "plain-d100-s0-bn_maxnorm-lr0.001", "plain-d100-s0-lrelu-lr0.001", "plain-d100-s0-maxnorm-lr0.001"]
    assert experiments.main(["diagnostics", "--epochs", "3", "--out", str(tmp_path / "d"), "--table-only"]) == 2
    assert "--table-only tabulates the ablation" in capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize("rates, says", [
    ("bn=0.01", "must give a rate for every ablation configuration: missing bn_lrelu"),
    ("naive=0.01,bn=0.01,proposed=0.1,extra=0.1", "unknown extra; missing none"),
])
def test_a_rate_per_row_must_name_every_row(tmp_path, capsys, rates, says):
    experiment = "ablation" if rates.startswith("bn=") else "diagnostics"
    assert experiments.main([experiment, "--epochs", "3", "--out", str(tmp_path / "x"), "--lr-per-row", rates]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.fast
def test_a_rate_per_row_and_a_grid_exclude_each_other(tmp_path, capsys):
    assert experiments.main(["diagnostics", "--epochs", "3", "--out", str(tmp_path / "x"), "--lrs", "0.1",
                             "--lr-per-row", "naive=0.01,bn=0.01,proposed=0.1"]) == 2
    assert "--lrs and --lr-per-row both set the learning rates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        experiments.main(["diagnostics", "--epochs", "3", "--out", str(tmp_path / "x"), "--lr-per-row", "bn=x"])
    assert "expected ROW=LR pairs" in capsys.readouterr().err


def test_after_training_measures_the_train_split_in_eval_mode_and_the_best_epoch(tmp_path, capsys):
    assert main(["--model", "plain", "--depth", "3", "--width", "16", "--dataset", "usps", "--epochs", "3",
                 "--limit-train-batches", "4", "--val-split", "0", "--diagnostics", "none", "--logdir",
                 str(tmp_path), "--name", "r", "--no-progress"]) == 0
    run_dir = next((tmp_path / "r").glob("version_*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "validation metrics are measured on the TEST set" in capsys.readouterr().err  # the run says so
    measured = experiments.after_training({"status": "completed", "run_dir": str(run_dir)})
    assert "TEST set" not in capsys.readouterr().err  # reading its checkpoint for the table does not, again
    errors = curves.read_curves(run_dir)["eval_error"]
    assert measured["best_epoch"] == min(errors, key=lambda p: p[1])[0] and len(errors) == 3
    assert measured["best_val_acc"] == pytest.approx(max(1 - e for _, e in errors))
    assert 1 - errors[-1][1] == pytest.approx(summary["test_acc"], abs=1e-6)  # the test split was the eval split
    # independently: the checkpoint in eval mode on every training image, batch by batch
    module = experiments.module_class("plain").load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    module.eval()
    dm = get_datamodule("usps", data_dir=summary["data_root"], val_split=0.0, batch_size=500)
    dm.setup()
    with torch.no_grad():
        hits = sum((module(x).argmax(1) == y).sum().item() for x, y in dm.test_dataloader())
    assert hits / 2007 == pytest.approx(summary["test_acc"], abs=1e-6)  # the same reading of the data as the run's
    x, y = dm.probe_batch(10_000, split="train")
    assert len(y) == 7291
    with torch.no_grad():
        hits = sum((module(xb).argmax(1) == yb).sum().item() for xb, yb in zip(x.split(500), y.split(500)))
    assert measured["train_acc_eval"] == pytest.approx(hits / 7291, abs=1e-6)
    assert experiments.after_training({"status": "diverged", "run_dir": str(run_dir)}) == {}


@pytest.mark.slow
def test_diagnostics_with_a_grid_end_to_end(tmp_path):
    assert experiments.main(["diagnostics", "--depth", "4", "--epochs", "1", "--lrs", "0.01,0.1", "--out",
                             str(tmp_path), "--", "--width", "16", "--limit-train-batches", "2"]) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [f"plain-d4-s0-{v}-lr{lr}" for v in ("bn", "naive", "proposed") for lr in ("0.01", "0.1")]
    config = json.loads(next((tmp_path / "runs" / "plain-d4-s0-bn-lr0.01").glob("*/config.json")).read_text())
    assert config["weight_decay"] == 1e-4 and config["val_split"] == 0.1 and config["width"] == 16
    summary = json.loads((tmp_path / "diagnostics.json").read_text())
    assert set(summary) == {"naive", "bn", "proposed"} and all(v["lr"] in (0.01, 0.1) for v in summary.values())
    assert {p.name for p in (tmp_path / "figures").iterdir()} >= {"mean_abs_activation.png", "responses_layer3.png"}


def test_analyse_and_diagnostic_figures_on_a_tiny_run(tmp_path):
    for variant, flags in experiments.VARIANTS.items():
        assert main(["--model", "plain", "--depth", "4", "--width", "16", "--dataset", "usps", "--epochs", "1",
                     "--limit-train-batches", "3", "--limit-val-batches", "1", "--diagnostics", "none", "--logdir",
                     str(tmp_path / "runs"), "--name", variant, "--no-progress", *to_argv(flags)]) == 0
    results = {v: experiments.analyse(next((tmp_path / "runs" / v).glob("*/checkpoints/last.ckpt")), max_samples=500)
               for v in experiments.VARIANTS}
    for result in results.values():
        assert len(result["stats"]) == 4 and len(result["weights"]) == 4 and result["samples"] == 500
        assert result["responses"][2].shape == (500, 16)
        assert all(math.isfinite(s["mean_abs"]) for s in result["stats"].values())
    naive = results["naive"]["stats"]
    assert all(s["frac_zero"] > 0 for s in naive.values())  # ReLU zeros
    paths = experiments.diagnostic_figures(results, tmp_path / "fig", layers=(2, 3))
    assert {p.name for p in paths} == {"mean_abs_activation.png", "max_abs_activation.png", "weight_condition_inf.png",
                                       "share_above_0.05.png", "responses_layer2.png", "responses_layer3.png"}


@pytest.mark.fast
def test_parallel_runs_share_the_cores(monkeypatch):
    monkeypatch.setattr(sweeps, "cpu_cores", lambda: 4)
    assert sweeps.threads_per_run(2, environ={}) == (2, "each run uses 2 of the 4 CPU cores (--parallel 2; "
                                                       "--threads-per-run N to choose)")
    assert sweeps.threads_per_run(3, environ={})[0] == 1 and sweeps.threads_per_run(8, environ={})[0] == 1
    assert sweeps.threads_per_run(1, environ={}) == (None, "")  # alone: torch's default, every core
    assert sweeps.threads_per_run(2, requested=3, environ={})[0] == 3
    assert sweeps.threads_per_run(2, environ={"OMP_NUM_THREADS": "1"})[0] is None  # the user's own setting stays


FAKE_TRAINING = """import json, os, sys
from pathlib import Path
args = sys.argv[3:]
run = Path(args[args.index("--logdir") + 1]) / args[args.index("--name") + 1] / "version_0"
run.mkdir(parents=True)
threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
(run / "summary.json").write_text(json.dumps({"status": "completed", "threads": threads}))
"""


def test_each_run_of_a_parallel_sweep_gets_its_thread_share(tmp_path, monkeypatch):
    fake = tmp_path / "fake_python.py"
    fake.write_text(FAKE_TRAINING)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setattr(sweeps, "cpu_cores", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    said = []
    runs = grid(["plain"], [1, 2], [0], [], [])
    sweeps.run_grid(runs, tmp_path / "out", "usps", 1, parallel=2, python=str(python), echo=said.append)
    assert said[0] == "each run uses 1 of the 2 CPU cores (--parallel 2; --threads-per-run N to choose)"
    for run in runs:
        summary = json.loads(next((tmp_path / "out" / "runs" / run.run_id).glob("*/summary.json")).read_text())
        assert summary["threads"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
