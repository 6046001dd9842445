"""Did the callbacks change the run they watched? Not a test module: the comparison the "observe, never perturb"
tests share.

A run is traced by :class:`RunTrace` (a callback that only reads) and :func:`trace_after_fit`: the order of the
training batches, every buffer before the first optimizer step (batch norm's running statistics after the first
forward), the global and data-loader random states after the fit, what a fit must not leave behind (hooks,
autocast, grad mode), and the final weights and buffers.

:func:`assert_observed_only` compares a watched run with a reference run of the same seed. Equal bit for bit:
done. Otherwise it first proves whether the machine reproduces the reference (a second reference run): where
it does, any difference is the callbacks' doing and fails. Where it does not (seen on 2026-12-06, torch 2.14.1:
oneDNN's bf16 weight gradient of a padded 3x3 stride-2 convolution on a 1x1 map reads uninitialised memory,
so ResNet-18 on 16x16 images gets garbage in ``layer4.0.conv1.weight`` at the kernel taps that only ever see
padding; on other CPUs the bf16 kernels reduce in a varying order), the parts no kernel can make irreproducible
(the data order, the random states, the hooks and autocast state) must still be equal, every tensor the two
references agree on bit for bit must be equal too, and a tensor they do not agree on must lie within their
measured spread (measured again with a third reference where one pair understates it: a small tensor's difference
is a few random draws). A tensor whose runs differ by more than its own magnitude (garbage, not rounding: in the
references, or in the watched run alone where the references happened to hold small garbage) cannot be compared
on this machine: it is reported, never silently passed, and at most a few may be.
"""
from __future__ import annotations

import math
import random
import warnings
from typing import Callable, Optional

import lightning as L
import numpy as np
import torch
from torch import nn

SPREAD_FACTOR = 4.0       # a watched tensor may differ from the reference by 4x the two references' difference
UNCOMPARABLE_SHARE = 0.1  # at most this share of the final tensors may be left uncompared (garbage on this CPU)
# what deterministic code decides whatever the kernels do: these must be equal in every case
ALWAYS_EXACT = ("data order", "random state after the fit", "left behind after the fit")


def _digest(value) -> object:
    """A comparable copy of a batch (tensors as CPU copies, containers item by item)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, (list, tuple)):
        return [_digest(v) for v in value]
    if isinstance(value, dict):
        return {k: _digest(v) for k, v in value.items()}
    return value


class RunTrace(L.Callback):
    """Reads what the diagnostics must never change, and changes nothing itself."""

    def __init__(self):
        self.batches: list = []
        self.buffers_before_first_step: Optional[dict] = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(_digest(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.buffers_before_first_step is None:
            self.buffers_before_first_step = {k: v.detach().clone() for k, v in pl_module.named_buffers()}


def _hooks_left(module: nn.Module) -> list[str]:
    left = []
    for name, m in module.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, kind, None):
                left.append(f"{name or type(m).__name__}.{kind}")
    return left


def trace_after_fit(trace: RunTrace, module: nn.Module, loader_generators=()) -> dict:
    """Everything compared, right after ``trainer.fit`` returned."""
    left = _hooks_left(module)
    left += [f"global {kind}" for kind in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                           "_global_backward_hooks") if getattr(nn.modules.module, kind, None)]
    left += ["autocast enabled on the CPU"] if torch.is_autocast_enabled("cpu") else []
    left += ["grad mode off"] if not torch.is_grad_enabled() else []
    left += ["torch's fused attention fast path off"] if not torch.backends.mha.get_fastpath_enabled() else []
    return {
        "data order": trace.batches,
        "random state after the fit": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1],
                                       "python": random.getstate(),
                                       **{f"loader generator {i}": g.get_state()
                                          for i, g in enumerate(loader_generators)}},
        "left behind after the fit": left,
        "buffers before the first optimizer step": trace.buffers_before_first_step or {},
        "weights and buffers after the fit": {k: v.detach().clone() for k, v in module.state_dict().items()},
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits are equal values, NaN included."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8) if t.numel() else t


def same(a, b) -> bool:
    """Bit for bit (NaN equals NaN of the same bits), through nested containers."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(_bits(a), _bits(b)))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def differing(a: dict, b: dict) -> dict[str, list[str]]:
    """Per part of the trace, the keys (or the part itself, as "") that differ between two traces."""
    out: dict[str, list[str]] = {}
    for part in a:
        if isinstance(a[part], dict) and part not in ALWAYS_EXACT:
            keys = [k for k in a[part] if k not in b[part] or not same(a[part][k], b[part][k])]
            keys += [k for k in b[part] if k not in a[part]]
        else:
            keys = [] if same(a[part], b[part]) else [""]
        if keys:
            out[part] = keys
    return out


