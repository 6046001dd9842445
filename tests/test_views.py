"""What a person reading a run sees: few tags, an overview first, depth x time images that grow, a tidy
table with every value, a report that remembers, the end of a run in the terminal, and other loggers."""
import csv
import io
import json
import logging
import math
import statistics
import sys

import lightning as L
import numpy as np
import pytest
from deepplain.callbacks.verdict import TAG as VERDICT_TAG
import torch
from conftest import fit, read_events
from deepplain.callbacks import (
    ActivationSaturationMonitor,
    ConditionNumberProbe,
    GradientFlowMonitor,
    MaxNormConstraint,
    figures,
)
from deepplain.callbacks.condition import spread_order
from deepplain.callbacks.probe_batch import untrained_norms_use_batch_stats
from deepplain.callbacks.records import SINGULAR_LOG10_KAPPA, DepthTimeRecord, DiagnosticsTable, FindingsLog
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2
from torch import nn

from deepplain.cli import CurrentStderrHandler, main
from deepplain.report import trainability_findings
from deepplain.runtime import RunProgressBar
from tests.foreign import ForeignMLP, loaders


def table_rows(folder):
    with open(folder / "diagnostics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def values(rows, statistic, step, callback):
    return {r["layer"]: float(r["value"]) for r in rows
            if r["statistic"] == statistic and int(r["step"]) == step and r["callback"] == callback}


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    """A 100-layer MLP (8 units wide: cheap) with every diagnostic and max-norm, 1 epoch of 14 steps."""
    runs = tmp_path_factory.mktemp("deep") / "runs"
    out = io.StringIO()
    stdout, sys.stdout = sys.stdout, out
    try:
        code = main(["--model", "plain", "--depth", "100", "--width", "8", "--dataset", "usps", "--epochs", "1",
                     "--limit-train-batches", "14", "--max-norm", "3", "--logdir", str(runs), "--no-progress"])
    finally:
        sys.stdout = stdout
    assert code == 0
    run = next(runs.glob("*/version_0"))
    return run, read_events(run), out.getvalue()


def test_a_hundred_layer_run_writes_at_most_100_tags_and_loses_no_value(deep_run):
    run, acc, _ = deep_run
    tags = acc.Tags()["scalars"]
    assert len(tags) <= 100, len(tags)
    assert not [t for t in tags if t.count("/") >= 3 and "depth_" not in t]  # no per-layer tags by default
    for tag in ("overview/layers_vanished", "overview/layers_exploded", "overview/layers_dead",
                "overview/layers_singular", "overview/worst_log10_kappa", "overview/max_norm_rescaled",
                "saturation/depth_max/max_abs", "grad_flow/depth_median/norm", "condition/depth_max/log10_kappa"):
        assert tag in tags, tag
    rows = table_rows(run)
    assert list(rows[0]) == ["step", "callback", "statistic", "layer", "value"]
    first = values(rows, "train/max_abs", 0, "saturation")
    assert len(first) == 100  # one row per layer of the 100-layer net
    # the depth quantile scalar is the table's values summarised
    logged = {e.step: e.value for e in acc.Scalars("saturation/depth_max/max_abs")}
    assert logged[0] == pytest.approx(max(first.values()), rel=1e-6)
    median = {e.step: e.value for e in acc.Scalars("saturation/depth_median/mean_abs")}
    assert median[0] == pytest.approx(statistics.median(values(rows, "train/mean_abs", 0, "saturation").values()),
                                      rel=1e-6)
    # every sampled step of every callback is in the table
    table_steps = {int(r["step"]) for r in rows if r["callback"] == "grad_flow"}
    assert table_steps == {e.step for e in acc.Scalars("grad_flow/depth_max/norm")}
    kappas = values(rows, "kappa", 0, "condition")
    assert len(kappas) == 100
    assert {e.step: e.value for e in acc.Scalars("condition/depth_max/log10_kappa")}[0] == pytest.approx(
        max(math.log10(k) if math.isfinite(k) else SINGULAR_LOG10_KAPPA for k in kappas.values()), rel=1e-6)


def test_depth_time_images_overview_png_and_custom_scalars_order(deep_run):
    run, acc, _ = deep_run
    images = acc.Tags()["images"]
    for stat in ("mean_abs", "max_abs", "frac_low", "frac_high", "frac_dead"):
        assert f"saturation/depth_time/{stat}" in images
    for tag in ("condition/depth_time/log10_kappa", "condition/depth_time/collinearity", "grad_flow/depth_time/norm",
                "max_norm/depth_time/rescaled", "saturation/probe/profile", "condition/profile"):
        assert tag in images, tag
    encoded = acc.Images("saturation/depth_time/max_abs")[-1].encoded_image_string
    image = Image.open(io.BytesIO(encoded))
    assert image.width == 490 and image.height >= 300  # a card's width: its 16-17 px type stays legible
    overview = Image.open(run / "overview.png")
    assert overview.width == 2 * 490 and overview.height >= 3 * image.height  # 2 per row, >= 5 images
    raw = b"".join(p.read_bytes() for p in run.glob("events.out.tfevents.*"))
    assert raw.index(b"overview") < raw.index(b"training") < raw.index(b"saturation")  # categories in this order


def test_summary_and_terminal_say_how_the_run_ended(deep_run):
    run, acc, printed = deep_run
    summary = json.loads((run / "summary.json").read_text())
    findings = summary["diagnostics"]["findings"]
    assert set(findings) == {"vanished", "exploded", "dead", "singular", "ill-conditioned"}
    for row in findings.values():
        assert set(row) == {"rule", "worst", "final"} and row["final"]["step"] >= 0
    assert "tensorboard --logdir " + str(run) in printed and f"run folder: {run}" in printed
    assert "test" in printed and f"{summary['test_acc']:.2%}" in printed
    assert "hparam/test_acc" in acc.Tags()["scalars"]  # the HParams dashboard's metric
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert {"model", "depth", "width", "dataset", "lr", "seed"} <= set(start.hparams)
    assert "alpha_mode" not in start.hparams and start.hparams["depth"].number_value == 100  # a plain run
    # every option of what is trained is a column (label smoothing too); the plumbing is not
    assert {"label_smoothing", "val_split", "nesterov"} <= set(start.hparams)
    assert not {"logdir", "num_workers", "progress", "data_dir"} & set(start.hparams)


CONDITION_OVERVIEW = ("overview/layers_singular", "overview/worst_log10_kappa")


def test_overview_has_ten_points_in_a_200_step_run_and_alpha_every_percent(runs):
    """228 steps of a fast VAN: the ten samples saturation takes whatever its budget give its overview scalars at
    least ten points, the condition probe's the first and last; alpha's residual is logged at least every 1% of
    the run."""
    assert main(["--model", "van", "--arch", "mlp", "--depth", "10", "--width", "16", "--dataset", "usps",
                 "--epochs", "4", "--max-norm", "3", "--logdir", str(runs), "--no-progress"]) == 0
    run = next(runs.glob("*/version_0"))
    acc = read_events(run)
    total = 4 * 52  # 6,564 training images (val_split 0.1), batch 128
    overview = [t for t in acc.Tags()["scalars"] if t.startswith("overview/")]
    assert {"overview/alpha_residual", "overview/alpha_share_removed", "overview/layers_singular"} <= set(overview)
    for tag in overview:
        if tag == VERDICT_TAG:  # one verdict, at its step (2% of 208 steps, at least 50)
            assert [(e.step, e.value in (-1.0, 0.0, 1.0)) for e in acc.Scalars(tag)] == [(50, True)]
            continue
        assert len(acc.Scalars(tag)) >= (2 if tag in CONDITION_OVERVIEW else 10), (tag, len(acc.Scalars(tag)))
    steps = [e.step for e in acc.Scalars("alpha/residual")]
    assert max(b - a for a, b in zip(steps, steps[1:])) <= max(1, total // 100)
    rows = table_rows(run)
    condition_steps = sorted({int(r["step"]) for r in rows if r["callback"] == "condition"})
    assert condition_steps[0] == 0 and condition_steps[-1] == total
    saturation_steps = {int(r["step"]) for r in rows if r["statistic"] == "train/max_abs"}
    assert len(saturation_steps) >= 10


def test_per_layer_scalars_flag_adds_one_tag_per_layer_matching_the_table(runs):
    assert main(["--model", "plain", "--depth", "4", "--width", "8", "--dataset", "usps", "--epochs", "1",
                 "--limit-train-batches", "6", "--per-layer-scalars", "--logdir", str(runs), "--no-progress"]) == 0
    run = next(runs.glob("*/version_0"))
    acc, rows = read_events(run), table_rows(run)
    layer = "model.features.2.act"
    logged = {e.step: e.value for e in acc.Scalars(f"saturation/train/mean_abs/{layer}")}
    assert logged[0] == pytest.approx(values(rows, "train/mean_abs", 0, "saturation")[layer], rel=1e-6)
    assert f"condition/log10_kappa/{layer}" in acc.Tags()["scalars"]
    assert f"condition/kappa/{layer}" not in acc.Tags()["scalars"]  # raw kappa only in the table (inf)


class ZeroLayerMLP(ForeignMLP):
    """A ForeignMLP whose second layer outputs zeros: a singular representation from the start."""

    def __init__(self):
        super().__init__(depth=3, width=16)
        with torch.no_grad():
            self.body[2].weight.zero_()
            self.body[2].bias.zero_()
        self.body[2].weight.requires_grad_(False)
        self.body[2].bias.requires_grad_(False)


def test_a_singular_layer_is_shown_as_17_and_counted_not_dropped(tmp_path):
    probe = ConditionNumberProbe(every_n_steps=2, max_overhead=None, per_layer_scalars=True)
    fit(ZeroLayerMLP(), [probe], tmp_path, steps=3)
    acc = read_events(tmp_path)
    assert [e.value for e in acc.Scalars("condition/log10_kappa/body.3")][0] == SINGULAR_LOG10_KAPPA
    assert [e.value for e in acc.Scalars("overview/layers_singular")][0] >= 1
    assert [e.value for e in acc.Scalars("overview/worst_log10_kappa")][0] == SINGULAR_LOG10_KAPPA
    rows = table_rows(next((tmp_path / "tb").glob("version_*")))
    assert values(rows, "kappa", 0, "condition")["body.3"] == math.inf
    assert probe.findings.worst["singular"]["layers"][0] == "body.3"  # (and the layers after it: constant input)


@pytest.mark.fast
def test_probe_normalises_with_batch_statistics_until_batch_norm_has_seen_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    x = torch.randn(64, 6) * 3 + 2
    net.eval()
    with torch.no_grad(), untrained_norms_use_batch_stats(net) as used:
        out = net[1](net[0](x))
    assert used == [net[1]]
    h = net[0](x).detach()
    expected = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps)
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(net[1].running_mean, torch.zeros(5)) and int(net[1].num_batches_tracked) == 0  # untouched
    net.train()
    net(x)  # training has now updated the running statistics: the probe uses them
    net.eval()
    with torch.no_grad(), untrained_norms_use_batch_stats(net) as used:
        assert used == []


class BatchNormMLP(ForeignMLP):
    def __init__(self):
        super().__init__(depth=2, width=16)
        self.body = nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())


