"""ConditionNumberProbe: singular (collinear) hidden units and ill-conditioned weights, layer by layer."""
from __future__ import annotations

import math

import numpy as np
import torch
from lightning.pytorch import Callback

from . import figures
from ._common import (OverheadBudget, SamplingSchedule, add_figure, hidden_layers, layer_weight, log_scalars, register_layout,
                      tensorboard_writers, weight_layers)
from ._probe import LayerCapture, ProbeBatch

REPR_STATS = ("kappa", "rank", "near_zero", "collinearity")
WEIGHT_STATS = ("weight_kappa", "weight_kappa_inf")


def _as_matrix(matrix) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, torch.Tensor) else matrix)
    m = m.detach().to(torch.float64)
    if m.dim() != 2:
        raise ValueError(f"condition_number needs a 2-D matrix, got shape {tuple(m.shape)}")
    return m


def _numerical_tolerance(singular_values: torch.Tensor, shape) -> float:
    # numpy.linalg.matrix_rank's default: S.max() * max(M, N) * eps
    return float(singular_values.max()) * max(shape) * torch.finfo(torch.float64).eps if singular_values.numel() else 0.0


def condition_number(matrix) -> float:
    """kappa = sigma_max / sigma_min of a 2-D matrix, in float64.

    Returns ``math.inf`` when the matrix is numerically singular (sigma_min at or below
    ``sigma_max * max(M, N) * eps``, numpy's rank tolerance) or all zero. For a non-square matrix
    the min(M, N) singular values are used, as ``numpy.linalg.cond`` does. NaN if the matrix has
    non-finite entries.
    """
    m = _as_matrix(matrix)
    if not bool(torch.isfinite(m).all()):
        return math.nan  # a diverged layer: reported as NaN, the divergence guard names it
    s = torch.linalg.svdvals(m)
    return _kappa(s, m.shape)


def _kappa(s: torch.Tensor, shape) -> float:
    if s.numel() == 0 or float(s.max()) == 0.0:
        return math.inf
    smin = float(s.min())
    if smin <= _numerical_tolerance(s, shape):
        return math.inf
    return float(s.max()) / smin


def infinity_norm_condition(matrix) -> float:
    """kappa_inf = ||W||_inf * ||W^+||_inf (the pseudo-inverse for non-square W); inf if singular."""
    return weight_conditions(matrix)[1]


def weight_conditions(matrix) -> tuple[float, float]:
    """(2-norm kappa, infinity-norm kappa). A square weight is inverted directly (LU, cheaper than an
    SVD); otherwise W^+ = V diag(1/s) U^T from one SVD."""
    m = _as_matrix(matrix)
    if not bool(torch.isfinite(m).all()):
        return math.nan, math.nan
    if m.shape[0] == m.shape[1]:
        s = torch.linalg.svdvals(m)
        kappa = _kappa(s, m.shape)
        if math.isinf(kappa):
            return kappa, math.inf
        inverse = torch.linalg.inv(m)
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        kappa = _kappa(s, m.shape)
        if math.isinf(kappa):
            return kappa, math.inf
        inverse = (vh.T / s) @ u.T
    norm = torch.linalg.matrix_norm(m, ord=math.inf)
    return kappa, float(norm * torch.linalg.matrix_norm(inverse, ord=math.inf))


def representation_matrix(output: torch.Tensor, max_rows: int = 4096) -> torch.Tensor:
    """A layer's output as samples x units (conv: every position is a row, channels are units),
    with at most ``max_rows`` evenly spaced rows, in float64 on the CPU."""
    x = output.detach().float()
    if x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    elif x.dim() == 1:
        x = x.unsqueeze(1)
    if x.shape[0] > max_rows:
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()]
    return x.to(torch.float64).cpu()


