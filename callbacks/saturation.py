"""ActivationSaturationMonitor: vanishing, exploding and dead units, layer by layer."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from . import figures
from .probing import LayerCapture
from .sampling import SamplingCallback
from .tensorboard import add_histogram, add_image, log_scalars

STATS = ("mean_abs", "max_abs", "frac_low", "frac_high", "frac_zero", "frac_dead")


def activation_stats(a: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums for one layer's output: ``[sum |a|, count, max |a|, #|a|<low, #|a|>high, #a==0]`` and,
    per unit (feature, channel or token channel: dim 1, see ``layer_outputs``), whether it was
    non-zero anywhere in the batch.

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


def gather_rows(trainer, stats: torch.Tensor) -> torch.Tensor:
    """Stack ``stats`` from every DDP rank along a new first dimension (one rank: unsqueeze)."""
    if trainer.world_size <= 1:
        return stats.unsqueeze(0)
    return trainer.strategy.all_gather(stats)


class ActivationSaturationMonitor(SamplingCallback):
    """Per layer: mean |a|, max |a|, share of values with |a| < ``low`` and > ``high`` (the PlainNet
    paper's 0.05 and 50), share of exact zeros and share of dead units (zero on the whole batch).

    Sampled on the training batch (see ``deepplain.callbacks.sampling`` for the cadence and the
    time budget) and, in eval mode, on a fixed probe batch at validation ends: always at the first
    and at the one after the last training step, at the others as the budget allows. Between
    samples no hook is attached. Under DDP the training-batch statistics cover every rank's batch.

    Layers: activation modules (ReLU, LeakyReLU, PReLU, ...), recurrent layers (RNN, LSTM, GRU and
    their cells) and attention and transformer layers or, when a model has none, every Linear/Conv
    but the classifier; choose with ``layer_types`` (normalisation layers and embeddings are
    watchable too) and ``include``/``exclude`` globs on module names
    (``include=["model.features.*"]``). How each type's output is read (an LSTM's output
    sequence, one row per token) is the table in ``deepplain.callbacks.layer_outputs``.

    The probe batch is the run's shared one (``deepplain.callbacks.probe_batch``); it goes through
    ``forward()`` or ``probe_fn(pl_module, inputs)``. A module without ``forward()`` and no
    ``probe_fn`` is watched on its training batches only.

    TensorBoard: ``saturation/{train,probe}/<stat>/<layer>`` scalars; a ``saturation/<source>/profile``
    image (mean and max |a| with the 0.05 and 50 lines, and the saturated shares, against layer
    index: the paper's Fig. 2/4 and A1) and histograms of ``histogram_layers`` evenly spaced layers,
    for the last sample (``figure_every_n_samples`` for more), drawn when training ends.

    Example::

        import lightning as L
        from deepplain.callbacks import ActivationSaturationMonitor
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                            callbacks=[ActivationSaturationMonitor(num_samples=10, low=0.05, high=50)])
    """

    prefix = "saturation"

    def __init__(self, every_n_steps: Optional[int] = None, num_samples: int = 20, low: float = 0.05,
                 high: float = 50.0, include: Optional[list[str]] = None, exclude: Optional[list[str]] = None,
                 layer_types: Optional[Sequence[type]] = None, probe: bool = True, probe_size: int = 256,
                 probe_batch: Any = None, histogram_layers: int = 8, figure_every_n_samples: Optional[int] = None,
                 use_log_every_n_steps: bool = False, warn: bool = True, max_overhead: Optional[float] = 0.01,
                 probe_fn: Optional[Callable[[Any, Any], Any]] = None):
        super().__init__(every_n_steps=every_n_steps, num_samples=num_samples,
                         use_log_every_n_steps=use_log_every_n_steps, max_overhead=max_overhead,
                         figure_every_n_samples=figure_every_n_samples, include=include, exclude=exclude,
                         probe_size=probe_size, probe_batch=probe_batch if probe else None,
                         probe_fn=probe_fn, wants_probe=bool(probe), layer_types=layer_types)
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"probe_size must be a positive integer, got {probe_size!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)) \
                or not 0 <= float(low) < float(high) < float("inf"):
            raise ValueError(f"need 0 <= low < high, both finite numbers, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)
        if isinstance(histogram_layers, bool) or not isinstance(histogram_layers, int) or histogram_layers < 0:
            raise ValueError(f"histogram_layers must be an integer >= 0, got {histogram_layers!r}")
        self.histogram_layers, self.warn = histogram_layers, bool(warn)
        self._histogram_names: set[str] = set()
        self.probes_taken = 0
        self.probe_seconds: list[float] = []
        self.last_probe_step = -1
        self.last_probe_stats: dict[str, dict[str, float]] = {}
        self._warned: set[str] = set()
        self._capture = None
        self._layers = []

    def state_key_fields(self) -> dict:
        types = [t.__name__ for t in self.layer_types] if self.layer_types else None
        return {**super().state_key_fields(), "layer_types": types}

    def tensorboard_layout(self) -> dict:
        sources = ("train", "probe") if self.probe is not None else ("train",)  # no empty probe charts
        return {"saturation": {f"{stat} ({src})": f"saturation/{src}/{stat}/.*" for src in sources for stat in STATS}}

    def setup(self, trainer, pl_module, stage):
        self._layers = self.watched_layers(pl_module, "layers to watch")
        self.setup_probe(trainer, pl_module, self.probe_size)
        names = [n for n, _ in self._layers]
        count = min(self.histogram_layers, len(names))
        self._histogram_names = {names[round(i * (len(names) - 1) / max(1, count - 1))] for i in range(count)}

    def _reduce(self):
        def reduce(name, output):
            sums, alive = activation_stats(output, self.low, self.high)
            sample = None
            if name in self._histogram_names:
                flat = output.flatten()
                sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            return sums, alive, sample
        return reduce

    # -- training-batch samples ------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 0:
            self.ensure_probe(trainer, pl_module, batch)
        if self._capture is None and self.decide(trainer, collective=True):
            step = trainer.global_step
            reduce = self.budget.timed(self._reduce(), optional=not self._mandatory)
            self._capture = (LayerCapture(self._layers, reduce, self.unit_dims), step)
            self._capture[0].__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._capture is None:
            return
        (capture, step), self._capture = self._capture, None
        capture.__exit__(None, None, None)
        with self.timed_sample() as cost:
            stats = self._publish(trainer, capture.results, "train", step, gather=True)
            if stats is not None:
                self.last_stats = stats
        self.record(step, cost[0])

    def on_exception(self, trainer, pl_module, exception):
        if self._capture is not None:  # never leave hooks behind
            self._capture[0].__exit__(None, None, None)
            self._capture = None

    # -- probe samples ---------------------------------------------------------------------------------
    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.probe is None or trainer.global_rank != 0 or trainer.state.fn != "fit":
            return
        step = trainer.global_step
        if step == self.last_probe_step or self.ensure_probe(trainer, pl_module) is None:
            return
        final = self.schedule.total_steps is not None and step >= self.schedule.total_steps
        expected = self.probe_seconds[-1] if self.probe_seconds else 0.0
        if not (self.probes_taken == 0 or final or self.budget.allows(expected)):
            self.note_postponed(trainer, "the probe", step)
            return
        self._probe_now(trainer, pl_module, step, final)

    def on_train_end(self, trainer, pl_module):
        # The final state is always probed, also when no validation ran after the last step.
        if self.probe is not None and trainer.global_rank == 0 and self.last_probe_step != trainer.global_step \
                and self.ensure_probe(trainer, pl_module) is not None:
            self._probe_now(trainer, pl_module, trainer.global_step, final=True)
        super().on_train_end(trainer, pl_module)

    def _probe_now(self, trainer, pl_module, step: int, final: bool):
        with self.timed_sample(mandatory=final or self.probes_taken == 0) as cost:
            results = self.run_probe(trainer, pl_module, LayerCapture(self._layers, self._reduce(), self.unit_dims))
            if results is None:
                return
            self.last_probe_stats = self._publish(trainer, results, "probe", step, gather=False) or {}
        self.probe_seconds.append(cost[0])
        self.probes_taken += 1
        self.last_probe_step = step

    def _publish(self, trainer, results: dict, source: str, step: int, gather: bool):
        if not results:
            return None
        names = list(results)
        sums = torch.stack([results[n][0] for n in names])                     # layers x 6
        alive = torch.cat([results[n][1] for n in names]).float()              # all units
        sizes = [results[n][1].numel() for n in names]
        if gather:
            sums, alive = gather_rows(trainer, sums), gather_rows(trainer, alive)
        else:
            sums, alive = sums.unsqueeze(0), alive.unsqueeze(0)
        if trainer.global_rank != 0:
            return None
        alive_parts = torch.split(alive.bool(), sizes, dim=1)
        stats = {name: combine(sums[:, i], alive_parts[i]) for i, name in enumerate(names)}
        log_scalars(trainer, {f"saturation/{source}/{stat}/{name}": value
                              for name, row in stats.items() for stat, value in row.items()}, step)
        samples = {name: results[name][2] for name in names if results[name][2] is not None}
        self.keep_for_figures(trainer, source, step, (stats, samples))
        if self.warn:
            self._maybe_warn(stats)
        return stats

    def draw(self, trainer, source: str, step: int, payload) -> None:
        stats, samples = payload
        names = list(stats)
        magnitude = {"mean |a|": [stats[n]["mean_abs"] for n in names], "max |a|": [stats[n]["max_abs"] for n in names]}
        shares = {f"|a| < {self.low:g}": [stats[n]["frac_low"] for n in names],
                  f"|a| > {self.high:g}": [stats[n]["frac_high"] for n in names],
                  "dead units": [stats[n]["frac_dead"] for n in names]}
        fig = figures.depth_profiles(
            [(magnitude, "|activation|", True, {f"low {self.low:g}": self.low, f"high {self.high:g}": self.high}),
             (shares, "share", False, None)], f"activations by depth ({source}, step {step})")
        add_image(trainer, f"saturation/{source}/profile", figures.to_image(fig), step)
        for name, sample in samples.items():
            if sample.numel():
                add_histogram(trainer, f"saturation/{source}/hist/{name}", sample, step)

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

    # -- checkpointing ---------------------------------------------------------------------------------
    def state_dict(self):
        return {**super().state_dict(), "probes_taken": self.probes_taken, "last_probe_step": self.last_probe_step}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.probes_taken = state_dict.get("probes_taken", 0)
        self.last_probe_step = state_dict.get("last_probe_step", -1)

