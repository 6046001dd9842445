"""ActivationSaturationMonitor: vanishing, exploding and dead units, layer by layer."""
from __future__ import annotations

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from . import figures
from ._common import (OverheadBudget, SamplingSchedule, add_figure, gather_rows, hidden_layers, log_scalars, register_layout,
                      select_modules, tensorboard_writers)
from ._probe import LayerCapture, ProbeBatch

STATS = ("mean_abs", "max_abs", "frac_low", "frac_high", "frac_zero", "frac_dead")


def activation_stats(a: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums for one layer's output: ``[sum |a|, count, max |a|, #|a|<low, #|a|>high, #a==0]`` and,
    per unit (feature or channel: dim 1), whether it was non-zero anywhere in the batch.

    Sums rather than means, so that shares over several DDP ranks combine exactly.
    """
    a = a.float()
    magnitude = a.abs()
    sums = torch.stack([magnitude.sum(), torch.tensor(float(a.numel()), device=a.device), magnitude.max(),
                        (magnitude < low).sum().float(), (magnitude > high).sum().float(), (a == 0).sum().float()])
    units = a.transpose(0, 1).reshape(a.shape[1], -1) if a.dim() > 1 else a.reshape(1, -1)
    alive = (units != 0).any(dim=1)
    return sums, alive


def combine(sums: torch.Tensor, alive: torch.Tensor) -> dict[str, float]:
    """Per-rank rows (ranks x 6) and unit masks (ranks x units) -> the statistics of the whole batch."""
    total, count, peak = sums[:, 0].sum(), sums[:, 1].sum(), sums[:, 2].max()
    low, high, zero = sums[:, 3].sum(), sums[:, 4].sum(), sums[:, 5].sum()
    dead = 1.0 - alive.any(dim=0).float().mean()
    values = torch.stack([total / count, peak, low / count, high / count, zero / count, dead]).cpu().tolist()
    return dict(zip(STATS, values))


class ActivationSaturationMonitor(Callback):
    """Per layer: mean |a|, max |a|, share of values with |a| < ``low`` and > ``high`` (the PlainNet
    paper's 0.05 and 50), share of exact zeros and share of dead units (zero on the whole batch).

    Sampled on the training batch every ``every_n_steps`` optimizer steps (step 0 included) and on
    a fixed probe batch at each validation end. Between samples no hook is attached.

    Layers: activation modules (ReLU, LeakyReLU, PReLU, ...) or, when a model has none, every
    Linear/Conv but the classifier; choose with ``layer_types`` and ``include``/``exclude`` globs
    on module names (e.g. ``include=["model.features.*"]``).

    TensorBoard: ``saturation/{train,probe}/<stat>/<layer>`` scalars at every sample; depth-profile
    figures and a histogram per layer at the first and then every ``figure_every_n_samples``-th
    training sample and probe (figures cost far more than the statistics). ``max_overhead`` (1% of
    training time by default) postpones samples, probes and figures while this callback has used
    more than that share of the time since training started; ``None`` samples exactly on cadence.
    """

    def __init__(self, every_n_steps: int | None = None, low: float = 0.05, high: float = 50.0, include=None,
                 exclude=None, layer_types=None, probe_size: int = 256, probe_batch=None, histograms: bool = True,
                 figure_every_n_samples: int = 10, use_log_every_n_steps: bool = False, warn: bool = True,
                 max_overhead: float | None = 0.01):
        self.schedule = SamplingSchedule(every_n_steps, default=200, use_log_every_n_steps=use_log_every_n_steps)
        self.budget = OverheadBudget(max_overhead)
        self.low, self.high = float(low), float(high)
        self.include, self.exclude, self.layer_types = include, exclude, layer_types
        self.probe = ProbeBatch(probe_size, probe_batch)
        self.histograms, self.figure_every = histograms, max(1, int(figure_every_n_samples))
        self.warn = warn
        self.samples_taken = 0
        self.probes_taken = 0
        self.last_stats: dict[str, dict[str, float]] = {}
        self._warned: set[str] = set()
        self._figures_due = {"train": True, "probe": True}
        self._capture = None
        self._layers = []

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage):
        if self.layer_types is not None:
            self._layers = select_modules(pl_module, tuple(self.layer_types), self.include, self.exclude)
        else:
            self._layers = hidden_layers(pl_module, self.include, self.exclude)
        if not self._layers:
            raise ValueError(f"ActivationSaturationMonitor found no layers to watch in {type(pl_module).__name__} "
                             f"(include={self.include}, exclude={self.exclude})")

    def on_fit_start(self, trainer, pl_module):
        register_layout(trainer, "saturation", {
            f"{stat} ({src})": f"saturation/{src}/{stat}/.*" for src in ("train", "probe") for stat in STATS})

    def on_train_start(self, trainer, pl_module):
        self.budget.start()

    def _wants_figures(self, trainer, source: str) -> bool:
        return self._figures_due[source] and trainer.global_rank == 0 and bool(tensorboard_writers(trainer))

    def _reduce(self, want_histogram: bool):
        def reduce(name, output):
            sums, alive = activation_stats(output, self.low, self.high)
            sample = None
            if want_histogram:
                flat = output.flatten()
                sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            return sums, alive, sample
        return reduce

    # -- training-batch samples --------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.probe.inputs is None:
            self.probe.ensure(trainer, batch)
        if self.schedule.due(trainer):
            self.schedule.mark(trainer)
            if not self.budget.agreed(trainer):  # postponed on every rank alike: the sample gathers
                return
            self._draw_now = self._wants_figures(trainer, "train")
            reduce = self.budget.timed(self._reduce(self.histograms and self._draw_now))
            self._capture = LayerCapture(self._layers, reduce).__enter__()
            self._capture_step = trainer.global_step  # the step is counted up before on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._capture is None:
            return
        capture, self._capture = self._capture, None
        capture.__exit__(None, None, None)
        with self.budget.charge():
            self._publish(trainer, capture.results, "train", self._capture_step, gather=True, draw=self._draw_now)

    # -- probe samples -----------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.global_rank != 0 or self.probe.ensure(trainer) is None:
            return
        if not self.budget.allows():
            return
        with self.budget.charge():
            draw = self._wants_figures(trainer, "probe")
            results = self.probe.run(trainer, pl_module, LayerCapture(self._layers, self._reduce(self.histograms and draw)))
            self._publish(trainer, results, "probe", trainer.global_step, gather=False, draw=draw)

    def _publish(self, trainer, results: dict, source: str, step: int, gather: bool, draw: bool):
        if not results:
            return
        names = list(results)
        sums = torch.stack([results[n][0] for n in names])                     # layers x 6
        alive = torch.cat([results[n][1] for n in names]).float()              # all units
        sizes = [results[n][1].numel() for n in names]
        if gather:
            sums, alive = gather_rows(trainer, sums), gather_rows(trainer, alive)
        else:
            sums, alive = sums.unsqueeze(0), alive.unsqueeze(0)
        if trainer.global_rank != 0:
            return
        alive_parts = torch.split(alive.bool(), sizes, dim=1)
        stats = {name: combine(sums[:, i], alive_parts[i]) for i, name in enumerate(names)}
        self.last_stats = stats
        log_scalars(trainer, {f"saturation/{source}/{stat}/{name}": value
                              for name, row in stats.items() for stat, value in row.items()}, step)
        counter = "samples_taken" if source == "train" else "probes_taken"
        setattr(self, counter, getattr(self, counter) + 1)
        if getattr(self, counter) % self.figure_every == 0:
            self._figures_due[source] = True  # drawn at the next sample the overhead budget allows
        if draw:
            self._figures_due[source] = False
            self._draw(trainer, stats, results, source, step)
        if self.warn:
            self._maybe_warn(stats)

    def _draw(self, trainer, stats, results, source, step):
        names = list(stats)
        fig = figures.depth_profile(
            {"mean |a|": [stats[n]["mean_abs"] for n in names], "max |a|": [stats[n]["max_abs"] for n in names]},
            f"activation magnitude by depth ({source}, step {step})", "|activation|", log_y=True,
            thresholds={f"low {self.low:g}": self.low, f"high {self.high:g}": self.high})
        add_figure(trainer, f"saturation/{source}/profile_magnitude", fig, step)
        fig = figures.depth_profile(
            {f"|a| < {self.low:g}": [stats[n]["frac_low"] for n in names],
             f"|a| > {self.high:g}": [stats[n]["frac_high"] for n in names],
             "dead units": [stats[n]["frac_dead"] for n in names]},
            f"saturated share by depth ({source}, step {step})", "share")
        add_figure(trainer, f"saturation/{source}/profile_shares", fig, step)
        for writer in tensorboard_writers(trainer):
            for name in names:
                sample = results[name][2]
                if sample is not None and sample.numel():
                    writer.add_histogram(f"saturation/{source}/hist/{name}", sample, global_step=step)

    def _maybe_warn(self, stats):
        vanished = [n for n, s in stats.items() if s["mean_abs"] < self.low]
        exploded = [n for n, s in stats.items() if s["max_abs"] > self.high]
        for kind, layers, rule in (("vanished", vanished, f"mean |a| < {self.low:g}"),
                                   ("exploded", exploded, f"max |a| > {self.high:g}")):
            if layers and kind not in self._warned:
                self._warned.add(kind)
                shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
                rank_zero_warn(f"ActivationSaturationMonitor: activations {kind} ({rule}) in {len(layers)} "
                               f"layer(s): {shown}")

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self):
        return {"probe": self.probe.state_dict(), "samples_taken": self.samples_taken,
                "probes_taken": self.probes_taken, "last_sampled_step": self.schedule.last_sampled_step}

    def load_state_dict(self, state_dict):
        self.probe.load_state_dict(state_dict.get("probe", {}))
        self.samples_taken = state_dict.get("samples_taken", 0)
        self.probes_taken = state_dict.get("probes_taken", 0)
        self.schedule.last_sampled_step = state_dict.get("last_sampled_step", -1)