def representation_stats(x: torch.Tensor, near_zero_rtol: float = 1e-3) -> dict[str, float]:
    """kappa, numerical rank, share of singular values below ``near_zero_rtol * sigma_max``, and the
    mean absolute correlation between units (units with constant output are left out). All NaN
    when the representation has non-finite entries."""
    if not bool(torch.isfinite(x).all()):
        return dict.fromkeys(REPR_STATS, math.nan)
    s = torch.linalg.svdvals(x)
    tol = _numerical_tolerance(s, x.shape)
    smax = float(s.max()) if s.numel() else 0.0
    rank = int((s > tol).sum()) if smax > 0 else 0
    near_zero = float((s <= near_zero_rtol * smax).double().mean()) if smax > 0 else 1.0
    centred = x - x.mean(dim=0, keepdim=True)
    std = centred.pow(2).mean(dim=0).sqrt()
    varying = std > 1e-12 * max(1.0, float(std.max()) if std.numel() else 1.0)
    if int(varying.sum()) >= 2:
        z = centred[:, varying] / std[varying]
        corr = (z.T @ z) / x.shape[0]
        k = corr.shape[0]
        collinearity = float((corr.abs().sum() - corr.diagonal().abs().sum()) / (k * (k - 1)))
    else:
        collinearity = math.nan
    return {"kappa": _kappa(s, x.shape), "rank": float(rank), "near_zero": near_zero, "collinearity": collinearity}


def weight_matrix(module) -> torch.Tensor:
    """A layer's weight as units x inputs (a conv filter flattened to one row)."""
    w = layer_weight(module).detach()
    return w.reshape(w.shape[0], -1)


