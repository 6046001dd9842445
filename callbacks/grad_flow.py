"""GradientFlowMonitor: per-layer gradient norms, to see where gradients vanish or explode."""
from __future__ import annotations

import torch
from lightning.pytorch import Callback

from . import figures
from ._common import OverheadBudget, SamplingSchedule, add_figure, log_scalars, register_layout, tensorboard_writers, weight_layers


class GradientFlowMonitor(Callback):
    """Every ``every_n_steps`` optimizer steps (step 0 included): the L2 norm and mean |grad| of each
    Linear/Conv weight's gradient (``grad_flow/norm/<layer>``, ``grad_flow/mean_abs/<layer>``), and a
    gradient-flow figure every ``figure_every_n_samples`` samples (the coursework report's Fig. 2/3).

    Gradients are read in ``on_before_optimizer_step``: after DDP's all-reduce and after the
    mixed-precision unscale, so every rank sees the same values and rank zero logs them.
    ``max_overhead`` (1% of training time by default) postpones samples while this callback has used
    more than that share of the time since training started; ``None`` samples exactly on cadence.
    """

    def __init__(self, every_n_steps: int | None = None, include=None, exclude=None, figure_every_n_samples: int = 10,
                 use_log_every_n_steps: bool = False, max_overhead: float | None = 0.01):
        self.schedule = SamplingSchedule(every_n_steps, default=200, use_log_every_n_steps=use_log_every_n_steps)
        self.budget = OverheadBudget(max_overhead)
        self._figure_due = True
        self.include, self.exclude = include, exclude
        self.figure_every = max(1, int(figure_every_n_samples))
        self.samples_taken = 0
        self.last_stats: dict[str, dict[str, float]] = {}

    def setup(self, trainer, pl_module, stage):
        self._layers = weight_layers(pl_module, self.include, self.exclude)

    def on_fit_start(self, trainer, pl_module):
        register_layout(trainer, "grad_flow", {"gradient norm": "grad_flow/norm/.*",
                                               "mean |grad|": "grad_flow/mean_abs/.*"})

    def on_train_start(self, trainer, pl_module):
        self.budget.start()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.schedule.due(trainer):
            return
        self.schedule.mark(trainer)
        if trainer.global_rank != 0 or not self.budget.allows():
            return
        with self.budget.charge():
            self._sample(trainer)

    def _sample(self, trainer):
        names, rows = [], []
        for name, module in self._layers:
            grad = module.weight.grad
            if grad is None:
                continue
            g = grad.detach().float()
            names.append(name)
            rows.append(torch.stack([g.norm(), g.abs().mean()]))
        if not rows:
            return
        values = torch.stack(rows).cpu().tolist()
        self.last_stats = {n: {"norm": v[0], "mean_abs": v[1]} for n, v in zip(names, values)}
        step = trainer.global_step
        metrics = {}
        for n, (norm, mean_abs) in zip(names, values):
            metrics[f"grad_flow/norm/{n}"] = norm
            metrics[f"grad_flow/mean_abs/{n}"] = mean_abs
        log_scalars(trainer, metrics, step)
        if self.samples_taken % self.figure_every == 0:
            self._figure_due = True
        if self._figure_due and tensorboard_writers(trainer):
            self._figure_due = False
            fig = figures.depth_profile({"grad norm": [v[0] for v in values], "mean |grad|": [v[1] for v in values]},
                                        f"gradient flow (step {step})", "gradient", log_y=True)
            add_figure(trainer, "grad_flow/profile", fig, step)
        self.samples_taken += 1

    def state_dict(self):
        return {"samples_taken": self.samples_taken, "last_sampled_step": self.schedule.last_sampled_step}

    def load_state_dict(self, state_dict):
        self.samples_taken = state_dict.get("samples_taken", 0)
        self.schedule.last_sampled_step = state_dict.get("last_sampled_step", -1)
