"""The "observe, never perturb" comparison (tests/observation.py) catches a callback that perturbs training, on a
machine that reproduces runs and on one that does not; and it decides the way its docstring says on hand-built
traces."""
import os
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.foreign import ForeignCNN
from tests.observation import RunTrace, assert_observed_only, trace_after_fit


# -- hand-built traces -------------------------------------------------------------------------------------------
def trace(**weights):
    return {"data order": [torch.arange(4)], "random state after the fit": {"torch": torch.tensor([1, 2])},
            "left behind after the fit": [], "buffers before the first optimizer step": {"bn": torch.zeros(3)},
            "weights and buffers after the fit": {k: torch.tensor(v) for k, v in weights.items()}}


def never():
    raise AssertionError("the reference was run again though the watched run was equal bit for bit")


@pytest.mark.fast
def test_equal_bit_for_bit_needs_no_second_reference():
    assert assert_observed_only(trace(w=[1.0, 2.0]), trace(w=[1.0, 2.0]), rerun=never) == "bit for bit"


@pytest.mark.fast
def test_a_difference_fails_where_the_reference_reproduces():
    with pytest.raises(AssertionError, match="w differs with the diagnostics on, and two runs without them agree"):
        assert_observed_only(trace(w=[1.0, 2.0], v=[0.0]), trace(w=[1.0, 2.0 + 1e-6], v=[0.0]),
                             rerun=lambda: trace(w=[1.0, 2.0], v=[1e-3]))


@pytest.mark.fast
def test_within_the_measured_spread_passes_and_beyond_it_fails():
    reference, again = trace(w=[1.0, 2.0], v=[5.0]), trace(w=[1.0, 2.0 + 1e-6], v=[5.0])
    assert assert_observed_only(reference, trace(w=[1.0, 2.0 - 2e-6], v=[5.0]), rerun=lambda: again).startswith(
        "within the spread")
    with pytest.raises(AssertionError, match="w differs from the reference by 0.001"):
        assert_observed_only(reference, trace(w=[1.0, 2.001], v=[5.0]), rerun=lambda: again)
    with pytest.raises(AssertionError, match="v differs with the diagnostics on"):  # v reproduced: exact
        assert_observed_only(reference, trace(w=[1.0, 2.0], v=[5.0 + 1e-6]), rerun=lambda: again)


@pytest.mark.fast
def test_a_spread_one_pair_understates_is_measured_again_once():
    """Two references 1e-6 apart, the watched run 1e-5 off: a third reference, 4e-6 off, shows the spread is larger
    (passes); a difference beyond every pair's spread still fails; the third run is taken once for all tensors."""
    reference, again, third = trace(w=[2.0], u=[3.0]), trace(w=[2.0 + 1e-6], u=[3.0 + 1e-6]), \
        trace(w=[2.0 + 4e-6], u=[3.0 + 4e-6])
    runs = iter([again, third])
    calls = []

    def rerun():
        calls.append(1)
        return next(runs)
    assert assert_observed_only(reference, trace(w=[2.0 - 1e-5], u=[3.0 - 1e-5]), rerun=rerun).startswith(
        "within the spread")
    assert len(calls) == 2
    runs = iter([again, third])
    with pytest.raises(AssertionError, match=r"w differs from the reference by 0.001 .* differ by up to 4"):
        assert_observed_only(reference, trace(w=[2.001], u=[3.0]), rerun=lambda: next(runs))


@pytest.mark.fast
def test_what_no_kernel_decides_is_exact_even_where_the_weights_are_not():
    reference, again = trace(w=[1.0]), trace(w=[1.0 + 1e-6])
    changed = trace(w=[1.0])
    changed["random state after the fit"]["torch"] = torch.tensor([1, 3])
    with pytest.raises(AssertionError, match="random state after the fit differs"):
        assert_observed_only(reference, changed, rerun=lambda: again)
    changed = trace(w=[1.0])
    changed["left behind after the fit"] = ["body.0._forward_hooks"]
    with pytest.raises(AssertionError, match="left behind after the fit differs"):
        assert_observed_only(reference, changed, rerun=lambda: again)


