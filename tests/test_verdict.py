"""The early verdict: its step, the samples the diagnostics take for it, each rule on hand-built samples, the
drop-in callback (decides, logs, stops when asked, refuses to run without what it reads), the eval-mode findings
it must not mistake for failures, and the corpus's label and scoring arithmetic."""
import csv
import json
import re
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepplain.callbacks import (ActivationSaturationMonitor, DiagnosticWarning, GradientFlowMonitor,
                                 TrainabilityVerdict)
from deepplain.callbacks.figures import heat_image
from deepplain.callbacks.sampling import SamplingSchedule
from deepplain.callbacks.verdict_rules import THRESHOLDS, Samples, decide
from deepplain.callbacks.verdict_step import early_steps, verdict_step
from deepplain.status import FINISHED, RunStatus
from deepplain.verdicts.corpus import GROUPS, group_runs, label
from deepplain.verdicts.scoring import Record, fit_loss_rule, loss_word, read_rows, wilson
from tests.foreign import ForeignMLP

LAYERS = [f"layer{i}" for i in range(10)]


# -- when -----------------------------------------------------------------------------------------------------
@pytest.mark.fast
@pytest.mark.parametrize("total, at, expected", [(1140, None, 50), (17100, None, 300), (5000, None, 100),
                                                 (30, None, 29), (None, None, 300), (50, 80, 49), (1000, 7, 7)])
def test_verdict_step_rule(total, at, expected):
    assert verdict_step(total, at) == expected


@pytest.mark.fast
def test_the_schedule_takes_four_samples_by_the_verdict_step_of_a_long_run():
    schedule = SamplingSchedule(num_samples=20)
    long_run = SimpleNamespace(estimated_stepping_batches=17100, log_every_n_steps=50)
    schedule.start(long_run)
    assert [s for s in schedule.planned_steps() if s <= 300] == [0]  # no verdict: the spread alone, one every 900
    schedule.serves_verdict = True
    schedule.start(long_run)
    assert [s for s in schedule.planned_steps() if s <= 300] == [0, 75, 150, 300] == early_steps(300)
    assert all(schedule.due(s) for s in (75, 150, 300))


@pytest.mark.fast
def test_early_samples_are_never_postponed_by_the_budget():
    monitor = ActivationSaturationMonitor(max_overhead=0.01)
    monitor.schedule.serves_verdict = True
    monitor.schedule.start(SimpleNamespace(estimated_stepping_batches=17100, log_every_n_steps=50))
    monitor.samples_taken = 1
    assert monitor.is_mandatory(75) and monitor.is_mandatory(300) and not monitor.is_mandatory(76)


# -- the rules, on hand-built samples ---------------------------------------------------------------------------
def samples(mean_abs=1.0, dead=0.0, max_abs=2.0, losses=(2.3, 2.0, 1.5, 1.0), grads=None, near_zero=None,
            vanished_from=0, steps=(0, 12, 25, 50)):
    """Samples at ``steps`` of 10 layers; ``mean_abs`` applies from step ``vanished_from`` on (1.0 before)."""
    rows = []
    for i, step in enumerate(steps):
        for n in LAYERS:
            rows.append((step, "saturation", "train/mean_abs", n, mean_abs if step >= vanished_from else 1.0))
            rows.append((step, "saturation", "train/frac_dead", n, dead))
            rows.append((step, "saturation", "train/max_abs", n, max_abs))
            rows.append((step, "grad_flow", "norm", n, (grads or {}).get(n, 1.0)))
            if near_zero is not None:
                rows.append((step, "condition", "near_zero", n, near_zero))
        if losses is not None:
            rows.append((step, "verdict", "train_loss", "", losses[i]))
    return Samples(rows)


STALLED, LEARNING = (2.30, 2.30, 2.29, 2.28), (2.3, 1.8, 1.2, 0.9)


@pytest.mark.fast
def test_vanished_layers_and_a_stalled_loss_fail_with_the_numbers_in_words():
    v = decide(samples(mean_abs=0.01, losses=STALLED), 50)
    assert v.word == "fails"
    assert "10 of 10 layers vanished (mean |a| < 0.05) in every sample since step 12" in v.reasons
    assert any("training loss at 99% of step 0's" in r for r in v.reasons)


@pytest.mark.fast
def test_a_vanishing_at_initialisation_that_recovers_is_not_a_pathology():
    v = decide(samples(mean_abs=1.0, losses=LEARNING), 50)
    assert v.word == "trains"
    transient = samples(losses=LEARNING)
    transient.table[("saturation", "train/mean_abs")][0] = dict.fromkeys(LAYERS, 0.01)  # only at step 0
    assert decide(transient, 50).word == "trains"


