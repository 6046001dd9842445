"""What ConditionNumberProbe's spectra cost on this machine, and which layers a run can afford.

A spectrum's cost grows with the cube of a layer's width: 4 ms for a 300-unit layer, 0.7 s for a 2,048-unit one
on a 2-core CPU, where a whole training step of a 3 x 2,048 MLP takes 40 ms. So the probe plans, once, before its
first sample, what its first and last samples (the full ones, never postponed) will measure:

* the run's length in seconds is estimated from the planned optimizer steps and a timed forward of the first
  training batch (forward + backward ~ 3 forwards; the optimizer and the loop are not counted, so the estimate
  errs short, and the plan frugal);
* the two full samples may take ``full_sample_share`` (5%) of it together, and at least
  :data:`MIN_ALLOWANCE` (half a second: whatever a run's length, a layer that cheap is always measured);
* layers are taken cheapest first: each with its exact spectrum (float64 Gram matrix and its eigenvalues) while
  that fits, else with the Cholesky estimate of ``linalg.estimate_gram_kappa`` (a fifth of the cost at 2,048
  units), else left out; weights exactly or not at all. The probe's size (twice the widest layer measured) and
  its forward are counted too.

The costs come from shapes and per-operation rates measured once per process (:func:`measured_rates`, ~30 ms);
they overestimate wide layers by up to 2x (the rates are measured on 512-unit matrices, where the kernels are
less efficient), which again errs frugal.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

MIN_PROBE, MAX_PROBE = 256, 4096
FORWARD_BACKWARD = 3.0  # a training step's forward + backward, in forwards of the same batch
MIN_ALLOWANCE = 0.5     # seconds the two full samples may take together in any run


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of work on this machine: ``gram`` per m n^2 (float64 Gram of an m x n matrix), ``eigh`` per
    n^3 (its eigenvalues), ``estimate`` per n^3 (Cholesky and the estimate's iterations), ``inverse`` per n^3."""
    gram: float
    eigh: float
    estimate: float
    inverse: float