@pytest.mark.fast
def test_garbage_in_one_tensor_is_reported_not_compared_and_the_rest_still_counts():
    """Two references that differ by far more than the tensor's magnitude (uninitialised memory) give no spread:
    that tensor is named in a warning, and every other tensor is still compared bit for bit."""
    weights = {f"t{i}": [float(i)] for i in range(20)}
    reference, again = trace(**weights, g=[0.1, 3e27]), trace(**weights, g=[0.1, -5e30])
    with pytest.warns(UserWarning, match=r"not compared: g \(runs without callbacks differ by 5"):
        assert_observed_only(reference, trace(**weights, g=[0.1, 7e12]), rerun=lambda: again)
    with pytest.raises(AssertionError, match="t3 differs with the diagnostics on"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_observed_only(reference, trace(**{**weights, "t3": [3.5]}, g=[0.1, 7e12]), rerun=lambda: again)


@pytest.mark.fast
def test_garbage_in_the_watched_run_alone_is_reported_not_failed():
    """Uninitialised memory can hold small values in both references and a huge one in the watched run (seen: 1.7e22
    against references 4e-6 apart): named in a warning; a tensor the references reproduce must still be exact."""
    weights = {f"t{i}": [float(i)] for i in range(20)}
    reference, again = trace(**weights, g=[0.1, 1e-6]), trace(**weights, g=[0.1, 5e-6])
    with pytest.warns(UserWarning, match=r"not compared: g \(the run with callbacks differs by 1.7e\+22"):
        assert_observed_only(reference, trace(**weights, g=[0.1, 1.7e22]), rerun=lambda: again)
    with pytest.raises(AssertionError, match="t3 differs with the diagnostics on"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_observed_only(reference, trace(**{**weights, "t3": [3.5]}, g=[0.1, 1.7e22]), rerun=lambda: again)


# -- real runs with a callback that perturbs ----------------------------------------------------------------------
class DropoutCNN(ForeignCNN):
    """Batch norm and dropout: a probe in train mode or a stray random draw changes this run."""

    def __init__(self):
        super().__init__()
        self.body.insert(3, nn.Dropout(0.3))


class UnreproducibleKernel(L.Callback):
    """Stands in for a kernel this machine does not reproduce: noise from the OS (not from any seeded generator) at
    rounding level in one gradient, at the last step only, so that it reaches only that tensor. Each element draws
    its own, as a kernel's varying reduction order does: one draw shared by the whole tensor would make the two
    references' spread a single random number, sometimes far below the watched run's difference."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == trainer.max_steps - 1:
            grad = pl_module.head.weight.grad
            raw = torch.frombuffer(bytearray(os.urandom(2 * grad.numel())), dtype=torch.int16).float()
            grad.add_(1e-6 * (raw / 32768).view_as(grad))


class DrawsRandom(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            torch.rand(1)


class ProbesInTrainMode(L.Callback):
    """A probe that restores the random state but forgets eval mode: only batch norm's running statistics move."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            with torch.no_grad(), torch.random.fork_rng():
                pl_module(batch[0])


class NudgesAWeight(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            with torch.no_grad():
                pl_module.body[0].weight[0, 0, 0, 0] += 1e-6


class LeavesAHook(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.body[0].register_forward_hook(lambda module, inputs, output: None)


class ReadsTheLoader(L.Callback):
    def on_train_start(self, trainer, pl_module):
        trainer.train_dataloader.generator.manual_seed(7)  # as a probe pass that forgot to restore it would


PERTURBING = {"draws a random number": DrawsRandom, "probes in train mode": ProbesInTrainMode,
              "nudges a weight by 1e-6": NudgesAWeight, "leaves a hook": LeavesAHook,
              "moves the loader's generator": ReadsTheLoader}


def run(extra: list) -> dict:
    torch.manual_seed(0)
    module = DropoutCNN()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    recorder = RunTrace()
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder, *extra])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return trace_after_fit(recorder, module, [loader.generator])


@pytest.mark.parametrize("reproducible", [True, False], ids=["reproducible", "not-reproducible"])
@pytest.mark.parametrize("perturbation", list(PERTURBING))
def test_a_perturbing_callback_is_caught(perturbation, reproducible):
    kernel = [] if reproducible else [UnreproducibleKernel()]
    reference = run(kernel)
    with pytest.raises(AssertionError):
        assert_observed_only(reference, run([*kernel, PERTURBING[perturbation]()]), rerun=lambda: run(kernel))


@pytest.mark.parametrize("reproducible", [True, False], ids=["reproducible", "not-reproducible"])
def test_a_callback_that_only_observes_passes(reproducible):
    kernel = [] if reproducible else [UnreproducibleKernel()]
    decided = assert_observed_only(run(kernel), run([*kernel, RunTrace()]), rerun=lambda: run(kernel))
    if reproducible:
        assert decided == "bit for bit"
    else:
        assert decided.startswith("within the spread") or decided == "bit for bit"