@pytest.mark.fast
def test_no_pathology_and_a_falling_loss_train():
    assert decide(samples(losses=LEARNING), 50).word == "trains"


@pytest.mark.fast
def test_no_pathology_and_a_stalled_loss_is_unsure():
    v = decide(samples(losses=STALLED), 50)
    assert v.word == "unsure" and "no layer pathology, but training loss" in v.reasons[0]


@pytest.mark.fast
def test_a_pathology_while_the_loss_falls_is_unsure():
    v = decide(samples(mean_abs=0.01, losses=LEARNING), 50)
    assert v.word == "unsure" and v.reasons[0].startswith("10 of 10 layers vanished")


@pytest.mark.fast
@pytest.mark.parametrize("kwargs, words", [
    (dict(dead=0.9), "dead (more than 50% of units never fire)"), (dict(max_abs=80.0), "exploded (max |a| > 50)"),
    (dict(near_zero=0.6), "10 of 10 layers have collapsed representations (at least 50% of singular values near zero)"),
    (dict(grads={"layer0": 1e-7}), "gradient vanishes: at the first layer 1.0e-07 of the last layer's at step 50"),
    (dict(grads={"layer0": 500.0}), "gradient explodes: at the first layer 500 times the last layer's at step 50")])
def test_each_pathology_with_a_stalled_loss_fails(kwargs, words):
    v = decide(samples(losses=STALLED, **kwargs), 50)
    assert v.word == "fails" and any(words in r for r in v.reasons), v.reasons


@pytest.mark.fast
def test_a_few_layers_are_not_a_pathology_of_the_network():
    s = samples(losses=STALLED, near_zero=0.0)
    for step in s.table[("saturation", "train/frac_dead")]:
        s.table[("saturation", "train/frac_dead")][step].update(dict.fromkeys(LAYERS[:2], 0.9))
    s.table[("condition", "near_zero")][50].update(dict.fromkeys(LAYERS[:2], 0.9))
    assert decide(s, 50).word == "unsure"
    assert decide(s, 50).signals["dead_share"] == pytest.approx(0.2)
    assert decide(s, 50).signals["collapsed_share"] == pytest.approx(0.2)


@pytest.mark.fast
@pytest.mark.parametrize("kwargs, words", [(dict(grads={n: 1e-12 for n in LAYERS}), "no gradient"),
                                           (dict(dead=1.0), "10 of 10 layers dead")])
def test_a_net_that_cannot_learn_any_more_fails_whatever_its_loss_did(kwargs, words):
    v = decide(samples(losses=LEARNING, **kwargs), 50)
    assert v.word == "fails" and any(words in r for r in v.reasons), v.reasons


@pytest.mark.fast
def test_a_threshold_can_be_overridden_for_fitting_and_is_otherwise_the_table():
    s = samples(losses=(2.3, 2.2, 2.1, 2.0))  # 87% of step 0's
    assert decide(s, 50).word == ("trains" if 2.0 / 2.3 <= THRESHOLDS["loss_learning"].value else "unsure")
    assert decide(s, 50, {"loss_learning": 0.9}).word == "trains"
    assert decide(s, 50, {"loss_learning": 0.5}).word == "unsure"


@pytest.mark.fast
def test_without_a_loss_a_pathology_is_unsure_and_says_why():
    v = decide(samples(mean_abs=0.01, losses=None), 50)
    assert v.word == "unsure" and any("no training loss seen" in r for r in v.reasons)


@pytest.mark.fast
def test_every_threshold_says_where_it_comes_from():
    assert all(t.source and isinstance(t.value, float) for t in THRESHOLDS.values())


# -- the drop-in callback ---------------------------------------------------------------------------------------
def learnable(n=256, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    y = x[:, :4].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def vanishing_mlp(depth=20):
    """A deep ReLU MLP with weights far too small: its activations vanish and its loss cannot move."""
    module = ForeignMLP(depth=depth, lr=0.001)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.05)
    return module


def fit(module, verdict, tmp_path, steps=40, extra=()):
    logger = CSVLogger(tmp_path, name="run")
    trainer = L.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[verdict, ActivationSaturationMonitor(),
                                                               GradientFlowMonitor(), *extra])
    trainer.fit(module, learnable())
    return trainer