def _max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    d = (a.double() - b.double()).abs()
    both_nan = a.double().isnan() & b.double().isnan()
    d = torch.where(both_nan, torch.zeros_like(d), d)
    return float(d.max()) if d.numel() else 0.0


def _reproduced_scale(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest magnitude among the elements two runs reproduced bit for bit (the tensor's own scale, which
    garbage in the other elements cannot inflate); the median magnitude if none was reproduced."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    agreed = a64[(a64 == b64) & a64.isfinite()].abs()
    if agreed.numel():
        return float(agreed.max())
    finite = a64[a64.isfinite()].abs()
    return float(finite.median()) if finite.numel() else 0.0


def assert_observed_only(reference: dict, watched: dict, rerun: Callable[[], dict]) -> str:
    """Fail unless ``watched`` is what the run was without the callbacks (see the module docstring). ``rerun``
    trains the reference once more; it is called only when the watched run is not equal bit for bit. Returns how
    the comparison decided: "bit for bit", or "within the spread of ..." naming what the machine did not
    reproduce."""
    changed = differing(reference, watched)
    if not changed:
        return "bit for bit"
    again = rerun()
    unstable = differing(reference, again)
    for part, keys in changed.items():
        shown = ", ".join(k for k in keys[:5] if k) or part
        assert part not in ALWAYS_EXACT, f"{part} differs with the diagnostics on: {shown}"
        assert part in unstable, (f"{part} differs with the diagnostics on ({shown}), and two runs without them are "
                                  "equal bit for bit on this machine")
        for key in keys:
            assert key in unstable[part], (f"{part}: {key} differs with the diagnostics on, and two runs without "
                                           "them agree on it bit for bit on this machine")
    uncomparable, third = [], None
    for part, keys in unstable.items():
        for key in keys:
            ref, other, got = reference[part][key], again[part][key], watched[part].get(key)
            spread, scale = _max_abs_difference(ref, other), _reproduced_scale(ref, other)
            off = _max_abs_difference(ref, got)
            if math.isfinite(spread) and spread <= max(scale, 1e-30) < off:
                # garbage in the watched run alone (the references happened to hold small garbage): not a
                # perturbation, which would move the tensors the references reproduce, and those stay exact
                uncomparable.append(f"{key} (the run with callbacks differs by {off:.3g}, beyond the tensor's scale "
                                    f"{scale:.3g}, on a tensor runs without callbacks do not reproduce)")
                continue
            if off > SPREAD_FACTOR * spread and math.isfinite(spread):
                # one pair of runs may understate the spread (a small tensor's difference is a few random draws):
                # beyond it, a third reference, run once for all tensors, measures it again
                third = third if third is not None else rerun()
                spread = max(spread, *(_max_abs_difference(run, third[part][key]) for run in (ref, other)))
            if not math.isfinite(spread) or spread > max(scale, 1e-30):  # garbage, not rounding: no spread to use
                uncomparable.append(f"{key} (runs without callbacks differ by {spread:.3g}, the tensor's "
                                    f"scale is {scale:.3g})")
                continue
            assert off <= SPREAD_FACTOR * spread, (f"{part}: {key} differs from the reference by {off:.3g} with "
                                                   f"the diagnostics on; runs without them differ by up to "
                                                   f"{spread:.3g}")
    total = len(reference["weights and buffers after the fit"])
    assert len(uncomparable) <= max(1, UNCOMPARABLE_SHARE * total), \
        f"too much of the run is not reproducible on this machine to compare: {uncomparable}"
    what = "; ".join(f"{part}: {len(keys)} tensor(s)" for part, keys in unstable.items())
    if uncomparable:
        warnings.warn(f"not reproducible on this CPU, so not compared: {'; '.join(uncomparable)}", stacklevel=2)
    return f"within the spread of two reference runs ({what} not reproducible on this machine)"
