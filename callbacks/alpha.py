"""AlphaScheduler: phase out VAN skip connections by driving every alpha to 1."""
from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback

from deepplain.errors import ConfigError
from deepplain.models.residual import iter_skip_gates

from ._common import log_scalars, register_layout

MODES = ("lagrangian", "unconstrained", "linear", "cosine")


class AlphaScheduler(Callback):
    """Drives the ``alpha`` of every VAN skip gate (a module with an ``alpha`` parameter and a
    ``lagrange_lambda`` buffer, see ``deepplain.models.residual.SkipGate``) towards 1.

    Modes:
    * ``lagrangian`` (Monti et al., eq. 7-8): before each optimizer step lambda is added to alpha's
      gradient, so SGD takes ``alpha <- alpha - eta (dL/dalpha + lambda)``; after it alpha is clipped
      to [0, 1] and ``lambda <- lambda + eta' (alpha - 1)`` with ``eta' = lambda_lr_ratio * lr``.
      lambda starts at -1 and only decreases, pushing alpha up until it reaches 1.
    * ``unconstrained``: lambda = 0 (the paper's "VAN (lambda=0)"); alpha is only clipped.
    * ``linear`` / ``cosine``: alpha is set deterministically, reaching 1 at ``end_epoch``
      (default: half of ``max_epochs``) and excluded from gradient updates.

    Logs ``alpha/residual`` = (1/L) sum_l mean((1 - alpha_l)^2), and per gate ``alpha/mean/<gate>``
    and ``alpha/lambda/<gate>`` every ``every_n_steps`` steps. lambda lives in the model's buffers
    and the step counter in this callback's state, so both survive checkpoint and resume.
    """

    def __init__(self, mode: str = "lagrangian", lambda_lr_ratio: float = 0.5, end_epoch: int | None = None,
                 every_n_steps: int = 50):
        if mode not in MODES:
            raise ConfigError(f"AlphaScheduler mode must be one of {', '.join(MODES)}, got {mode!r}")
        if lambda_lr_ratio < 0:
            raise ConfigError(f"lambda_lr_ratio must be >= 0, got {lambda_lr_ratio}")
        self.mode, self.lambda_lr_ratio, self.end_epoch = mode, float(lambda_lr_ratio), end_epoch
        self.every_n_steps = max(1, int(every_n_steps))
        self._gates = []
        self._last_step = None

    def setup(self, trainer, pl_module, stage):
        self._gates = list(iter_skip_gates(pl_module))
        if not self._gates:
            raise ConfigError(f"AlphaScheduler found no VAN skip gates in {type(pl_module).__name__}: it needs modules "
                              "with an 'alpha' parameter and a 'lagrange_lambda' buffer (deepplain's van family)")

    def on_fit_start(self, trainer, pl_module):
        register_layout(trainer, "alpha", {"mean alpha": "alpha/mean/.*", "lambda": "alpha/lambda/.*",
                                           "alpha residual": "alpha/residual"})
        if self.mode in ("linear", "cosine"):
            for _, gate in self._gates:
                gate.alpha.requires_grad_(False)
            self._set_scheduled(trainer)
        elif self.mode == "unconstrained":
            for _, gate in self._gates:
                gate.lagrange_lambda.zero_()

    def on_train_start(self, trainer, pl_module):
        self._last_step = trainer.global_step
        self._log(trainer)

    # -- lagrangian: lambda enters alpha's gradient ------------------------------------------------
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.mode != "lagrangian":
            return
        for _, gate in self._gates:
            if gate.alpha.grad is not None:
                gate.alpha.grad.add_(gate.lagrange_lambda.to(gate.alpha.grad.dtype))
            else:
                gate.alpha.grad = gate.lagrange_lambda.clone().to(gate.alpha.dtype)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.mode in ("linear", "cosine"):
            self._set_scheduled(trainer, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = trainer.global_step
        if self.mode in ("lagrangian", "unconstrained"):
            lr = self._alpha_lr(trainer)
            with torch.no_grad():
                for _, gate in self._gates:
                    gate.alpha.clamp_(0.0, 1.0)
                    if self.mode == "lagrangian":
                        gate.lagrange_lambda.add_(self.lambda_lr_ratio * lr * (gate.alpha.detach() - 1.0))
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._log(trainer)

    # -- helpers -------------------------------------------------------------------------------------
    def _alpha_lr(self, trainer) -> float:
        alpha_ids = {id(gate.alpha) for _, gate in self._gates}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if any(id(p) in alpha_ids for p in group["params"]):
                    return float(group["lr"])
        return float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else 0.0

    def scheduled_alpha(self, trainer, batch_idx: int = 0) -> float:
        end = self.end_epoch or max(1, (trainer.max_epochs or 2) // 2)
        batches = max(1, int(trainer.num_training_batches) if math.isfinite(trainer.num_training_batches) else 1)
        progress = min(1.0, (trainer.current_epoch + batch_idx / batches) / end)
        return progress if self.mode == "linear" else 0.5 * (1.0 - math.cos(math.pi * progress))

    def _set_scheduled(self, trainer, batch_idx: int = 0):
        value = self.scheduled_alpha(trainer, batch_idx)
        with torch.no_grad():
            for _, gate in self._gates:
                gate.alpha.fill_(value)

    def summary(self) -> dict:
        """Mean alpha and lambda per gate and the alpha residual, as floats."""
        with torch.no_grad():
            alphas = [gate.alpha.detach().float() for _, gate in self._gates]
            lambdas = [gate.lagrange_lambda.detach().float() for _, gate in self._gates]
            rows = torch.stack([torch.stack([a.mean(), lam.mean(), (1 - a).pow(2).mean()])
                                for a, lam in zip(alphas, lambdas)]).cpu()
        out = {"residual": float(rows[:, 2].mean())}
        for (name, _), (alpha, lam, _) in zip(self._gates, rows.tolist()):
            out[f"mean/{name}"] = alpha
            out[f"lambda/{name}"] = lam
        return out

    def _log(self, trainer):
        if self._gates:
            log_scalars(trainer, {f"alpha/{k}": v for k, v in self.summary().items()})

    def state_dict(self):
        return {"mode": self.mode, "lambda_lr_ratio": self.lambda_lr_ratio, "end_epoch": self.end_epoch}

    def load_state_dict(self, state_dict):
        if state_dict.get("mode", self.mode) != self.mode:
            raise ConfigError(f"checkpoint was trained with alpha mode {state_dict['mode']!r}, not {self.mode!r}")
