"""The sampling core: cadence that adapts to the run, a time budget that thins but never hides, and a short
run that shows its own evolution in TensorBoard."""
import logging

import lightning as L
import pytest
from conftest import fit, read_events
from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe, GradientFlowMonitor
from deepplain.callbacks.sampling import OverheadBudget, SamplingSchedule
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deepplain.cli import main
from tests.foreign import ForeignMLP


class FakeTrainer:
    def __init__(self, total, log_every=50):
        self.estimated_stepping_batches = total
        self.log_every_n_steps = log_every


@pytest.mark.fast
def test_default_cadence_spreads_samples_over_the_run():
    for total in (230, 2001, 200_000):
        schedule = SamplingSchedule(num_samples=20)
        schedule.start(FakeTrainer(total))
        steps = schedule.planned_steps()
        assert steps[0] == 0 and steps[-1] == total - 1
        assert 18 <= len(steps) <= 21
        gaps = {b - a for a, b in zip(steps, steps[1:-1])}
        assert len(gaps) == 1  # evenly spaced, the last step added


@pytest.mark.fast
def test_explicit_and_logging_cadences_include_the_last_step():
    schedule = SamplingSchedule(every_n_steps=100)
    schedule.start(FakeTrainer(350))
    assert schedule.planned_steps() == [0, 100, 200, 300, 349]
    schedule = SamplingSchedule(use_log_every_n_steps=True)
    schedule.start(FakeTrainer(120, log_every=40))
    assert schedule.planned_steps() == [0, 40, 80, 119]
    unknown = SamplingSchedule()
    unknown.start(FakeTrainer(float("inf")))
    assert unknown.every == SamplingSchedule.FALLBACK_EVERY and unknown.planned_steps() == []