def rows_of(trainer, callback="verdict"):
    folder = trainer.loggers[0].log_dir
    with open(f"{folder}/diagnostics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["callback"] == callback]


def test_a_vanishing_net_gets_fails_at_its_step_and_stops_when_asked(tmp_path):
    verdict = TrainabilityVerdict(at_step=8, stop_if_fails=True)
    trainer = fit(vanishing_mlp(), verdict, tmp_path)
    assert verdict.verdict.word == "fails" and verdict.stopped
    assert trainer.global_step == 9  # the step after the verdict's: it ends there
    assert any("vanished" in r for r in verdict.verdict.reasons)
    rows = rows_of(trainer)
    assert [(r["step"], r["statistic"]) for r in rows] == [("0", "train_loss"), ("2", "train_loss"),
                                                           ("4", "train_loss"), ("8", "train_loss"), ("8", "code")]
    assert float(rows[-1]["value"]) == -1.0
    with open(f"{trainer.loggers[0].log_dir}/metrics.csv", newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("overview/verdict")]
    assert [(r["step"], float(r["overview/verdict"])) for r in logged] == [("8", -1.0)]


def test_the_same_net_without_stop_runs_to_its_end(tmp_path):
    verdict = TrainabilityVerdict(at_step=8)
    trainer = fit(vanishing_mlp(), verdict, tmp_path, steps=20)
    assert verdict.verdict.word == "fails" and not verdict.stopped and trainer.global_step == 20


def test_a_healthy_net_trains_and_is_not_stopped(tmp_path):
    verdict = TrainabilityVerdict(at_step=40, stop_if_fails=True)
    trainer = fit(ForeignMLP(depth=2, lr=0.1), verdict, tmp_path, steps=48)
    assert verdict.verdict.word == "trains", verdict.verdict.reasons
    assert trainer.global_step == 48


def test_the_loss_rows_are_the_mean_loss_since_the_previous_early_sample(tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(outputs["loss"]))
    verdict = TrainabilityVerdict(at_step=8)
    trainer = fit(ForeignMLP(depth=2, lr=0.1), verdict, tmp_path, steps=10, extra=[Spy()])
    losses = {int(r["step"]): float(r["value"]) for r in rows_of(trainer) if r["statistic"] == "train_loss"}
    assert losses[0] == pytest.approx(seen[0])
    assert losses[8] == pytest.approx(np.mean(seen[5:9]))


def test_without_the_activation_monitor_it_says_so_at_setup(tmp_path):
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[TrainabilityVerdict(), GradientFlowMonitor()])
    with pytest.raises(ValueError, match="reads what ActivationSaturationMonitor measures"):
        trainer.fit(ForeignMLP(), learnable())
    assert trainer.global_step == 0


@pytest.mark.fast
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "50"])
def test_a_bad_step_is_refused_in_one_line(bad):
    with pytest.raises(ValueError, match="verdict step must be a positive integer"):
        TrainabilityVerdict(at_step=bad)


class NoLossModule(ForeignMLP):
    """Manual optimisation that returns nothing from training_step."""

    def __init__(self):
        super().__init__(depth=2)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_a_foreign_module_without_a_loss_gets_a_clear_unsure_or_a_verdict(tmp_path):
    verdict = TrainabilityVerdict(at_step=6)
    fit(NoLossModule(), verdict, tmp_path, steps=10)
    assert verdict.verdict.word == "unsure"
    assert any("no training loss seen" in r for r in verdict.verdict.reasons)


@pytest.mark.fast
def test_the_verdict_is_marked_on_the_depth_time_images():
    data = np.random.default_rng(0).random((6, 5))
    plain = heat_image(data, [str(i) for i in range(6)], [str(i) for i in range(5)], "t")
    marked = heat_image(data, [str(i) for i in range(6)], [str(i) for i in range(5)], "t",
                        events=[(2, "verdict: fails")])
    blue = np.all(marked == (31, 119, 180), axis=-1)
    assert blue.sum() > 100 and not np.all(plain == (31, 119, 180), axis=-1).any()


# -- eval-mode findings -------------------------------------------------------------------------------------------
def probe_check(epoch):
    monitor = ActivationSaturationMonitor()
    monitor.last_stats = {n: {"mean_abs": 1.0, "max_abs": 3.0, "frac_dead": 0.0} for n in LAYERS}
    found = {"vanished": [], "exploded": LAYERS[:6], "dead": []}
    return monitor, monitor._check_against_training(SimpleNamespace(current_epoch=epoch), 52, found)


