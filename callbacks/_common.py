"""What every diagnostic callback shares: finding layers, deciding when to sample, logging."""
from __future__ import annotations

import contextlib
import fnmatch
import time
from typing import Iterable

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                    nn.Softplus, nn.Mish, nn.ReLU6, nn.Hardtanh, nn.CELU, nn.RReLU)
WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_modules(root: nn.Module, types, include: Iterable[str] | None = None,
                   exclude: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every submodule of one of ``types`` whose name matches an ``include``
    glob (all when None) and no ``exclude`` glob, in registration order."""
    include = list(include) if include else None
    exclude = list(exclude or [])
    out = []
    for name, module in root.named_modules():
        if not name or not isinstance(module, types):
            continue
        if include is not None and not _matches(name, include):
            continue
        if _matches(name, exclude):
            continue
        out.append((name, module))
    return out


def hidden_layers(root: nn.Module, include=None, exclude=None) -> list[tuple[str, nn.Module]]:
    """Layers whose outputs are hidden representations: activation modules when the model has
    any, else every Linear/Conv except the last one (the classifier)."""
    layers = select_modules(root, ACTIVATION_TYPES, include, exclude)
    if layers:
        return layers
    return weight_layers(root, include, exclude, skip_classifier=True)


def weight_layers(root: nn.Module, include=None, exclude=None, skip_classifier: bool = False):
    layers = select_modules(root, WEIGHT_TYPES, include, exclude)
    if skip_classifier:
        head = classifier_name(root)
        layers = [(n, m) for n, m in layers if n != head]
    return layers


def classifier_name(root: nn.Module) -> str | None:
    """The name of the last Linear layer registered in the model: by convention its classifier."""
    names = [name for name, m in root.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer applies: the effective one for reparameterised layers (DiracConv2d)."""
    effective = getattr(module, "effective_weight", None)
    return effective() if callable(effective) else module.weight


class SamplingSchedule:
    """``every_n_steps`` optimizer steps, including global step 0, at most once per step."""

    def __init__(self, every_n_steps: int | None, default: int, use_log_every_n_steps: bool = False):
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps or default
        self.use_log_every_n_steps = use_log_every_n_steps
        self.last_sampled_step = -1

    def due(self, trainer) -> bool:
        step = trainer.global_step
        every = trainer.log_every_n_steps if self.use_log_every_n_steps else self.every_n_steps
        return step != self.last_sampled_step and step % max(1, every) == 0

    def mark(self, trainer) -> None:
        self.last_sampled_step = trainer.global_step


def gather_rows(trainer, stats: torch.Tensor) -> torch.Tensor:
    """Stack ``stats`` from every DDP rank along a new first dimension (one rank: unsqueeze)."""
    if trainer.world_size <= 1:
        return stats.unsqueeze(0)
    return trainer.strategy.all_gather(stats)


@rank_zero_only
def log_scalars(trainer, metrics: dict, step: int | None = None) -> None:
    step = trainer.global_step if step is None else step
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=step)


def tensorboard_writers(trainer) -> list:
    """The SummaryWriter of each TensorBoard logger (rank zero only; empty elsewhere)."""
    if trainer.global_rank != 0:
        return []
    writers = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_figure") and hasattr(experiment, "add_histogram"):
            writers.append(experiment)
    return writers


def register_layout(trainer, category: str, charts: dict) -> None:
    """Add per-statistic multiline charts to the run's TensorBoard custom-scalars layout.

    TensorBoard keeps one layout per run, so every callback's charts are merged and the whole
    layout is written again.
    """
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    layout = getattr(trainer, "_deepplain_layout", {})
    layout[category] = {title: ["Multiline", [regex]] for title, regex in charts.items()}
    trainer._deepplain_layout = layout
    for writer in writers:
        writer.add_custom_scalars(layout)


def add_figure(trainer, tag: str, figure, step: int) -> None:
    import matplotlib.pyplot as plt
    for writer in tensorboard_writers(trainer):
        writer.add_figure(tag, figure, global_step=step, close=False)
    plt.close(figure)


class OverheadBudget:
    """Keeps a callback's optional work (figures, rank-zero probes) under a share of training time.

    ``allows()`` is False while the time already spent exceeds ``fraction`` of the wall time since
    training started; the work is then postponed to a later sampling step. The first piece of work
    is always allowed (global step 0 is always sampled). ``fraction=None`` disables the budget, so
    that sampling follows ``every_n_steps`` exactly.
    """

    def __init__(self, fraction: float | None):
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(f"max_overhead must be in (0, 1) or None, got {fraction!r}")
        self.fraction, self.spent, self.started, self.postponed = fraction, 0.0, None, 0

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def allows(self) -> bool:
        if self.fraction is None or self.started is None or self.spent == 0.0:
            return True
        if self.spent <= self.fraction * (time.perf_counter() - self.started):
            return True
        self.postponed += 1
        return False

    def agreed(self, trainer) -> bool:
        """``allows()`` as decided by rank zero and shared with every rank (for work that needs a
        collective, which all ranks must enter together)."""
        allowed = self.allows() if trainer.global_rank == 0 else True
        if trainer.world_size > 1:
            allowed = bool(trainer.strategy.broadcast(allowed, src=0))
        return allowed

    def timed(self, fn):
        """``fn`` with its running time charged to this budget (for work done inside hooks)."""
        def wrapper(*args, **kwargs):
            with self.charge():
                return fn(*args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def charge(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spent += time.perf_counter() - start