class Clock:
    """A clock the test moves by hand: the budget's arithmetic, whatever the machine's load."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.fast
def test_overhead_budget_arithmetic():
    clock = Clock()
    budget = OverheadBudget(0.5, clock=clock)
    budget.start()
    assert budget.allows()  # nothing spent yet
    with budget.charge():
        clock.now += 0.05
    assert budget.spent == budget.spent_optional == pytest.approx(0.05)
    assert not budget.allows()  # 0.05 s spent of 0.05 s elapsed
    clock.now += 0.06
    assert budget.allows()  # 0.05 s of 0.11 s: under half
    assert not budget.allows(expected=0.01)  # but not for work expected to take 0.01 s more
    with budget.charge(optional=False):  # mandatory work is counted, not held against the share
        clock.now += 0.05
    assert budget.spent == pytest.approx(0.10) and budget.spent_optional == pytest.approx(0.05)
    assert budget.allows() and budget.elapsed == pytest.approx(0.16)
    assert OverheadBudget(None).allows()
    with pytest.raises(ValueError, match="max_overhead must be in"):
        OverheadBudget(1.5)


def test_tiny_budget_keeps_first_and_last_and_logs_every_postponement(tmp_path, caplog):
    probe = ConditionNumberProbe(every_n_steps=1, max_overhead=1e-6, min_samples=0)  # the budget alone
    grads = GradientFlowMonitor(every_n_steps=1, max_overhead=1e-6, min_samples=0)
    with caplog.at_level(logging.DEBUG, logger="deepplain.callbacks"):
        fit(ForeignMLP(), [probe, grads], tmp_path, steps=6)
    assert probe.sampled_steps == [0, 6]  # the initial state, and after the last update
    assert grads.sampled_steps == [0, 5]
    assert probe.postponed == grads.postponed == 4  # the due steps 1..4 passed without a sample
    postponed = [r.message for r in caplog.records if "is postponed" in r.message]
    assert any(m.startswith("ConditionNumberProbe: the sample due at step 1 is postponed") for m in postponed)
    assert any("GradientFlowMonitor: 2 samples at steps 0, 5; 4 due points postponed" in r.message
               for r in caplog.records)


def test_a_postponed_sample_is_taken_later_not_dropped(tmp_path):
    grads = GradientFlowMonitor(every_n_steps=4, max_overhead=0.01, min_samples=0)
    fit(ForeignMLP(), [OverBudget(grads, from_step=4, until_step=6), grads], tmp_path, steps=12, logger=False)
    # due at 0, 4, 8 and the last step 11; step 4 falls while the budget is spent and is taken at step 6
    assert grads.sampled_steps == [0, 6, 8, 11] and grads.postponed == 1


def test_ten_samples_whatever_the_budget(tmp_path):
    """With a budget that allows nothing, a 100-step run still gets min_samples samples (10 for the cheap
    statistics, 2 for the condition probe's spectra), one per tenth of the run: the first, whenever the count
    falls behind, and the last; the other due points are postponed."""
    grads = GradientFlowMonitor(every_n_steps=1, max_overhead=1e-9)
    probe = ConditionNumberProbe(every_n_steps=1, max_overhead=1e-9)
    ten = ConditionNumberProbe(every_n_steps=1, max_overhead=1e-9, min_samples=10, include=["body.1"])
    fit(ForeignMLP(), [grads, probe, ten], tmp_path, steps=100, logger=False)
    assert grads.sampled_steps == [0, 19, 29, 39, 49, 59, 69, 79, 89, 99]
    assert probe.sampled_steps == [0, 100]  # the last: after the last update
    assert ten.sampled_steps == [0, 19, 29, 39, 49, 59, 69, 79, 89, 100]
    schedule = SamplingSchedule(num_samples=20, min_samples=10)
    schedule.start(FakeTrainer(100))
    assert [s for s in range(100) if schedule.behind(s, taken=1)] == list(range(19, 100))
    schedule.start(FakeTrainer(12))  # a run barely longer than min_samples still has all ten by its last step
    taken = 0
    for step in range(12):
        taken += step == 0 or schedule.behind(step, taken) or schedule.is_last(step)
    assert taken == 10
    assert not SamplingSchedule(min_samples=0).behind(50, taken=0)
    with pytest.raises(ValueError, match="min_samples"):
        SamplingSchedule(min_samples=-1)


class OverBudget(L.Callback):
    """Holds ``target``'s time budget as spent between two steps (as an expensive first figure would)."""

    def __init__(self, target, from_step, until_step):
        self.target, self.from_step, self.until_step = target, from_step, until_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        over = self.from_step <= trainer.global_step < self.until_step
        self.target.budget.fraction = 1e-12 if over else None  # None: no budget, every due sample is taken


def test_short_run_shows_its_evolution_in_tensorboard(runs):
    """A few hundred steps (a 4-second run) with every diagnostic at its defaults: each statistic is logged at
    the start and at the end, saturation and gradient flow at least ten times in all (the samples no time budget
    postpones), the condition probe's spectra at least at the first and the last; the probe runs at the first and
    last validation."""
    assert main(["--model", "plain", "--depth", "20", "--width", "64", "--dataset", "usps", "--epochs", "4",
                 "--logdir", str(runs), "--no-progress"]) == 0
    run = next(runs.glob("*/version_0"))
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0}).Reload()
    last_step = 4 * 52 - 1  # 6,564 training images, batch 128

    def steps(tag):
        return [e.step for e in acc.Scalars(tag)]
    for tag in ("saturation/depth_max/max_abs", "grad_flow/depth_max/norm", "overview/layers_dead"):
        got = steps(tag)
        assert got[0] == 0 and got[-1] == last_step and len(got) >= 10, (tag, got)
    condition = steps("condition/depth_max/log10_kappa")
    assert condition[0] == 0 and condition[-1] == last_step + 1
    probe = steps("saturation/probe/depth_max/max_abs")
    assert probe[0] == 52 and probe[-1] == last_step + 1  # first and last validation (after epochs 1 and 4)
    images = acc.Tags()["images"]
    assert "condition/profile" in images and "saturation/probe/profile" in images
    assert len(acc.Images("saturation/depth_time/max_abs")) >= 2  # redrawn during the run, not only at its end


def test_sampling_state_survives_checkpoint(tmp_path):
    monitor = ActivationSaturationMonitor(every_n_steps=2, max_overhead=None)
    fit(ForeignMLP(), [monitor], tmp_path, steps=5, logger=False)
    restored = ActivationSaturationMonitor(every_n_steps=2)
    restored.load_state_dict(monitor.state_dict())
    assert restored.samples_taken == monitor.samples_taken == 3 and restored.last_sampled_step == 4  # 0, 2, 4
    assert restored.probe.inputs is not None and restored.probes_taken == monitor.probes_taken


def test_events_of_a_foreign_module_carry_step_zero(tmp_path):
    fit(ForeignMLP(), [ActivationSaturationMonitor(every_n_steps=3, per_layer_scalars=True)], tmp_path, steps=4)
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Scalars("saturation/train/mean_abs/body.1")] == [0, 3]
    assert [e.step for e in acc.Scalars("saturation/depth_max/max_abs")] == [0, 3]