def test_the_table_says_which_probe_used_batch_statistics(tmp_path):
    fit(BatchNormMLP(), [ConditionNumberProbe(every_n_steps=2, max_overhead=None)], tmp_path, steps=3)
    rows = table_rows(next((tmp_path / "tb").glob("version_*")))
    marked = sorted(int(r["step"]) for r in rows if r["statistic"] == "bn_batch_statistics")
    assert marked == [0]  # the first probe only: by step 2 the running statistics have seen data


@pytest.mark.fast
def test_findings_keep_the_worst_sample_and_the_last():
    log = FindingsLog()
    log.update(0, "training batch", {"exploded": []})
    log.update(52, "training batch", {"exploded": [f"l{i}" for i in range(47)]})
    log.update(228, "probe", {"exploded": ["l1"]})
    assert log.worst["exploded"]["step"] == 52 and log.worst["exploded"]["count"] == 47
    assert log.final["exploded"] == {"step": 228, "source": "probe", "count": 1, "layers": ["l1"]}
    restored = FindingsLog()
    restored.load_state_dict(log.state_dict())
    assert restored.worst == log.worst


def test_report_keeps_what_a_warning_said(tmp_path):
    # every layer explodes
    monitor = ActivationSaturationMonitor(every_n_steps=1, max_overhead=None, low=1e-4, high=1e-3)
    fit(ForeignMLP(), [monitor], tmp_path, steps=2, logger=False)
    report = trainability_findings([monitor])
    assert report["findings"]["exploded"]["worst"]["count"] == 4
    assert any("exploded" in m["message"] and m["step"] == 0 for m in report["messages"])