@pytest.mark.fast
def test_eval_mode_findings_the_training_batches_contradict_in_the_first_epoch_are_no_failure(recwarn):
    monitor, kept = probe_check(epoch=0)
    assert kept["exploded"] == [] and "eval-only" not in monitor.findings.final
    assert "still settling in the first epoch (not a failure)" in monitor.findings.messages[0]["message"]
    assert not [w for w in recwarn if issubclass(w.category, DiagnosticWarning)]


@pytest.mark.fast
def test_a_disagreement_past_the_first_epoch_is_a_finding_and_a_warning():
    with pytest.warns(DiagnosticWarning, match="may learn in training mode and lose it in eval mode"):
        monitor, kept = probe_check(epoch=3)
    assert kept["exploded"] == [] and monitor.findings.final["eval-only"]["count"] == 6


# -- the corpus: its runs, its labels, its scoring ---------------------------------------------------------------
@pytest.mark.fast
def test_the_corpus_is_fixed_and_spans_what_the_issue_asks():
    runs = {name: group_runs(group) for name, group in GROUPS.items()}
    assert runs == {name: group_runs(group) for name, group in GROUPS.items()}  # the same draw every time
    assert sum(len(r) for r in runs.values()) >= 150
    depths = {r.depth for rs in runs.values() for r in rs}
    lrs = {float(r.flags[r.flags.index("--lr") + 1]) for rs in runs.values() for r in rs}
    assert min(depths) == 2 and max(depths) == 100 and min(lrs) == 1e-4 and max(lrs) == 0.3
    assert {r.model for r in runs["mnist"]} == {"plain", "van", "resnet", "highway", "dirac"}
    assert all("conv" in " ".join(r.flags) for r in runs["coil20-conv"])


@pytest.mark.fast
def test_the_label_rule():
    assert label("completed", 0.60, chance=0.1135, ceiling=0.9708) == "trains"
    assert label("completed", 0.54, chance=0.1135, ceiling=0.9708) == "fails"  # below (0.1135 + 0.9708) / 2
    assert label("diverged", None, 0.1, 0.9) == "fails"
    assert label(RunStatus.STOPPED_EARLY, 0.2, 0.1, 0.9) is None and label("failed", None, 0.1, 0.9) is None


@pytest.mark.fast
def test_wilson_interval_against_its_formula():
    low, high = wilson(9, 10)
    assert (round(low, 3), round(high, 3)) == (0.596, 0.982)


def record(ratio, lab):
    rows = [(0, "verdict", "train_loss", "", 2.0), (50, "verdict", "train_loss", "", 2.0 * ratio)]
    return Record("mnist", "r", "plain", "naive-lr0.1", 10, "completed", 0.5, lab, 100, 10.0, chance=0.1,
                  verdict_step=50, rows=rows)


@pytest.mark.fast
def test_the_loss_baseline_is_fitted_to_decide_most_runs_right():
    records = [record(r, "trains") for r in (0.2, 0.3, 0.5, 0.6)] + [record(r, "fails") for r in (0.9, 0.95, 1.0)]
    low, high = fit_loss_rule(records)
    words = [loss_word(r.loss_ratio, low, high) for r in records]
    assert words == ["trains"] * 4 + ["fails"] * 3


@pytest.mark.fast
def test_read_rows_keeps_what_the_verdict_saw(tmp_path):
    path = tmp_path / "diagnostics.csv"
    path.write_text("step,callback,statistic,layer,value\n0,saturation,train/mean_abs,a,1.0\n"
                    "50,verdict,code,,1.0\n60,saturation,train/mean_abs,a,1.0\n")
    step, rows = read_rows(path)
    assert step == 50 and [r[0] for r in rows] == [0, 50]


@pytest.mark.fast
def test_a_run_stopped_by_its_verdict_is_finished_for_the_sweep():
    assert RunStatus.STOPPED_EARLY in FINISHED and not RunStatus.STOPPED_EARLY.resumable


# -- through train.py -----------------------------------------------------------------------------------------------
# The naive net with PyTorch's default init (a user who sets none); the condition probe's spectra of 100 layers of
# 300 units are left out to keep the test short (the corpus runs them).
NAIVE_100 = ["--model", "plain", "--depth", "100", "--width", "300", "--norm", "none", "--activation", "relu",
             "--init", "default", "--dataset", "usps", "--no-progress"]
FAST = ["--diagnostics", "saturation,grad_flow,verdict"]