def _best_of(fn, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def measured_rates(device: str = "cpu") -> Rates:
    """The rates of this machine (a few milliseconds of float64 work on 512-unit matrices), measured once."""
    from .linalg import estimate_gram_kappa
    n, m = 512, 1024
    g = torch.Generator().manual_seed(0)
    h = torch.randn(m, n, generator=g, dtype=torch.float64).to(device)
    gram = h.mT @ h
    return Rates(gram=_best_of(lambda: h.mT @ h) / (m * n * n),
                 eigh=_best_of(lambda: torch.linalg.eigvalsh(gram)) / n ** 3,
                 estimate=_best_of(lambda: estimate_gram_kappa(gram)) / n ** 3,
                 inverse=_best_of(lambda: torch.linalg.inv_ex(gram)) / n ** 3)


def probe_size_for(layer_shapes: Sequence[tuple[int, int]]) -> int:
    """Probe samples so that every representation matrix has at least twice as many rows as units.

    ``layer_shapes``: (units, positions per sample) of each hidden layer; an MLP layer of 300 units
    needs 600 samples, a conv layer of 640 channels on 8 x 8 positions needs 20. The result is
    at least 256 and at most 4096 samples.
    """
    need = max((math.ceil(2 * units / max(1, positions)) for units, positions in layer_shapes), default=0)
    return int(min(MAX_PROBE, max(MIN_PROBE, need)))


@dataclass(frozen=True)
class LayerShape:
    name: str
    units: int
    positions: int = 1  # rows per sample: a conv layer's positions, a sequence's tokens


@dataclass(frozen=True)
class WeightShape:
    name: str
    rows: int
    columns: int


def representation_seconds(units: int, rows: int, rates: Rates, estimated: bool) -> float:
    n = units
    return rates.gram * rows * n * n + (rates.estimate if estimated else rates.eigh) * n ** 3


def weight_seconds(rows: int, columns: int, rates: Rates) -> float:
    small, large = min(rows, columns), max(rows, columns)
    return rates.inverse * small ** 3 + (0.0 if rows == columns else rates.gram * large * small * small)


@dataclass
class Plan:
    """What the full samples measure: ``exact`` and ``estimated`` representation layers, ``weights``, and what is
    ``left_out``; ``probe_size`` samples; ``seconds``: a full sample's estimated cost; ``allowance``: what the two
    full samples may take; ``run_seconds``: the run's estimated length."""
    exact: list[str] = field(default_factory=list)
    estimated: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    left_out_weights: list[str] = field(default_factory=list)
    probe_size: int = MIN_PROBE
    widths: dict = field(default_factory=dict)  # units of each layer measured
    seconds: float = 0.0
    allowance: float = math.inf
    run_seconds: float = math.inf

    def measured(self) -> set[str]:
        return set(self.exact) | set(self.estimated)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state(cls, state: dict) -> "Plan":
        return cls(**state)


def plan_full_samples(layers: Sequence[LayerShape], weights: Sequence[WeightShape], forward_per_sample: float,
                      allowance: float, rates: Rates, max_rows: int = 4096, samples: int = 2,
                      fixed_probe: int | None = None) -> Plan:
    """Choose what ``samples`` full samples can measure within ``allowance`` seconds together: representation
    layers cheapest first, exactly while that fits, else estimated, else left out; then weights, cheapest first.
    ``forward_per_sample``: seconds of the probe forward per probe sample; ``fixed_probe``: a probe size given by
    the user (else twice the widest layer measured, see :func:`probe_size_for`)."""
    per_sample = allowance / samples

    def rows(layer: LayerShape, probe: int) -> int:
        return min(max_rows, probe * layer.positions)

    def cost(chosen: dict[str, bool]) -> float:
        picked = [layer for layer in layers if layer.name in chosen]
        probe = fixed_probe or probe_size_for([(layer.units, layer.positions) for layer in picked])
        spectra = sum(representation_seconds(layer.units, rows(layer, probe), rates, chosen[layer.name])
                      for layer in picked)
        return forward_per_sample * probe + spectra

    chosen: dict[str, bool] = {}  # name -> estimated?
    plan = Plan(allowance=allowance)
    for layer in sorted(layers, key=lambda item: (representation_seconds(item.units, rows(item, MAX_PROBE), rates,
                                                                         False), layers.index(item))):
        for estimated in (False, True):
            if cost({**chosen, layer.name: estimated}) <= per_sample:
                chosen[layer.name] = estimated
                break
        else:
            plan.left_out.append(layer.name)
    spent = cost(chosen)
    for weight in sorted(weights, key=lambda w: (weight_seconds(w.rows, w.columns, rates), weights.index(w))):
        seconds = weight_seconds(weight.rows, weight.columns, rates)
        if spent + seconds <= per_sample:
            plan.weights.append(weight.name)
            spent += seconds
        else:
            plan.left_out_weights.append(weight.name)
    order = [layer.name for layer in layers]
    plan.exact = [n for n in order if n in chosen and not chosen[n]]
    plan.estimated = [n for n in order if n in chosen and chosen[n]]
    plan.left_out.sort(key=order.index)
    plan.weights.sort(key=[w.name for w in weights].index)
    plan.left_out_weights.sort(key=[w.name for w in weights].index)
    plan.probe_size = fixed_probe or probe_size_for([(layer.units, layer.positions) for layer in layers
                                                     if layer.name in chosen])
    plan.widths = {layer.name: layer.units for layer in layers if layer.name in chosen}
    plan.seconds = spent
    return plan


def everything(layers: Sequence[LayerShape], weights: Sequence[WeightShape], fixed_probe: int | None = None) -> Plan:
    """The plan without a budget: every layer exactly, every weight."""
    return Plan(exact=[layer.name for layer in layers], weights=[w.name for w in weights],
                probe_size=fixed_probe or probe_size_for([(layer.units, layer.positions) for layer in layers]),
                widths={layer.name: layer.units for layer in layers})