@pytest.mark.fast
def test_depth_time_record_keeps_first_and_last_and_stays_bounded():
    record = DepthTimeRecord()
    for step in range(1000):
        record.add("max_abs", step, {"a": float(step), "b": 1.0}, fresh={"a"} if step % 2 else None)
    layers, steps, data, measured, _ = record.matrix("max_abs")
    assert layers == ["a", "b"] and steps[0] == 0 and steps[-1] == 999 and len(steps) <= DepthTimeRecord.MAX_COLUMNS
    assert list(data[0]) == [float(s) for s in steps]
    assert measured[0].all() and not measured[1][[s % 2 == 1 for s in steps]].any()


@pytest.mark.fast
def test_table_of_a_resumed_run_drops_the_rows_measured_again(tmp_path):
    class Trainer:
        global_rank, global_step = 0, 0
        loggers = [CSVLogger(str(tmp_path), name="", version="")]  # its run folder: tmp_path itself
    first = Trainer()
    table = DiagnosticsTable.shared(first)
    for step in range(10):
        table.write(step, "saturation", "train/max_abs", {"a": step, "b,c": float("inf")})
    DiagnosticsTable.close_for(first)
    resumed = Trainer()
    resumed.global_step = 5
    DiagnosticsTable.shared(resumed).write(5, "saturation", "train/max_abs", {"a": 50.0})
    DiagnosticsTable.close_for(resumed)
    rows = table_rows(tmp_path)
    assert [int(r["step"]) for r in rows if r["layer"] == "a"] == [0, 1, 2, 3, 4, 5]
    assert {r["value"] for r in rows if r["layer"] == "b,c"} == {"inf"}  # a comma in a name stays in its cell


