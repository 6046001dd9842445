"""The early verdict's rules: data in one place, each threshold with where it comes from, and one function
that applies them to the samples a run recorded up to its verdict step.

The same function decides live (``TrainabilityVerdict``, from the rows the diagnostics write) and offline
(``deepplain.verdicts``, from a finished run's ``diagnostics.csv``), so a verdict scored on a corpus is the
verdict a live run gives.

The rules follow the papers' mechanisms, not a corpus's numbers: a network cannot train when the signal
does not reach its output (activations vanished or units dead in a quarter of its layers or more:
PlainNet), when its representations have collapsed (singular hidden representations: PlainNet), when no
gradient reaches its first layers (the VAN and coursework papers' vanishing gradient), when the gradient
explodes on its way down, or when its activations explode.
Such a *pathology* is read as persistent only when it holds in every sample from a quarter of the way to
the verdict step on, so a transient at initialisation does not count. The training loss says whether the
network learns despite it: ``fails`` needs a pathology and a loss that has not fallen (or a decisive one: no
gradient anywhere, or units dead in every layer: nothing can learn from there); ``trains`` needs no pathology
and a loss that has; everything else is ``unsure``, with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

from .condition import ConditionNumberProbe
from .grad_flow import GradientFlowMonitor
from .records import DEAD_SHARE, EXPLODED_ABOVE, VANISHED_BELOW
from .saturation import ActivationSaturationMonitor

# the diagnostics.csv rows the rules read: each callback's section
SATURATION, CONDITION = ActivationSaturationMonitor.prefix, ConditionNumberProbe.prefix
GRAD_FLOW = GradientFlowMonitor.prefix

VERDICT_CALLBACK = "verdict"      # its rows in diagnostics.csv
LOSS_STATISTIC = "train_loss"     # mean training loss over the steps since the previous early sample
CODE_STATISTIC = "code"           # the verdict's numeric code, at the verdict step
CODES = {"fails": -1.0, "unsure": 0.0, "trains": 1.0}  # overview/verdict and the table's value column


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str


# Every number the rules use. The first six are the papers' or follow from what the statistic means; the
# exploding-gradient ratio, the layer share and the loss ratio were chosen on the design part of the corpus
# (MNIST and USPS runs, docs/RESULTS.md section 12) and never tuned on the scoring part.
THRESHOLDS = {
    "vanished_mean_abs": Threshold(VANISHED_BELOW, f"PlainNet (Oyedotun et al.): |a| < {VANISHED_BELOW:g} counts as a "
                                                  "vanished activation"),
    "exploded_max_abs": Threshold(EXPLODED_ABOVE, f"PlainNet: |a| > {EXPLODED_ABOVE:g} counts as an exploded "
                                                  "activation"),
    "dead_share": Threshold(DEAD_SHARE, "a dead layer: more than half its units never fire on a batch"),
    "collapsed_share": Threshold(0.5, "PlainNet's singular representations, by degree: a layer has collapsed when "
                                      "at least half of its representation's singular values are near zero (one "
                                      "dead unit already makes kappa infinite, and shallow nets train with that)"),
    "no_gradient": Threshold(1e-8, "no learning signal at all: every layer's gradient norm below 1e-8 (the "
                                   "coursework's VGG38: 1e-18; a net whose units all died: 0)"),
    "gradient_ratio": Threshold(1e-4, "vanishing gradient: the first layer's gradient norm below 1e-4 of the "
                                      "last's (the naive 100-layer MLP: 1e-9; healthy nets: 0.01 to 50)"),
    "gradient_explosion": Threshold(100.0, "exploding gradient: the first layer's gradient norm over 100 times the "
                                           "last's (deep batch-normalised nets at init, Yang et al. 2019; the "
                                           "164-layer plain net of RESULTS 11.1: 5e9; healthy nets: up to ~50)"),
    "layer_share": Threshold(0.25, "a pathology of the network, not of a few layers: a quarter of them or more, "
                                   "a block that distorts the signal of every layer above it (design part)"),
    "loss_learning": Threshold(0.92, "the loss has fallen: the mean loss of the steps before the verdict at most "
                                     "this share of the step-0 loss (fitted on the design part's 85 runs: the most "
                                     "right verdicts while deciding 80% of them; `python -m deepplain.verdicts "
                                     "score` repeats the fit)"),
}
@dataclass
class Verdict:
    word: str                       # trains | fails | unsure
    step: int
    reasons: list[str] = field(default_factory=list)
    signals: dict = field(default_factory=dict)  # name -> number, for tables and tests

    @property
    def code(self) -> float:
        return CODES[self.word]

    def line(self) -> str:
        return f"{self.word}: " + "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {"word": self.word, "code": self.code, "step": self.step, "reasons": list(self.reasons),
                "signals": dict(self.signals)}


class Samples:
    """What the diagnostics recorded up to the verdict step: ``(callback, statistic) -> step -> {layer: value}``,
    layers in the order they were written (the model's)."""

    def __init__(self, rows: Iterable[tuple] = ()):
        self.table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
        for row in rows:
            self.add(*row)

    def add(self, step: int, callback: str, statistic: str, layer: str, value: float) -> None:
        self.table.setdefault((callback, statistic), {}).setdefault(int(step), {})[layer] = float(value)

    def series(self, callback: str, statistic: str, until: Optional[int] = None) -> dict[int, dict[str, float]]:
        found = self.table.get((callback, statistic), {})
        return {s: v for s, v in sorted(found.items()) if until is None or s <= until}

    def latest(self, callback: str, statistic: str, until: int) -> dict[str, float]:
        """Each layer's latest value up to ``until`` (a rotating condition sample measures a subset)."""
        merged: dict[str, float] = {}
        for values in self.series(callback, statistic, until).values():
            merged.update(values)
        return merged


def _persistent(series: dict[int, dict[str, float]], since: int, test) -> tuple[list[str], int]:
    """The layers for which ``test(value)`` holds in every sample from ``since`` on, and the number of layers."""
    steps = [s for s in series if s >= since] or list(series)[-1:]
    if not steps:
        return [], 0
    layers = list(series[steps[-1]])
    held = [n for n in layers if all(n in series[s] and test(series[s][n]) for s in steps)]
    return held, len(layers)


def _count(layers: list, total: int) -> str:
    return f"{len(layers)} of {total} layers"


def decide(samples: Samples, step: int, overrides: Optional[dict[str, float]] = None) -> Verdict:
    """The verdict at ``step`` from the ``samples`` recorded up to it (see the module docstring); ``overrides``
    (threshold name -> value) are for fitting a threshold on the design part of a corpus."""
    thresholds = {name: t.value for name, t in THRESHOLDS.items()} | dict(overrides or {})
    found = _Evidence(samples, step, thresholds)
    _activation_pathologies(found)
    _condition_pathologies(found)
    _gradient_pathologies(found)
    return _conclude(found, loss_ratio(samples, step))


@dataclass
class _Evidence:
    """What the rules found at ``step``: pathologies (a decisive one fails the run whatever the loss), the
    signals behind them (numbers, for scoring) and notes on what was not recorded."""
    samples: Samples
    step: int
    thresholds: dict
    pathologies: list = field(default_factory=list)
    decisive: list = field(default_factory=list)
    signals: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def since(self) -> int:
        """Persistent means in every sample from a quarter of the way on (the early samples v/4, v/2, v)."""
        return self.step // 4

    def enough_layers(self, count: int, total: int) -> bool:
        return total > 0 and count >= self.thresholds["layer_share"] * total


def _activation_pathologies(found: _Evidence) -> None:
    """Layers whose training-batch activations vanished, exploded or died, persistently."""
    t = found.thresholds
    if not found.samples.series(SATURATION, "train/mean_abs", found.step):
        found.notes.append("no training-batch activations recorded (ActivationSaturationMonitor)")
        return
    for statistic, test, name, words in (
            ("train/mean_abs", lambda v: v < t["vanished_mean_abs"], "vanished",
             f"vanished (mean |a| < {t['vanished_mean_abs']:g})"),
            ("train/max_abs", lambda v: v > t["exploded_max_abs"], "exploded",
             f"exploded (max |a| > {t['exploded_max_abs']:g})"),
            ("train/frac_dead", lambda v: v > t["dead_share"], "dead",
             f"dead (more than {t['dead_share']:.0%} of units never fire)")):
        series = found.samples.series(SATURATION, statistic, found.step)
        held, total = _persistent(series, found.since, test)
        found.signals[f"{name}_share"] = len(held) / max(total, 1)
        if found.enough_layers(len(held), total):
            first = min((s for s in series if s >= found.since), default=found.step)
            found.pathologies.append(f"{_count(held, total)} {words} in every sample since step {first}")
            if name == "dead" and len(held) == total:
                found.decisive.append(found.pathologies[-1])


def _condition_pathologies(found: _Evidence) -> None:
    """Layers whose representations collapsed (PlainNet's singular hidden units, by degree)."""
    samples, step, t = found.samples, found.step, found.thresholds
    near_zero = samples.latest(CONDITION, "near_zero", step) or samples.latest(CONDITION, "train/near_zero", step)
    if not near_zero:
        return
    collapsed = [n for n, v in near_zero.items() if v >= t["collapsed_share"]]
    found.signals["collapsed_share"] = len(collapsed) / len(near_zero)
    if found.enough_layers(len(collapsed), len(near_zero)):
        found.pathologies.append(f"{_count(collapsed, len(near_zero))} have collapsed representations (at least "
                                 f"{t['collapsed_share']:.0%} of singular values near zero)")


def _gradient_pathologies(found: _Evidence) -> None:
    """No gradient at all (decisive), or a first layer's gradient vanishing or exploding against the last's."""
    grads, t = found.samples.series(GRAD_FLOW, "norm", found.step), found.thresholds
    if not grads:
        return
    at = max(grads)
    norms = [v for v in grads[at].values() if math.isfinite(v)]
    if not norms:
        return
    top = max(norms)
    found.signals["max_gradient"] = top
    if top < t["no_gradient"]:
        found.pathologies.append(f"no gradient: the largest layer gradient norm is {top:.1e} at step {at}")
        found.decisive.append(found.pathologies[-1])
    elif len(norms) >= 3 and norms[-1] > 0:
        ratio = norms[0] / norms[-1]
        found.signals["gradient_ratio"] = ratio
        if ratio < t["gradient_ratio"]:
            found.pathologies.append(f"gradient vanishes: at the first layer {ratio:.1e} of the last layer's at "
                                     f"step {at}")
        elif ratio > t["gradient_explosion"]:
            found.pathologies.append(f"gradient explodes: at the first layer {ratio:.3g} times the last layer's at "
                                     f"step {at}")


def _conclude(found: _Evidence, ratio: Optional[float]) -> Verdict:
    """fails: a decisive pathology, or a pathology and a loss that did not fall; trains: no pathology and a loss
    that fell; unsure otherwise."""
    step, signals, notes, pathologies = found.step, found.signals, found.notes, found.pathologies
    if ratio is None:
        notes.append("no training loss seen (the training step returned none)")
    else:
        signals["loss_ratio"] = ratio
    learning = ratio is not None and ratio <= found.thresholds["loss_learning"]
    loss_text = "" if ratio is None else f"training loss at {ratio:.0%} of step 0's"
    if found.decisive or (pathologies and ratio is not None and not learning):
        return Verdict("fails", step, pathologies + [loss_text], signals)
    if pathologies:
        why = f"but {loss_text}" if learning else "and the loss is unknown"
        return Verdict("unsure", step, pathologies + [why] + notes, signals)
    if learning:
        return Verdict("trains", step, [f"no layer pathology; {loss_text}"], signals)
    why = f"no layer pathology, but {loss_text}" if ratio is not None else "no layer pathology"
    return Verdict("unsure", step, [why] + notes, signals)


def loss_ratio(samples: Samples, step: int) -> Optional[float]:
    """The mean training loss of the steps before ``step`` (since the previous early sample) over the step-0 loss."""
    losses = samples.series(VERDICT_CALLBACK, LOSS_STATISTIC, step)
    if len(losses) < 2:
        return None
    first, latest = losses[min(losses)][""], losses[max(losses)][""]
    if not (math.isfinite(first) and first > 0 and math.isfinite(latest)):
        return None
    return latest / first
