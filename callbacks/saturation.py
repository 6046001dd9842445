"""ActivationSaturationMonitor: vanishing, exploding and dead units, layer by layer."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from typing_extensions import override

from . import figures
from .arguments import check_int
from .messages import warn
from .outputs import add_image
from .probing import LayerCapture
from .publish import DepthTimeSpec, Publisher
from .records import DEAD_SHARE, EXPLODED_ABOVE, VANISHED_BELOW, finding_rules
from .sampling import MAX_OVERHEAD, MIN_SAMPLES, NUM_SAMPLES, SamplingCallback
from .tags import OverviewScalar, overview_values
from .tensorboard import add_histogram

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

    TensorBoard (see ``deepplain.callbacks.publish``): ``overview/layers_{vanished,exploded,dead}``
    (training batches); depth x time images ``saturation/depth_time/<stat>`` (training batches) and
    ``saturation/probe/depth_time/<stat>`` for mean and max |a| (log colour scale, 0.05 and 50
    marked), the shares below 0.05 and above 50 and dead units; depth quantiles
    ``saturation/[probe/]depth_{min,median,max}/<stat>``; per layer
    ``saturation/{train,probe}/<stat>/<layer>`` only with ``per_layer_scalars=True``. When training
    ends: ``saturation/<source>/profile`` (mean and max |a| and the saturated shares against layer
    index at the first, middle and last samples: the paper's Fig. 2/4 and A1) and histograms of
    ``histogram_layers`` evenly spaced layers. Every value of every sample is in ``diagnostics.csv``.
    Until batch norm has seen data the probe uses the probe batch's own statistics (marked in the
    images; see ``probe_batch``).

    Example::

        import lightning as L
        from deepplain.callbacks import ActivationSaturationMonitor
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                            callbacks=[ActivationSaturationMonitor(num_samples=10, low=0.05, high=50)])
    """

    prefix = "saturation"
    overview_scalars = tuple(OverviewScalar(f"layers_{kind}", "layers vanished / exploded / dead (training batch)")
                             for kind in ("vanished", "exploded", "dead"))
    overview_images = {"train": ("mean_abs", "max_abs", "frac_dead")}

    def __init__(self, every_n_steps: Optional[int] = None, num_samples: int = NUM_SAMPLES, low: float = VANISHED_BELOW,
                 high: float = EXPLODED_ABOVE, include: Optional[list[str]] = None, exclude: Optional[list[str]] = None,
                 layer_types: Optional[Sequence[type]] = None, probe: bool = True, probe_size: int = 256,
                 probe_batch: Any = None, histogram_layers: int = 8, figure_every_n_samples: Optional[int] = None,
                 use_log_every_n_steps: bool = False, warn: bool = True, max_overhead: Optional[float] = MAX_OVERHEAD,
                 probe_fn: Optional[Callable[[Any, Any], Any]] = None, per_layer_scalars: bool = False,
                 min_samples: int = MIN_SAMPLES):
        super().__init__(every_n_steps=every_n_steps, num_samples=num_samples,
                         use_log_every_n_steps=use_log_every_n_steps, max_overhead=max_overhead,
                         figure_every_n_samples=figure_every_n_samples, include=include, exclude=exclude,
                         probe_size=probe_size, probe_batch=probe_batch if probe else None,
                         probe_fn=probe_fn, wants_probe=bool(probe), layer_types=layer_types,
                         per_layer_scalars=per_layer_scalars, min_samples=min_samples)
        check_int("probe_size", probe_size)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)) \
                or not 0 <= float(low) < float(high) < float("inf"):
            raise ValueError(f"need 0 <= low < high, both finite numbers, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)
        check_int("histogram_layers", histogram_layers, low=0)
        self.histogram_layers, self.warn = histogram_layers, bool(warn)
        self._histogram_names: set[str] = set()
        self._layers = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._layers = self.watched_layers(pl_module, "layers to watch")
        self.setup_probe(trainer, pl_module, self.probe_size)
        names = [n for n, _ in self._layers]
        count = min(self.histogram_layers, len(names))
        self._histogram_names = {names[round(i * (len(names) - 1) / max(1, count - 1))] for i in range(count)}

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_rank == 0:
            self.ensure_probe(trainer, pl_module, batch)
        if self._capture is None and self.decide(trainer, collective=True):
            step = trainer.global_step
            reduce = self.budget.timed(self._reduce(), optional=not self._mandatory)
            self._capture = (LayerCapture(self._layers, reduce, self.unit_dims), step)
            self._capture[0].__enter__()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The final state is always probed, also when no validation ran after the last step.
        if self.probe is not None and trainer.global_rank == 0 and self.last_probe_step != trainer.global_step \
                and self.ensure_probe(trainer, pl_module) is not None:
            self._probe_now(trainer, pl_module, trainer.global_step, final=True)
        super().on_train_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "probes_taken": self.probes_taken, "last_probe_step": self.last_probe_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.probes_taken = state_dict.get("probes_taken", 0)
        self.last_probe_step = state_dict.get("last_probe_step", -1)

    def reset_for_fit(self) -> None:
        super().reset_for_fit()
        self.probes_taken = 0
        self.probe_seconds: list[float] = []
        self.last_probe_step = -1
        self.last_probe_stats: dict[str, dict[str, float]] = {}
        self._warned: set[str] = set()

    def state_key_fields(self) -> dict:
        types = [t.__name__ for t in self.layer_types] if self.layer_types else None
        return {**super().state_key_fields(), "layer_types": types}

    def make_publisher(self) -> Publisher:
        magnitude = dict(scale="log", vmin=self.low / 100, vmax=self.high * 100, cmap="RdBu_r",
                         thresholds={"low": self.low, "high": self.high})
        share = dict(vmin=0.0, vmax=1.0, cmap="magma", sources=("train",))  # the probe: magnitudes only
        specs = {"mean_abs": DepthTimeSpec("mean |a| per layer", label="mean |a|", **magnitude),
                 "max_abs": DepthTimeSpec("max |a| per layer", label="max |a|", **magnitude),
                 "frac_low": DepthTimeSpec(f"share of |a| < {self.low:g}", label="share", **share),
                 "frac_high": DepthTimeSpec(f"share of |a| > {self.high:g}", label="share", **share),
                 "frac_dead": DepthTimeSpec("share of dead units", label="share",
                                            thresholds={"dead": DEAD_SHARE}, **share)}
        summaries = {"mean_abs": ("min", "median"), "max_abs": ("median", "max"), "frac_dead": ("max",)}
        publisher = Publisher(self.prefix, specs, summaries, main_source="train",
                              per_layer_scalars=self.per_layer_scalars,
                              stems={source: f"{self.prefix}/{source}/" for source in ("train", "probe")})
        publisher.marker_label["probe"] = "BN batch statistics"
        return publisher

    def find(self, stats: dict) -> dict[str, list[str]]:
        """The layers of each finding in one sample (the rules of ``records.finding_rules``)."""
        return {"vanished": [n for n, s in stats.items() if s["mean_abs"] < self.low],
                "exploded": [n for n, s in stats.items() if s["max_abs"] > self.high],
                "dead": [n for n, s in stats.items() if s["frac_dead"] > DEAD_SHARE]}

    def finish_sample(self, trainer) -> None:
        if self._capture is None:
            return
        (capture, step), self._capture = self._capture, None
        capture.__exit__(None, None, None)
        with self.timed_sample() as cost:
            stats = self._publish(trainer, capture.results, "train", step, gather=True)
            if stats is not None:
                self.last_stats = stats
        self.record(step, cost[0])
        self.maybe_refresh(trainer, step)

    def draw(self, trainer, source: str, samples: list) -> None:
        if source == "train" and self.probes_taken:
            return  # the probe's profile is the paper's figure; the training batches are in the depth x time images
        def series(stat):
            return {f"step {step}": [stats[n][stat] for n in stats] for step, (stats, _) in samples}
        thresholds = {f"low {self.low:g}": self.low, f"high {self.high:g}": self.high}
        # two panels: the shares have their depth x time images (each panel costs ~80 ms to draw)
        fig = figures.depth_profiles([(series("mean_abs"), "mean |a|", True, thresholds),
                                      (series("max_abs"), "max |a|", True, thresholds)],
                                     f"activations by depth ({source}), first, middle and last samples")
        add_image(trainer, f"{self.prefix}/{source}/profile", figures.to_image(fig), samples[-1][0])
        for step, (_, histograms) in samples:  # first, middle, last: TensorBoard's Distributions has a time axis
            for name, sample in histograms.items():
                if sample.numel():
                    add_histogram(trainer, f"{self.prefix}/{source}/hist/{name}", sample, step)

    def _reduce(self):
        def reduce(name, output):
            sums, alive = activation_stats(output, self.low, self.high)
            sample = None
            if name in self._histogram_names:
                flat = output.flatten()
                sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            return sums, alive, sample
        return reduce

    def _probe_now(self, trainer, pl_module, step: int, final: bool):
        with self.timed_sample(mandatory=final or self.probes_taken == 0) as cost:
            results = self.run_probe(trainer, pl_module, LayerCapture(self._layers, self._reduce(), self.unit_dims))
            if results is None:
                return
            self.last_probe_stats = self._publish(trainer, results, "probe", step, gather=False) or {}
        self.probe_seconds.append(cost[0])
        self.probes_taken += 1
        self.last_probe_step = step
        self.maybe_refresh(trainer, step)

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
        found = self.find(stats)
        if source == "probe":
            found = self._check_against_training(trainer, step, found)
        overview = overview_values(self.overview_scalars, {f"layers_{kind}": len(layers) for kind, layers in
                                                             found.items()}) if source == "train" else None
        note = "bn_batch_statistics" if source == "probe" and self.probe is not None and self.probe.used_batch_stats \
            else ""
        self.publish(trainer, step, source, stats, found, overview, note)
        samples = {name: results[name][2] for name in names if results[name][2] is not None}
        self.keep_for_figures(trainer, source, step, (stats, samples))
        if self.warn:
            self._maybe_warn(trainer, step, found)
        return stats

    def _check_against_training(self, trainer, step: int, found: dict) -> dict:
        """The probe's findings (eval mode) less what the latest training batch contradicts. In the first epoch
        that is batch norm's running statistics still settling: said once, for what it is, and neither a finding
        nor a warning. Past it, a disagreement that persists is itself a finding (``eval-only``) and a warning:
        the model learns in training mode and loses it in eval mode (BN + max-norm fails so: RESULTS 8.1)."""
        if not self.last_stats:
            return found
        training = self.find(self.last_stats)
        contradicted = {kind: [n for n in layers if n not in training.get(kind, ())]
                        for kind, layers in found.items() if kind in ("vanished", "exploded")}
        contradicted = {kind: layers for kind, layers in contradicted.items() if layers}
        if not contradicted:
            return found
        kept = {kind: [n for n in layers if n not in contradicted.get(kind, ())] for kind, layers in found.items()}
        rules = finding_rules(self.low, self.high)
        what = " and ".join(f"{len(layers)} layer(s) {kind} ({rules[kind]})" for kind, layers in contradicted.items())
        settling = trainer.current_epoch < 1
        if settling and "settling" not in self._warned:
            self._warned.add("settling")
            self.findings.say(step, f"ActivationSaturationMonitor: in eval mode at step {step}, {what} that the "
                                    "training batches do not show: batch norm's running statistics are still settling "
                                    "in the first epoch (not a failure)")
        elif not settling:
            self.findings.update(step, "probe", {"eval-only": sorted({n for v in contradicted.values() for n in v})})
            if "eval-only" not in self._warned:
                self._warned.add("eval-only")
                message = (f"in eval mode at step {step} (past the first epoch), {what} that the training batches do "
                           "not show: the model may learn in training mode and lose it in eval mode (batch norm's "
                           "running statistics do not describe its training batches)")
                self.findings.say(step, f"ActivationSaturationMonitor: {message}")
                if self.warn:
                    warn(f"ActivationSaturationMonitor: {message}")
        return kept

    def _maybe_warn(self, trainer, step: int, found: dict) -> None:
        rules = finding_rules(self.low, self.high)
        for kind in ("vanished", "exploded"):
            layers, rule = found[kind], rules[kind]
            if layers and kind not in self._warned:
                self._warned.add(kind)
                shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
                message = f"activations {kind} ({rule}) in {len(layers)} layer(s) at step {step}: {shown}"
                self.findings.say(step, f"ActivationSaturationMonitor: {message}")
                warn(f"ActivationSaturationMonitor: {message}")