def test_csv_logger_gets_scalars_and_png_figures(tmp_path):
    torch.manual_seed(0)
    train, val = loaders("mlp")
    callbacks = [ActivationSaturationMonitor(every_n_steps=2, max_overhead=None),
                 ConditionNumberProbe(every_n_steps=2, max_overhead=None),
                 GradientFlowMonitor(every_n_steps=2, max_overhead=None), MaxNormConstraint(3.0)]
    loggers = [CSVLogger(str(tmp_path), name="csv"), TensorBoardLogger(str(tmp_path), name="tb")]
    trainer = L.Trainer(max_steps=4, accelerator="cpu", callbacks=callbacks, logger=loggers,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(ForeignMLP(), train, val)
    folder = next((tmp_path / "csv").glob("version_*"))
    with open(folder / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert "overview/layers_vanished" in header and "grad_flow/depth_max/norm" in header
    pngs = {str(p.relative_to(folder / "figures")) for p in (folder / "figures").rglob("*.png")}
    assert {"saturation/depth_time/max_abs.png", "condition/depth_time/log10_kappa.png",
            "grad_flow/profile.png"} <= pngs
    assert (folder / "diagnostics.csv").is_file() and (folder / "overview.png").is_file()
    assert "saturation/depth_time/max_abs" in read_events(next((tmp_path / "tb").glob("version_*"))).Tags()["images"]


@pytest.mark.fast
def test_depth_time_image_shows_inf_nan_held_and_unmeasured_cells():
    data = np.array([[1.0, np.inf, 0.2], [np.nan, 0.5, np.nan]])
    measured = np.array([[True, True, True], [True, False, False]])
    image = figures.depth_time(data, ["a", "b"], [0, 10, 20], "t", vmin=0, vmax=1, measured=measured,
                               thresholds={"mid": 0.5})
    assert image.shape[1] == 490  # sized for a TensorBoard card
    left, top, width, height = 58, 56, 280, 150
    cell = lambda r, c: tuple(int(v) for v in image[top + int((r + 0.5) * height / 2),  # noqa: E731
                                                    left + int((c + 0.5) * width / 3)])
    assert cell(0, 1) == (0, 0, 0)          # inf: black
    assert cell(1, 0) == (230, 0, 230)      # a measured NaN: magenta
    assert cell(1, 2) == (255, 255, 255)    # not measured, nothing earlier: white
    held = cell(1, 1)                       # not measured at this sample, a value from earlier: faded
    assert held != (255, 255, 255) and min(held) >= 0.65 * 255
    assert min(cell(0, 0)) < 0.65 * 255     # measured: full colour


def test_progress_bar_shows_the_run_version_and_log_lines_go_to_the_current_stderr(tmp_path, monkeypatch):
    train, _ = loaders("mlp")
    bar = RunProgressBar()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", callbacks=[bar], enable_model_summary=False,
                        enable_checkpointing=False, logger=TensorBoardLogger(str(tmp_path), version="version_12"))
    module = ForeignMLP()
    trainer.fit(module, train)
    assert bar.get_metrics(trainer, module)["v_num"] == "12"
    handler = CurrentStderrHandler()
    replaced = io.StringIO()
    monkeypatch.setattr(sys, "stderr", replaced)  # what rich's live display does while it draws
    handler.emit(logging.LogRecord("deepplain", logging.INFO, __file__, 1, "postponed", None, None))
    assert "postponed" in replaced.getvalue()


def test_a_rotating_condition_sample_measures_a_block_and_stops_the_probe_there(tmp_path):
    """Intermediate samples take the next block of layers_per_sample consecutive layers and stop the probe
    forward after it: the classifier sees the probe only at the full first and last samples."""
    module = ForeignMLP(depth=12, width=8)
    probe_calls = []
    module.head.register_forward_hook(lambda m, i, o: probe_calls.append(1) if not m.training else None)
    probe = ConditionNumberProbe(every_n_steps=1, max_overhead=None, layers_per_sample=4, probe_size=64)
    train, _ = loaders()
    L.Trainer(max_steps=5, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="tb"),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[probe]).fit(module, train)
    # step 4 is the last step: its sample is the one after the last update, step 5
    assert probe.sampled_steps == [0, 1, 2, 3, 5] and len(probe_calls) == 2  # steps 0 and 5 ran to the end
    rows = table_rows(next((tmp_path / "tb").glob("version_*")))
    relus = [f"body.{2 * i + 1}" for i in range(12)]
    blocks = [sorted(values(rows, "kappa", step, "condition"), key=relus.index) for step in range(1, 4)]
    assert blocks == [relus[0:4], relus[4:8], relus[8:12]]
    assert len(values(rows, "kappa", 0, "condition")) == len(values(rows, "kappa", 5, "condition")) == 12
    assert spread_order(13) == [0, 6, 3, 9, 1, 8, 4, 11, 7, 10, 2, 5, 12] and spread_order(1) == [0]