class ConditionNumberProbe(Callback):
    """Singularity diagnostics on a fixed probe batch (the PlainNet paper, Sec. V-B and Fig. 5-8).

    Every ``every_n_steps`` optimizer steps (step 0 included) it runs the probe batch through the
    model in eval mode and logs, per hidden layer: the condition number of its representation
    (``condition/kappa/<layer>``, inf when singular), numerical rank, share of near-zero singular
    values and mean absolute correlation between units; per Linear/Conv layer: the 2-norm and
    infinity-norm condition numbers of its weight. Figures: depth profiles and heatmaps of units'
    responses over the probe batch for ``heatmap_layers`` (default: the middle and last hidden
    layers). SVDs run in float64; the probe batch is saved in checkpoints. ``max_overhead`` (1% of
    training time by default) postpones a sample while the probe has used more than that share of
    the time since training started; ``None`` samples exactly every ``every_n_steps``.
    """

    def __init__(self, every_n_steps: int | None = None, probe_size: int = 256, probe_batch=None, include=None,
                 exclude=None, max_rows: int = 4096, near_zero_rtol: float = 1e-3, heatmap_layers=None,
                 weights: bool = True, figure_every_n_samples: int = 1, use_log_every_n_steps: bool = False,
                 max_overhead: float | None = 0.01):
        self.schedule = SamplingSchedule(every_n_steps, default=1000, use_log_every_n_steps=use_log_every_n_steps)
        self.budget = OverheadBudget(max_overhead)
        self.probe = ProbeBatch(probe_size, probe_batch)
        self.include, self.exclude = include, exclude
        self.max_rows, self.near_zero_rtol = max_rows, near_zero_rtol
        self.heatmap_layers, self.weights = heatmap_layers, weights
        self.figure_every = max(1, int(figure_every_n_samples))
        self.samples_taken = 0
        self.last_stats: dict[str, dict[str, float]] = {}
        self.last_weight_stats: dict[str, dict[str, float]] = {}

    def setup(self, trainer, pl_module, stage):
        self._layers = hidden_layers(pl_module, self.include, self.exclude)
        self._weights = weight_layers(pl_module, self.include, self.exclude)
        if not self._layers:
            raise ValueError(f"ConditionNumberProbe found no layers in {type(pl_module).__name__}")

    def on_fit_start(self, trainer, pl_module):
        register_layout(trainer, "condition", {s: f"condition/{s}/.*" for s in REPR_STATS + WEIGHT_STATS})

    def on_train_start(self, trainer, pl_module):
        self.budget.start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # Sampled before the step, so global step 0 shows the network as initialised.
        if self.probe.inputs is None:
            self.probe.ensure(trainer, batch)
        if not self.schedule.due(trainer):
            return
        self.schedule.mark(trainer)
        # rank zero alone probes (no collective), so its time budget can postpone a sample safely
        if trainer.global_rank == 0 and self.probe.inputs is not None and self.budget.allows():
            with self.budget.charge():
                self.sample(trainer, pl_module)

    def sample(self, trainer, pl_module) -> dict:
        """Run the probe now and log; returns the per-layer representation statistics."""
        capture = LayerCapture(self._layers, lambda name, out: representation_matrix(out, self.max_rows))
        matrices = self.probe.run(trainer, pl_module, capture)
        stats = {name: representation_stats(m, self.near_zero_rtol) for name, m in matrices.items()}
        weight_stats = {}
        if self.weights:
            for name, module in self._weights:
                kappa, kappa_inf = weight_conditions(weight_matrix(module))
                weight_stats[name] = {"weight_kappa": kappa, "weight_kappa_inf": kappa_inf}
        self.last_stats, self.last_weight_stats = stats, weight_stats
        step = trainer.global_step
        scalars = {f"condition/{k}/{name}": v for name, row in stats.items() for k, v in row.items() if not math.isnan(v)}
        scalars.update({f"condition/{k}/{name}": v for name, row in weight_stats.items() for k, v in row.items()
                        if not math.isnan(v)})
        log_scalars(trainer, scalars, step)
        if self.samples_taken % self.figure_every == 0 and tensorboard_writers(trainer):
            self._draw(trainer, stats, weight_stats, matrices, step)
        self.samples_taken += 1
        return stats

    def _draw(self, trainer, stats, weight_stats, matrices, step):
        names = list(stats)
        fig = figures.depth_profile({"representation kappa": [stats[n]["kappa"] for n in names]},
                                    f"condition number of hidden representations (step {step})", "kappa", log_y=True)
        add_figure(trainer, "condition/profile_representation", fig, step)
        fig = figures.depth_profile({"mean |corr| between units": [stats[n]["collinearity"] for n in names],
                                     "share of near-zero singular values": [stats[n]["near_zero"] for n in names]},
                                    f"collinearity and singularity (step {step})", "share")
        add_figure(trainer, "condition/profile_collinearity", fig, step)
        if weight_stats:
            wn = list(weight_stats)
            fig = figures.depth_profile({"2-norm": [weight_stats[n]["weight_kappa"] for n in wn],
                                         "inf-norm": [weight_stats[n]["weight_kappa_inf"] for n in wn]},
                                        f"condition number of weights (step {step})", "kappa", log_y=True)
            add_figure(trainer, "condition/profile_weights", fig, step)
        for name in self._heatmap_names(names):
            m = matrices[name]
            fig = figures.unit_heatmap(m.numpy(), f"units' responses at {name} (step {step})")
            add_figure(trainer, f"condition/heatmap/{name}", fig, step)

    def _heatmap_names(self, names: list[str]) -> list[str]:
        if self.heatmap_layers is None:
            return sorted({names[len(names) // 2], names[-1]}, key=names.index)
        chosen = []
        for item in self.heatmap_layers:
            if isinstance(item, int) and -len(names) <= item < len(names):
                chosen.append(names[item])
            elif item in names:
                chosen.append(item)
        return chosen

    def state_dict(self):
        return {"probe": self.probe.state_dict(), "samples_taken": self.samples_taken,
                "last_sampled_step": self.schedule.last_sampled_step}

    def load_state_dict(self, state_dict):
        self.probe.load_state_dict(state_dict.get("probe", {}))
        self.samples_taken = state_dict.get("samples_taken", 0)
        self.schedule.last_sampled_step = state_dict.get("last_sampled_step", -1)