def test_train_py_stops_the_naive_100_layer_mlp_at_its_verdict_step(runs, capsys, caplog):
    from deepplain.cli import main
    from deepplain.exits import EXIT_STOPPED_EARLY
    assert main([*NAIVE_100, *FAST, "--epochs", "20", "--logdir", str(runs), "--stop-if-fails"]) \
        == EXIT_STOPPED_EARLY == 5
    run = next(runs.glob("*/version_0"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped-early" and summary["verdict"] == "fails" and summary["verdict_step"] == 50
    assert summary["global_step"] == 51 and summary["test_acc"] is not None
    assert re.match(r"\d+ of 100 layers vanished \(mean \|a\| < 0.05\) in every sample since step 12$",
                    summary["verdict_reasons"][0]), summary["verdict_reasons"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "overview.png").is_file()
    out = capsys.readouterr()  # the verdict's line goes through Lightning's rank-zero logger (pytest holds its records)
    assert "TrainabilityVerdict at step 50: fails:" in caplog.text
    assert "early verdict at step 50: fails" in out.out and "what happened: stopped-early at step 51" in out.out


def test_train_py_gives_the_plainnet_recipe_trains_and_goes_on(runs):
    from deepplain.cli import main
    assert main(["--preset", "oyedotun-mlp-100", *FAST, "--epochs", "2", "--verdict-step", "90", "--stop-if-fails",
                 "--logdir", str(runs), "--no-progress", "--limit-val-batches", "2"]) == 0
    summary = json.loads((next(runs.glob("*/version_0")) / "summary.json").read_text())
    assert summary["verdict"] == "trains", summary["verdict_reasons"]
    assert summary["status"] == "completed" and summary["global_step"] > 90


@pytest.mark.fast
@pytest.mark.parametrize("flags, message", [
    (["--stop-if-fails", "--diagnostics", "saturation"], "--stop-if-fails needs the verdict diagnostic"),
    (["--diagnostics", "verdict"], "the verdict reads what saturation measures"),
    (["--verdict-step", "0"], "--verdict-step")])
def test_verdict_flags_are_checked_before_anything_runs(flags, message, runs, capsys):
    from deepplain.cli import main
    assert main([*NAIVE_100, "--epochs", "1", "--logdir", str(runs), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not list(runs.glob("*"))


@pytest.mark.fast
def test_tables_and_plots_show_a_stopped_run_for_what_it_is():
    from deepplain.experiments import _errors
    from deepplain.plots import aggregate
    rows = [{"model": "plain", "variant": "", "depth": "100", "status": "stopped-early", "epochs_done": "0",
             "test_acc": "0.18", "train_acc": "0.17", "val_acc": "0.17"},
            {"model": "plain", "variant": "", "depth": "10", "status": "completed", "epochs_done": "20",
             "test_acc": "0.95", "train_acc": "0.96", "val_acc": "0.95"}]
    assert _errors(rows[0]) == ["stopped-early after 0 epochs"] * 3
    assert aggregate(rows, "test_acc") == {"plain": {10: (0.95, 0.0, 1)}}  # its accuracy is not a result


@pytest.mark.fast
def test_the_readme_states_the_rules_numbers_as_the_table_has_them():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### TrainabilityVerdict", 1)[1].split("\n### ", 1)[0]
    t = {name: th.value for name, th in THRESHOLDS.items()}
    assert f"`loss_learning` ({t['loss_learning']:g})" in section
    def short(v):  # 1e-4, as the README writes it
        return f"{v:.0e}".replace("e-0", "e-")
    assert f"below {short(t['gradient_ratio'])} of the last's" in section
    assert f"over {t['gradient_explosion']:g} times" in section
    assert f"below {short(t['no_gradient'])})" in section and t["layer_share"] == 0.25 and "a quarter of the" in section
    assert t["collapsed_share"] == 0.5 and "half their\nsingular values" in section


@pytest.mark.fast
def test_a_histogram_of_exploded_activations_never_stops_the_fit(tmp_path):
    """A 50-layer BN + LReLU net at lr 0.01 on COIL-20 exploded past 1e20; its end-of-run histogram was "empty"
    for TensorBoard (whose buckets end at 1e20) and failed the run after its last step (three corpus runs)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from deepplain.callbacks.tensorboard import add_histogram
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logger = TensorBoardLogger(tmp_path, name="h")
    trainer = SimpleNamespace(global_rank=0, loggers=[logger])
    add_histogram(trainer, "beyond", torch.tensor([3e25, -1e30, float("inf")]), 0)  # nothing left: nothing written
    add_histogram(trainer, "mixed", torch.tensor([1.0, 2.0, 3e25]), 0)
    logger.experiment.flush()
    histograms = EventAccumulator(logger.log_dir).Reload().Tags()["histograms"]
    assert histograms == ["mixed"]
