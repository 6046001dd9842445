r"""AlphaScheduler: phase out VAN skip connections by driving every alpha to 1.

A VAN block computes ``x_{l+1} = F(x_l) + (1 - alpha_l) * x_l`` (Monti et al., eq. 4), with alpha
starting at 0 (a ResNet) and constrained to 1 (a plain network) at the end of training through
Lagrange multipliers lambda (eq. 6-8)::

    alpha <- clip(alpha - eta_alpha (dC/dalpha + lambda), 0, 1)        (eq. 7)
    lambda <- lambda + eta_lambda (alpha - 1),   lambda_0 = -1          (eq. 8)

The paper gives eta_lambda / eta = 0.5 (MLPs) or 0.1 (CIFAR) but not how fast the skips should go,
and eq. 7 taken literally with the network's own learning rate removes them within ~1/eta steps
(10 steps at eta = 0.1), while its Fig. 2 shows them fading over about 120 of 165 epochs.

**Calibrated step sizes** (mode ``lagrangian``, the default). alpha and lambda take their own SGD
steps -- no momentum, no weight decay, independent of the learning-rate schedule -- sized so
that every skip is gone after a chosen share of training. Write ``u = 1 - alpha`` for one unit
and ``r = eta_lambda / eta_alpha`` (the paper's ratio). The constraint term dominates eq. 7
(measured ``|dC/dalpha|`` <= 0.04 against ``|lambda|`` >= 1), and without dC/dalpha eq. 7-8 read
``u_{t+1} = u_t + eta_alpha lambda_t``, ``lambda_{t+1} = lambda_t - r eta_alpha u_{t+1}``: for small
steps ``u'' = -r eta_alpha^2 u`` with ``u(0) = 1``, ``u'(0) = -eta_alpha``, so

    u(t) = cos(w t) - sin(w t) / sqrt(r),    w = sqrt(r) eta_alpha,

which reaches 0 when ``w T = arctan(sqrt(r))``. Hence, for skips gone at step T,

    eta_alpha = arctan(sqrt(r)) / (sqrt(r) T),    eta_lambda = r eta_alpha

(within one step of T for T >= 20; r -> 0 gives 1/T). The mean alpha residual
``(1/L) sum_l mean((1 - alpha_l)^2)`` then falls smoothly from 1 to 0 at T -- a quarter of the
way down at T/2 -- and lambda ends near -1 - r/2 (-1.2 for r = 0.5, -1.05 for r = 0.1), holding
alpha at 1 afterwards. The network's gradient still acts: where the loss resists, alpha lags
and lambda grows to compensate, which is the Lagrangian's job; a unit whose loss gradient
outweighs lambda can stay open past T (seen on the VAN MLP recipe in short runs). The paper asks
for alpha = 1 only at the end of training, and its Fig. 2 keeps the skips removed after they go,
so from step T on the constraint is enforced exactly: the remaining alphas are set to 1 and
lambda is frozen. The run reports how many units that closed and the residual they had. T is
``phase_out`` times the run's optimizer steps (a share below 1, an epoch number from 1), by
default 120/165, the share of the paper's Fig. 2.

Other modes: ``literal`` (eq. 7-8 per step with eta = the optimizer's current learning rate,
without its momentum), ``unconstrained`` (lambda = 0, the paper's "VAN (lambda=0)": alpha follows
its gradient at the optimizer's learning rate), ``linear`` and ``cosine`` (alpha set
deterministically, reaching 1 at ``phase_out``). The first three are update rules
(:class:`UpdateRule`), the last two schedules, functions of the step (:class:`AlphaSchedule`).

In every mode alpha is updated here, in ``on_before_optimizer_step`` (after DDP's all-reduce
and the mixed-precision unscale), and its gradient is then cleared, so the model's optimizer
never moves it, whatever optimizer it is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from . import outputs
from .arguments import check_int, check_number
from .probing import glob_list, skip_gates
from .publish import DepthTimeSpec, Publisher, finish_run_files
from .records import DiagnosticsTable
from .sampling import every_percent
from .tags import OverviewScalar, overview_values
from .tensorboard import write_layout

PAPER_PHASE_OUT = (120, 165)  # the VAN paper's Fig. 2: skips gone at about epoch 120 of 165
DEFAULT_PHASE_OUT = PAPER_PHASE_OUT[0] / PAPER_PHASE_OUT[1]
PAPER_LAMBDA_LR_RATIO = {"conv": 0.1, "mlp": 0.5}  # eta'/eta: the paper's CIFAR networks and its MLPs


@dataclass(frozen=True)
class UpdateRule:
    """alpha moved by eq. 7 at every optimizer step, lambda by eq. 8.

    ``calibrated``: step sizes from ``phase_out`` (:func:`calibrated_step_sizes`) and the constraint
    enforced exactly from the target step on; otherwise eta is the optimizer's current learning rate.
    ``constrained``: lambda takes part (False: the paper's "VAN (lambda = 0)", lambda held at 0).
    """
    calibrated: bool
    constrained: bool

    def step_sizes(self, optimizer_lr: float, lambda_lr_ratio: float) -> tuple[float, float]:
        """(eta_alpha, eta_lambda) of an uncalibrated rule at the optimizer's learning rate."""
        return optimizer_lr, (lambda_lr_ratio * optimizer_lr if self.constrained else 0.0)


@dataclass(frozen=True)
class AlphaSchedule:
    """alpha set to ``shape(progress)`` for every unit, progress = step / target step (capped at 1)."""
    shape: Callable[[float], float]

    def alpha(self, step: int, target_step: int) -> float:
        return self.shape(min(1.0, step / max(1, target_step)))


UPDATE_RULES = {"lagrangian": UpdateRule(calibrated=True, constrained=True),
                "literal": UpdateRule(calibrated=False, constrained=True),
                "unconstrained": UpdateRule(calibrated=False, constrained=False)}
SCHEDULES = {"linear": AlphaSchedule(lambda p: p),
             "cosine": AlphaSchedule(lambda p: 0.5 * (1.0 - math.cos(math.pi * p)))}
MODES = tuple(UPDATE_RULES) + tuple(SCHEDULES)
DEFAULT_MODE = "lagrangian"  # the paper's eq. 7-8, calibrated


def calibrated_step_sizes(target_steps: int, lambda_lr_ratio: float) -> tuple[float, float]:
    """(eta_alpha, eta_lambda) that close every skip after ``target_steps`` steps (module docstring)."""
    if target_steps < 1:
        raise ValueError(f"target_steps must be >= 1, got {target_steps}")
    r = float(lambda_lr_ratio)
    factor = math.atan(math.sqrt(r)) / math.sqrt(r) if r > 0 else 1.0
    eta_alpha = factor / target_steps
    return eta_alpha, r * eta_alpha


@torch.no_grad()
def lagrangian_steps(gates, grads, eta_alpha: float, eta_lambda: float, constrained: bool) -> torch.Tensor:
    """Eq. 7-8 on every gate at once, in place: their values are concatenated, so a step is a dozen tensor
    operations whatever the number of gates. A step in which any gradient is not finite (one the loss scaler
    skips) changes nothing. Returns the gates' new alphas, concatenated."""
    alphas = [gate.alpha for gate in gates]
    lams = [gate.lagrange_lambda for gate in gates]
    sizes = [a.numel() for a in alphas]
    alpha = torch.cat([a.detach().reshape(-1) for a in alphas])
    grad = torch.cat([g.reshape(-1) for g in grads]).to(alpha.dtype)
    finite = torch.isfinite(grad).all()
    lam = torch.cat([v.reshape(-1) for v in lams]) if constrained or eta_lambda else None
    push = grad + lam.to(alpha.dtype) if constrained else grad
    alpha = torch.where(finite, (alpha - eta_alpha * push).clamp(0.0, 1.0), alpha)
    torch._foreach_copy_([a.view(-1) for a in alphas], list(alpha.split(sizes)))
    if eta_lambda:
        lam = lam + torch.where(finite, eta_lambda * (alpha.to(lam.dtype) - 1.0), torch.zeros_like(lam))
        torch._foreach_copy_([v.view(-1) for v in lams], list(lam.split(sizes)))
    return alpha


def lagrangian_step(gate: nn.Module, grad: torch.Tensor, eta_alpha: float, eta_lambda: float,
                    constrained: bool) -> None:
    """:func:`lagrangian_steps` on one gate."""
    lagrangian_steps([gate], [grad], eta_alpha, eta_lambda, constrained)


class AlphaScheduler(Callback):
    """Drives the ``alpha`` of every VAN skip gate to 1; see the module docstring for the dynamics.

    A skip gate is any module with a parameter ``alpha`` and a buffer ``lagrange_lambda`` of the
    same shape (deepplain's ``SkipGate``; ``include``/``exclude`` globs pick some by name).

    Args:
        mode: ``lagrangian`` (calibrated eq. 7-8, default), ``literal``, ``unconstrained``,
            ``linear`` or ``cosine``.
        lambda_lr_ratio: ``r = eta_lambda / eta_alpha``; default the paper's (:data:`PAPER_LAMBDA_LR_RATIO`):
            0.1 for a model with convolutions, 0.5 for an MLP.
        phase_out: when the skips must be gone: a share of training (< 1) or an epoch (>= 1).
            Default 120/165. Used by ``lagrangian``, ``linear`` and ``cosine``.
        alpha_lr: ``eta_alpha`` given directly instead of derived from ``phase_out``.
        every_n_steps: logging interval of the ``alpha/*`` scalars (also logged at epoch ends);
            default: every 1% of the run (every 50 steps when its length is unknown).
        per_layer_scalars: also one scalar per gate (off: a VAN-30 has 60 of them; every gate's
            values are in ``diagnostics.csv`` and the depth x time image).

    TensorBoard: ``alpha/residual`` (the paper's mean alpha residual), ``alpha/share_removed``
    (share of units with alpha = 1), ``alpha/lambda``, the same two as ``overview/alpha_residual``
    and ``overview/alpha_share_removed``, the depth x time image ``alpha/depth_time/mean`` (each
    gate's mean alpha, redrawn at epoch ends), and with ``per_layer_scalars=True`` per gate
    ``alpha/mean/<gate>`` and ``alpha/lambda/<gate>``. At the end of training it reports the step at
    which every skip was gone, or how far the alphas still are from 1.

    Example::

        import lightning as L
        from deepplain.callbacks import AlphaScheduler
        trainer = L.Trainer(max_epochs=50, logger=False, enable_checkpointing=False,
                            callbacks=[AlphaScheduler("lagrangian", lambda_lr_ratio=0.5, phase_out=0.75)])
    """

    prefix = "alpha"
    residual_tag = f"{prefix}/residual"  # the share of skip weight left (deepplain.curves reads it)
    overview_scalars = (OverviewScalar("alpha_residual", "VAN skips: alpha residual and share removed"),
                        OverviewScalar("alpha_share_removed", "VAN skips: alpha residual and share removed"))
    overview_images = {"train": ("mean",)}

    def __init__(self, mode: str = DEFAULT_MODE, lambda_lr_ratio: Optional[float] = None,
                 phase_out: Optional[float] = None,
                 alpha_lr: Optional[float] = None, include: Optional[list[str]] = None,
                 exclude: Optional[list[str]] = None, every_n_steps: Optional[int] = None,
                 per_layer_scalars: bool = False):
        if mode not in MODES:
            raise ValueError(f"AlphaScheduler mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_number("lambda_lr_ratio", lambda_lr_ratio, 0, allow_none=True, what="a finite number >= 0")
        check_number("phase_out", phase_out, 0, low_open=True, allow_none=True,
                     what="a share of training in (0, 1) or an epoch >= 1")
        check_number("alpha_lr", alpha_lr, 0, low_open=True, allow_none=True, what="a positive finite number")
        check_int("every_n_steps", every_n_steps, allow_none=True)
        self.mode = mode
        self.rule, self.schedule = UPDATE_RULES.get(mode), SCHEDULES.get(mode)  # exactly one of them
        self.lambda_lr_ratio = float(lambda_lr_ratio) if lambda_lr_ratio is not None else None
        self.phase_out = float(phase_out) if phase_out is not None else DEFAULT_PHASE_OUT
        self.include, self.exclude = glob_list("include", include), glob_list("exclude", exclude)
        self.every_n_steps = every_n_steps
        self.log_every = every_n_steps or 50
        self.publisher = Publisher(self.prefix, {"mean": DepthTimeSpec("mean alpha per gate (1: no skip)",
                                                                   vmin=0.0, vmax=1.0, label="mean alpha")},
                                   {}, per_layer_scalars=per_layer_scalars)
        self.alpha_lr = float(alpha_lr) if alpha_lr is not None else None
        self.lambda_lr = None
        self.target_step: Optional[int] = None
        self._removed_step_saved: Optional[int] = None  # from a checkpoint, until training starts
        self.closed_at_target: Optional[dict] = None  # units the projection at T closed, and their residual
        self.steps_per_epoch: Optional[float] = None
        self._gates: list = []
        self._removed_at: Optional[torch.Tensor] = None  # on the device: first step with every alpha == 1
        self._last_update_step: Optional[int] = None
        self._logged_step: Optional[int] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def gates(self) -> list:
        """``(name, gate)`` of every skip gate this scheduler drives (empty before ``setup``)."""
        return list(self._gates)

    @property
    def removed_step(self) -> Optional[int]:
        """The first step after which every alpha was 1, or None."""
        if self._removed_at is None:
            return self._removed_step_saved
        step = int(self._removed_at)
        return step if step >= 0 else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._gates = skip_gates(pl_module, self.include, self.exclude)
        if not self._gates:
            raise ValueError(f"AlphaScheduler found no VAN skip gates in {type(pl_module).__name__}: it needs modules "
                             "with an 'alpha' parameter and a 'lagrange_lambda' buffer of the same shape (e.g. "
                             "deepplain's van family)")
        if self.lambda_lr_ratio is None:
            convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in pl_module.modules())
            self.lambda_lr_ratio = PAPER_LAMBDA_LR_RATIO["conv" if convolutional else "mlp"]
        if self.alpha_lr is not None and self.lambda_lr is None:
            self.lambda_lr = self.lambda_lr_ratio * self.alpha_lr

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rule is not None and not self.rule.constrained:
            with torch.no_grad():
                for _, gate in self._gates:
                    gate.lagrange_lambda.zero_()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_layout(trainer, self)
        outputs.announce(trainer)  # where the run's files go, said once
        total = float(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self.steps_per_epoch = total / epochs if epochs and math.isfinite(total) else None
        calibrated = self.rule is not None and self.rule.calibrated
        if self.target_step is None and (self.schedule is not None or calibrated):
            self.target_step = self._target_steps(total)
        if calibrated and self.alpha_lr is None:
            self.alpha_lr, self.lambda_lr = calibrated_step_sizes(self.target_step, self.lambda_lr_ratio)
        device = self._gates[0][1].alpha.device
        saved = self.removed_step
        self._removed_at = torch.tensor(-1 if saved is None else saved, device=device)
        self._last_update_step = None
        if self.schedule is not None:
            self._set_scheduled(trainer.global_step)
        if self.every_n_steps is None:
            self.log_every = every_percent(trainer, 50)
        self._log(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.schedule is not None:
            self._set_scheduled(trainer.global_step)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        step = trainer.global_step
        if step == self._last_update_step:  # one update per optimizer step
            return
        self._last_update_step = step
        if self.schedule is not None:  # alpha is set at the batch start, not learnt
            for _, gate in self._gates:
                gate.alpha.grad = None
            return
        if self.rule.calibrated:
            if step + 1 >= self.target_step:  # from T on the constraint holds exactly: a plain network
                self._enforce_constraint(step + 1)
                return
            eta_alpha, eta_lambda = self.alpha_lr, self.lambda_lr
        else:
            eta_alpha, eta_lambda = self.rule.step_sizes(self._optimizer_lr(optimizer), self.lambda_lr_ratio)
        stepped, grads = [], []
        for _, gate in self._gates:
            if gate.alpha.grad is not None:
                unscale = self._unscale(trainer, optimizer, gate)
                stepped.append(gate)
                grads.append(gate.alpha.grad if unscale == 1.0 else gate.alpha.grad * unscale)
            gate.alpha.grad = None  # the optimizer must not move alpha (no momentum, no weight decay)
        alphas = lagrangian_steps(stepped, grads, eta_alpha, eta_lambda, self.rule.constrained) if stepped else None
        self._note_removal(step + 1, alphas if len(stepped) == len(self._gates) else None)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.log_every == 0:
            self._log(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)
        self.publisher.draw(trainer, trainer.global_step)  # the image grows epoch by epoch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)
        self.draw_at_end(trainer)
        report = self.report(trainer.global_step)
        if report:
            rank_zero_info(report)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.draw_at_end(trainer)  # a run that diverged or was stopped gets its pictures too

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        DiagnosticsTable.close_for(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "lambda_lr_ratio": self.lambda_lr_ratio, "phase_out": self.phase_out,
                "alpha_lr": self.alpha_lr, "lambda_lr": self.lambda_lr, "target_step": self.target_step,
                "removed_step": self.removed_step, "closed_at_target": self.closed_at_target}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("mode", self.mode) != self.mode:
            raise ValueError(f"the checkpoint was trained with alpha mode {state_dict['mode']!r}, not {self.mode!r}")
        # The step sizes fixed when training started are kept, so a resumed run follows the same trajectory.
        for key in ("lambda_lr_ratio", "alpha_lr", "lambda_lr", "target_step", "closed_at_target"):
            if state_dict.get(key) is not None:
                setattr(self, key, state_dict[key])
        self._removed_step_saved = state_dict.get("removed_step")

    def tensorboard_layout(self) -> dict:
        p = self.prefix
        charts = {"alpha residual": self.residual_tag, "share of units removed": f"{p}/share_removed",
                  "mean lambda": f"{p}/lambda$"}
        if self.publisher.per_layer_scalars:
            charts.update({"mean alpha per gate": f"{p}/mean/.*", "lambda per gate": f"{p}/lambda/.*"})
        return {p: charts}

    def draw_at_end(self, trainer) -> None:
        """The image at the run's last step, overview.png and the uploads, however the run ended."""
        self.publisher.draw(trainer, trainer.global_step)
        finish_run_files(trainer, self)

    def summary(self) -> dict:
        """``residual`` (mean over gates of mean (1 - alpha)^2), ``share_removed`` (units with
        alpha = 1), ``lambda`` (mean), ``removed_step`` (first step with every alpha = 1, or None),
        and per gate ``mean/<gate>`` and ``lambda/<gate>``."""
        with torch.no_grad():  # every gate at once: per-unit columns summed per gate by one index_add
            alpha = torch.cat([g.alpha.detach().reshape(-1) for _, g in self._gates]).float()
            lam = torch.cat([g.lagrange_lambda.reshape(-1) for _, g in self._gates]).float()
            sizes = torch.tensor([g.alpha.numel() for _, g in self._gates], device=alpha.device)
            owner = torch.repeat_interleave(torch.arange(len(sizes), device=alpha.device), sizes)
            columns = torch.stack([alpha, lam, (1 - alpha).pow(2), (alpha == 1).float()], dim=1)
            sums = torch.zeros(len(sizes), 4, device=alpha.device).index_add_(0, owner, columns)
            count = sizes.float()[:, None]
            rows = torch.cat([sums[:, :3] / count, sums[:, 3:], count], dim=1).cpu()
        out = {"residual": float(rows[:, 2].mean()), "share_removed": float(rows[:, 3].sum() / rows[:, 4].sum()),
               "lambda": float((rows[:, 1] * rows[:, 4]).sum() / rows[:, 4].sum()), "removed_step": self.removed_step}
        for (name, _), (alpha, lam, *_rest) in zip(self._gates, rows.tolist()):
            out[f"mean/{name}"] = alpha
            out[f"lambda/{name}"] = lam
        return out

    def report(self, step: int) -> str:
        """One line: when every skip was gone, or how far the alphas are from 1."""
        if not self._gates:
            return ""
        s = self.summary()
        if s["removed_step"] is not None:
            where = f"step {s['removed_step']}"
            if self.steps_per_epoch:
                where += f" (epoch {s['removed_step'] / self.steps_per_epoch:.2f})"
            closed = ""
            if self.closed_at_target and self.closed_at_target["units"]:
                c = self.closed_at_target
                closed = (f" ({c['units']} units still open at the target step {c['step']} were closed there; their "
                          f"residual was {c['residual']:.3g})")
            return (f"AlphaScheduler ({self.mode}): every skip connection removed at {where}{closed}; the network is "
                    "plain")
        alphas = torch.cat([g.alpha.detach().flatten().float() for _, g in self._gates])
        below = int((alphas < 1).sum())
        return (f"AlphaScheduler ({self.mode}): {below} of {alphas.numel()} alphas are still below 1 at step {step} "
                f"(max 1 - alpha = {float((1 - alphas).max()):.3g}, residual {s['residual']:.3g}): skip connections "
                "remain, and deepplain.fold needs every alpha == 1")

    def _target_steps(self, total: float) -> int:
        if not math.isfinite(total):
            raise ValueError("AlphaScheduler needs a run of known length (max_epochs or max_steps) to place phase_out")
        if self.phase_out < 1:
            steps = self.phase_out * total
        elif self.steps_per_epoch is None:
            raise ValueError(f"phase_out={self.phase_out:g} is an epoch, but the trainer has no max_epochs; give a "
                             "share of training (< 1) instead")
        else:
            steps = self.phase_out * self.steps_per_epoch
        return int(min(total, max(1, round(steps))))

    def _optimizer_lr(self, optimizer) -> float:
        alpha_ids = {id(gate.alpha) for _, gate in self._gates}
        for group in optimizer.param_groups:
            if any(id(p) in alpha_ids for p in group["params"]):
                return float(group["lr"])
        return float(optimizer.param_groups[0]["lr"])

    @staticmethod
    def _unscale(trainer, optimizer, gate) -> float:
        """1 / loss scale when alpha's gradient was not unscaled (16-mixed, alpha outside the optimizer)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or any(p is gate.alpha for g in optimizer.param_groups for p in g["params"]):
            return 1.0
        return 1.0 / float(scaler.get_scale())

    def _enforce_constraint(self, step: int) -> None:
        with torch.no_grad():
            if self.closed_at_target is None:  # the first time: record what the projection changes
                alphas = torch.cat([g.alpha.detach().flatten().float() for _, g in self._gates])
                self.closed_at_target = {"step": step, "units": int((alphas < 1).sum()),
                                         "residual": float((1 - alphas).pow(2).mean())}
            for _, gate in self._gates:
                gate.alpha.fill_(1.0)
                gate.alpha.grad = None
            self._note_removal(step)

    def _note_removal(self, step: int, alphas: Optional[torch.Tensor] = None) -> None:
        """Record, on the device and without a host sync, the first step after which every alpha is 1
        (``alphas``: every gate's alpha concatenated, when at hand)."""
        if alphas is None:
            alphas = torch.cat([gate.alpha.detach().flatten() for _, gate in self._gates])
        closed = alphas.min() >= 1
        self._removed_at = torch.where(closed & (self._removed_at < 0), torch.full_like(self._removed_at, step),
                                       self._removed_at)

    def _set_scheduled(self, step: int) -> None:
        value = self.schedule.alpha(step, self.target_step or 1)
        with torch.no_grad():
            for _, gate in self._gates:
                gate.alpha.fill_(value)
        if value >= 1.0:
            self._note_removal(step)

    def _log(self, trainer):
        """The summary scalars and overview, and each gate's mean alpha and lambda (table, image; per-gate
        scalars if asked), once per step at most."""
        if not self._gates or trainer.global_rank != 0 or self._logged_step == trainer.global_step:
            return
        self._logged_step = trainer.global_step
        s = self.summary()
        gates = {name: {"mean": s[f"mean/{name}"], "lambda": s[f"lambda/{name}"]} for name, _ in self._gates}
        scalars = {self.residual_tag: s["residual"], f"{self.prefix}/share_removed": s["share_removed"],
                   f"{self.prefix}/lambda": s["lambda"],
                   **overview_values(self.overview_scalars, {"alpha_residual": s["residual"],
                                                             "alpha_share_removed": s["share_removed"]})}
        self.publisher.publish(trainer, trainer.global_step, "train", gates, extra_scalars=scalars)
