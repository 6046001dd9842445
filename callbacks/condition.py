"""ConditionNumberProbe: singular (collinear) hidden units and ill-conditioned weights, layer by layer."""
from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from . import costs, figures
from .arguments import check_int, check_number
from .costs import (
    FORWARD_BACKWARD,
    MIN_ALLOWANCE,
    MIN_PROBE,
    LayerShape,
    Plan,
    WeightShape,
    everything,
    plan_full_samples,
    probe_size_for,
)
from .linalg import (
    condition_number,
    infinity_norm_condition,
    representation_stats_many,
    weight_condition_stats,
    weight_conditions,
)
from .messages import warn
from .outputs import add_image
from .probe_batch import ProbeBatch, ProbeMode
from .probing import LayerCapture, batch_inputs, layer_weight, weight_layers
from .publish import DepthTimeSpec, Publisher
from .records import ILL_CONDITIONED, SINGULAR_LOG10_KAPPA, log10_kappa
from .sampling import MAX_OVERHEAD, NUM_SAMPLES, SamplingCallback, planned_steps
from .tags import OverviewScalar, overview_values

__all__ = ["ConditionNumberProbe", "condition_number", "infinity_norm_condition", "weight_conditions",
           "representation_matrix", "weight_matrix", "probe_size_for"]


def spread_order(count: int) -> list[int]:
    """0 .. count-1 in an order that spreads over the range from the start (van der Corput:
    0, 1/2, 1/4, 3/4, ... of it), so that the first few cover it evenly: 13 gives 0, 6, 3, 9, 1, 8, ..."""
    order: list[int] = []
    r = 0
    while len(order) < count:
        fraction, bit, n = 0.0, 0.5, r
        while n:
            fraction += bit * (n & 1)
            n, bit = n >> 1, bit / 2
        block = int(fraction * count)
        if block not in order:
            order.append(block)
        r += 1
    return order


def _merge(*tables: dict) -> dict:
    """layer -> statistics, the rows of several tables merged (a layer can have both kinds)."""
    out: dict = {}
    for table in tables:
        for name, row in table.items():
            out[name] = {**out.get(name, {}), **row}
    return out


def representation_matrix(output: torch.Tensor, max_rows: int = 4096) -> torch.Tensor:
    """A layer's output as samples x units (conv: every position of every sample is a row and the
    channels are the units; a sequence: every token is a row), with at most ``max_rows`` evenly spaced
    rows, in float32 on its device; always a copy, so a later in-place op on the output cannot change it."""
    x = output.detach().float()
    if x.dim() > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    elif x.dim() == 1:
        x = x.unsqueeze(1)
    if x.shape[0] > max_rows:
        return x[torch.linspace(0, x.shape[0] - 1, max_rows, device=x.device).long()]
    return x.clone() if x.untyped_storage().data_ptr() == output.untyped_storage().data_ptr() else x


def weight_matrix(module) -> torch.Tensor:
    """A layer's (effective) weight as units x inputs: a conv filter flattened to one row."""
    w = layer_weight(module).detach()
    return w.reshape(w.shape[0], -1)


def _norm_name(norm) -> str:
    """"inf" or "2", also from the numbers a YAML list gives (``[inf, 2]``)."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        return "inf" if math.isinf(norm) else (str(int(norm)) if float(norm).is_integer() else str(norm))
    return str(norm).lower()


def _heatmap_layer(item, names: list[str]) -> Optional[str]:
    """The layer a ``heatmap_layers`` item names: an index into ``names`` or a name among them; None if neither."""
    if isinstance(item, int) and not isinstance(item, bool):
        return names[item] if -len(names) <= item < len(names) else None
    return item if item in names else None


class ConditionNumberProbe(SamplingCallback):
    """Singularity diagnostics on a fixed probe batch (the PlainNet paper, Sec. II-B and Fig. 5-8).

    At each sample (see ``deepplain.callbacks.sampling`` for the cadence and time budget) the
    probe batch goes through the model in eval mode, before that step's update; one more sample
    is taken after the last update. Logged per hidden layer, on its representation ``H`` as a
    samples x units matrix (conv: positions x channels): the condition number
    ``kappa = sigma_max / sigma_min`` (``inf`` when numerically singular), the numerical rank, the
    share of singular values below ``near_zero_rtol * sigma_max`` and the mean |correlation|
    between units; per Linear/Conv layer, the infinity-norm condition number of its weight (Fig. 5)
    and, with ``weight_norms=("inf", "2")``, the 2-norm one too.

    ``probe_size=None`` takes ``max(256, 2 x units)`` samples (at most 4,096): with fewer samples
    than units the matrix cannot have full unit rank, and collinear units would be invisible. It is
    the run's shared probe batch (``deepplain.callbacks.probe_batch``: from
    ``datamodule.probe_batch(n)`` when the datamodule has one, else from as many training batches as
    that takes, without disturbing training's data order or random state). Spectra are float32
    where accurate (kappa < 5e5), float64 above.

    Layers: as ``ActivationSaturationMonitor`` watches them (``layer_types`` to choose; recurrent
    and attention outputs have one row per token). The probe goes through ``forward()`` or
    ``probe_fn(pl_module, inputs)``; a module without ``forward()`` and no ``probe_fn`` is
    sampled on its training batches instead, during the training step's own forward (train mode,
    before that step's update), logged as ``condition/train/<stat>/<layer>``.

    With ``background=True`` a sample is captured on the training thread (the probe forward and a
    copy of the weights) and its linear algebra runs on a worker thread while training goes on, in
    order; an error in the worker is raised on the training thread. It pays where training leaves
    capacity idle (a GPU run: the SVDs go to the GPU while the CPU feeds it). It is off by default
    because on a CPU-only machine the worker's LAPACK threads compete with training's: on 2 cores
    the 4-epoch USPS run of the 100-layer MLP was three times slower with it.

    **What the run can afford** (``deepplain.callbacks.costs``). Before its first sample the probe estimates
    the run's length and gives its first and last samples ``full_sample_share`` (5%) of it, at least half a
    second: layers are measured cheapest first, exactly while that fits, else with the Cholesky estimate of
    kappa (``linalg.estimate_gram_kappa``, within 1e-4 of the exact value; rank and near-zero share NaN),
    else not at all, and weights exactly or not at all; it says once what it measures and leaves out.
    ``max_overhead=None`` or ``every_n_steps`` measure every layer exactly. Intermediate samples come from
    the ``max_overhead`` budget alone (``min_samples`` 2: the first and the last).

    **Which layers a sample covers.** The first and the last samples measure every layer planned. With more
    than ``layers_per_sample`` (default 8) layers, an intermediate sample measures a rotating
    subset: a block of 8 consecutive layers, in the order the forward meets them, and the probe
    forward stops after the block's last layer (the blocks come spread over the depth: 0, 6, 3, 9,
    ... of 13) (on average half a forward, and 8 spectra:
    about 0.15 s against 1.2 s for all 100 layers of the 300-unit MLP on a 2-core CPU); a dozen of
    them cover the whole network. (Before a full sample has shown the order, or when a module is
    called twice in one forward, it takes every k-th layer and the whole forward.) Between its
    measurements a layer keeps its latest value: the overview counts, the findings and the depth x
    time images read "each layer's latest measurement" (the table holds only what was measured, at
    the step it was).
    ``layers_per_sample=None`` measures every layer every time.

    TensorBoard (see ``deepplain.callbacks.publish``): ``overview/layers_singular`` and
    ``overview/worst_log10_kappa``; condition numbers as log10 kappa, a singular layer (kappa = inf)
    as 17 (``records.SINGULAR_LOG10_KAPPA``, above any finite float64 one), so it is never missing
    from a chart; depth x time images ``condition/depth_time/{log10_kappa,collinearity,
    weight_log10_kappa_inf}``; depth quantiles ``condition/depth_{median,max}/<stat>``; per layer
    ``condition/{log10_kappa,rank,near_zero,collinearity,weight_log10_kappa_inf}/<layer>`` only with
    ``per_layer_scalars=True``. When training ends: ``condition/profile`` (kappa and weight kappa
    against layer index at the first, middle and last samples) and
    ``condition/heatmap/<layer>`` (units' responses, Fig. 6-8) for the last sample. The raw kappa
    (``inf`` when singular) of every sample is in ``diagnostics.csv``.

    Example::

        import lightning as L
        from deepplain.callbacks import ConditionNumberProbe
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                            callbacks=[ConditionNumberProbe(num_samples=10, weight_norms=["inf", "2"])])
    """

    prefix = "condition"
    overview_scalars = (OverviewScalar("layers_singular", "singular layers (count)"),
                        OverviewScalar("worst_log10_kappa", "worst layer's log10 kappa"))
    overview_images = {"probe": ("log10_kappa",), "train": ("log10_kappa",)}

    def __init__(self, every_n_steps: Optional[int] = None, num_samples: int = NUM_SAMPLES,
                 probe_size: Optional[int] = None,
                 probe_batch: Any = None, include: Optional[list[str]] = None, exclude: Optional[list[str]] = None,
                 max_rows: int = 4096, near_zero_rtol: float = 1e-3,
                 heatmap_layers: Optional[list[Union[int, str]]] = None, weights: bool = True,
                 weight_norms: Sequence[Union[str, int, float]] = ("inf",),
                 figure_every_n_samples: Optional[int] = None,
                 use_log_every_n_steps: bool = False, max_overhead: Optional[float] = MAX_OVERHEAD,
                 background: bool = False,
                 layer_types: Optional[Sequence[type]] = None, probe_fn: Optional[Callable[[Any, Any], Any]] = None,
                 per_layer_scalars: bool = False, layers_per_sample: Optional[int] = 8, min_samples: int = 2,
                 full_sample_share: Optional[float] = 0.05):
        check_int("probe_size", probe_size, low=2, allow_none=True, what="an integer >= 2 or None (automatic)")
        super().__init__(every_n_steps=every_n_steps, num_samples=num_samples,
                         use_log_every_n_steps=use_log_every_n_steps, max_overhead=max_overhead,
                         figure_every_n_samples=figure_every_n_samples, include=include, exclude=exclude,
                         probe_size=probe_size or MIN_PROBE, probe_batch=probe_batch, probe_fn=probe_fn,
                         wants_probe=True, layer_types=layer_types, per_layer_scalars=per_layer_scalars,
                         min_samples=min_samples)
        self.layers_per_sample = check_int("layers_per_sample", layers_per_sample, allow_none=True)
        self.full_sample_share = check_number("full_sample_share", full_sample_share, 0, 1, low_open=True,
                                              allow_none=True)
        check_int("max_rows", max_rows, low=2)
        check_number("near_zero_rtol", near_zero_rtol, 0, 1, low_open=True, high_open=True)
        if isinstance(weight_norms, (str, int, float)):  # one norm given alone: "inf", not ["i", "n", "f"]
            weight_norms = [weight_norms]
        weight_norms = [_norm_name(n) for n in weight_norms]
        unknown = sorted(set(weight_norms) - {"inf", "2"})
        if unknown or not weight_norms:
            raise ValueError(f"weight_norms must be a non-empty subset of ['inf', '2'], got {list(weight_norms)}")
        self.auto_probe_size = probe_size is None and probe_batch is None
        self.max_rows, self.near_zero_rtol = int(max_rows), float(near_zero_rtol)
        self._max_rows_given = self.max_rows  # an automatic probe grows max_rows for the fit
        self.heatmap_layers, self.weights = heatmap_layers, bool(weights)
        self.weight_norms = tuple(weight_norms)
        self.background = bool(background)
        self._layers, self._weights = [], []  # what the samples measure (the plan's share of the watched ones)
        self._watched, self._watched_weights = [], []
        self._executor: Optional[ThreadPoolExecutor] = None
        self.reset_for_fit()

    def __getstate__(self):  # a thread pool does not pickle (ddp_spawn pickles callbacks)
        state = self.__dict__.copy()
        state["_executor"], state["_futures"] = None, []
        return state

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._watched = self._layers = self.watched_layers(pl_module, "hidden layers")
        self._check_heatmap_layers()
        self._watched_weights = self._weights = weight_layers(pl_module, self.include, self.exclude) \
            if self.weights else []
        if self.plan is not None:  # restored from a checkpoint: the same layers as before the resume
            self._apply(self.plan)
        self.setup_probe(trainer, pl_module, self._rows_needed)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Sampled before the step, so global step 0 shows the network as initialised; the last
        # sample is the one after the final update (on_train_end).
        if trainer.global_rank != 0:
            return
        self._raise_worker_error()
        in_training = self.probe_mode is ProbeMode.TRAINING  # no forward(): measured on the training step
        if not in_training:
            drawn = self.probe is not None and self.probe.inputs is not None
            if self.ensure_probe(trainer, pl_module, batch) is not None and not drawn:
                self._check_probe_rows()
        if self.schedule.is_last(trainer.global_step) and self.samples_taken and not in_training:
            return
        if not (self._layers or self._weights):  # the plan measures nothing in this run (said at setup)
            return
        if in_training:
            if self._capture is None and self.decide(trainer):
                self._start_training_capture(trainer)
        elif self.probe is not None and self.probe.inputs is not None and self.decide(trainer):
            self.sample(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0 and self.probe_mode is not ProbeMode.TRAINING and self.probe is not None \
                and self.probe.inputs is not None and self.last_sampled_step != trainer.global_step \
                and (self._layers or self._weights):
            self.sample(trainer, pl_module, final=True)
        self.wait()
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop_worker()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.wait()
        self._stop_worker()
        super().teardown(trainer, pl_module, stage)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "max_rows": self.max_rows,
                "plan": self.plan.state_dict() if self.plan is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.max_rows = state_dict.get("max_rows", self.max_rows)
        if state_dict.get("plan") is not None:
            self.plan = Plan.from_state(state_dict["plan"])
            if self._watched:  # Lightning restores callbacks after setup: the resumed run measures what it did
                self._apply(self.plan)

    def reset_for_fit(self) -> None:
        super().reset_for_fit()
        if hasattr(self, "_max_rows_given"):  # (the base class's __init__ calls this before ours has run)
            self.max_rows = self._max_rows_given
        self.last_weight_stats: dict[str, dict[str, float]] = {}
        self.plan: Optional[Plan] = None  # what the full samples measure (see deepplain.callbacks.costs)
        self._estimated: set[str] = set()  # the layers whose kappa is estimated, not computed from the spectrum
        self._said: set[str] = set()  # the one-off warnings already given
        self._futures: list[Future] = []
        self._latest: dict[str, dict[str, float]] = {}  # each layer's latest measurement (rotating samples)
        self._latest_weights: dict[str, dict[str, float]] = {}
        self._rotation = 0
        self._partial_seconds: list[float] = []  # the durations of rotating-subset samples
        self._fire_order: Optional[list[str]] = None  # the hidden layers in the order a full probe met them

    def make_publisher(self) -> Publisher:
        # the images draw a singular layer black (inf), apart from the finite colour scale
        kappa = dict(vmin=0.0, vmax=16.0, cmap="YlOrRd", label="log10 kappa", inf_label="singular (kappa = inf)",
                     thresholds={"ill-cond.": math.log10(ILL_CONDITIONED)})
        specs = {"log10_kappa": DepthTimeSpec("log10 kappa (representation)", **kappa),
                 "collinearity": DepthTimeSpec("mean |corr| between units", vmin=0.0, vmax=1.0, cmap="magma",
                                               label="|corr|"),
                 "weight_log10_kappa_inf": DepthTimeSpec("log10 kappa_inf (weight)", **kappa)}
        summaries = {"log10_kappa": ("median", "max"), "collinearity": ("max",), "weight_log10_kappa_inf": ("max",)}
        publisher = Publisher(self.prefix, specs, summaries, main_source="probe",
                              per_layer_scalars=self.per_layer_scalars,
                              stems={"probe": f"{self.prefix}/", "train": f"{self.prefix}/train/"},
                              table_only=("kappa", "weight_kappa", "weight_kappa_inf"))
        publisher.marker_label["probe"] = "BN batch statistics"
        return publisher

    def find(self, stats: dict) -> dict[str, list[str]]:
        """Singular and ill-conditioned layers (the rules of ``records.finding_rules``)."""
        return {"singular": [n for n, s in stats.items() if math.isinf(s.get("kappa", math.nan))],
                "ill-conditioned": [n for n, s in stats.items()
                                    if math.isfinite(s.get("kappa", math.nan)) and s["kappa"] > ILL_CONDITIONED]}

    def is_full(self, step: int) -> bool:
        """The first and last samples, and the first after a resume (which starts with no latest values)."""
        return super().is_full(step) or not (self._latest or self._latest_weights)

    def finish_sample(self, trainer) -> None:
        self.wait()  # a background analysis of this step's probe sample
        if self._capture is None:
            return
        (capture, step, weights, mandatory, full), self._capture = self._capture, None
        capture.__exit__(None, None, None)
        self.record(step)
        self._analyse(trainer, step, capture.results, weights, mandatory, 0.0, source="train", full=full)

    def sample(self, trainer, pl_module, final: bool = False) -> None:
        """Take a sample now: capture the representations and weights, then analyse and log them
        (on the worker thread with ``background=True``; :meth:`wait` for the results)."""
        step = trainer.global_step
        mandatory = True if final else self._mandatory
        full = final or self.is_full(step)
        start = time.perf_counter()
        with self.budget.charge(optional=not mandatory), torch.no_grad():
            layers, stop_after = self._probe_subset(full)
            capture = LayerCapture(layers, lambda name, out: representation_matrix(out, self.max_rows), self.unit_dims,
                                   stop_after=stop_after)
            matrices = self.run_probe(trainer, pl_module, capture)
            # copies: the coming optimizer step changes the weights in place while the worker reads them
            weights = [(n, weight_matrix(m).clone()) for n, m in self._subset(self._weights, full)]
        if matrices is None:
            return  # the model cannot take the probe: training-batch samples from the next step on
        self._check_probe_reach(matrices, layers)
        captured = time.perf_counter() - start
        self.record(step)
        if self.background:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ConditionNumberProbe")
            self._futures.append(self._executor.submit(self._analyse, trainer, step, matrices, weights, mandatory,
                                                       captured, "probe", full))
        else:
            self._analyse(trainer, step, matrices, weights, mandatory, captured, "probe", full)

    def expected_seconds(self) -> float:
        """An intermediate sample covers a subset of the layers: its cost is that of the last such
        sample, or before there was one, the full sample's share for that many layers."""
        if self._partial_seconds:
            return self._partial_seconds[-1]
        full = self.sample_seconds[-1] if self.sample_seconds else 0.0
        layers = max(1, len(self._layers))
        return full * min(layers, self.layers_per_sample or layers) / layers

    def wait(self) -> None:
        """Wait for the samples being analysed; raises the worker's error, if any."""
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def draw(self, trainer, key: str, samples: list) -> None:
        layers = [n for n, _ in self._layers] + [n for n, _ in self._weights]

        def series(stat, rows_of):  # one value per layer, NaN (a gap) where a rotating sample did not measure
            out = {}
            for step, payload in samples:
                rows = rows_of(payload)
                names = [n for n in layers if n in rows_of(samples[-1][1]) and stat in rows_of(samples[-1][1])[n]]
                values = [rows[n][stat] if n in rows and stat in rows[n] else math.nan for n in names]
                if any(not math.isnan(v) for v in values):
                    out[f"step {step}" + ("" if len(rows) >= len(names) else " (measured layers)")] = values
            return out
        # collinearity has its depth x time image (each panel costs ~80 ms to draw)
        panels = [(series("kappa", lambda p: p[0]), "representation kappa", True, {"ill-conditioned": ILL_CONDITIONED})]
        for stat, label in (("weight_kappa_inf", "weight kappa (inf-norm)"), ("weight_kappa", "weight kappa (2-norm)")):
            weights = series(stat, lambda p: p[1])
            if weights:
                panels.append((weights, label, True, None))
        where = "" if key == "probe" else "train/"
        what = "probe" if key == "probe" else "training batch"
        last_step, (_, _, heatmaps) = samples[-1]
        fig = figures.depth_profiles(panels, f"conditioning by depth ({what}), first, middle and last samples")
        add_image(trainer, f"{self.prefix}/{where}profile", figures.to_image(fig), last_step)
        for name, matrix in heatmaps.items():
            image = figures.unit_heatmap(matrix.numpy(), f"units' responses at {name} (step {last_step})")
            add_image(trainer, f"{self.prefix}/{where}heatmap/{name}", image, last_step)

    def probe_rows(self) -> Optional[int]:
        return self.plan.probe_size if self.plan is not None else None

    def _probe_subset(self, full: bool) -> tuple[list, Optional[list[str]]]:
        """The hidden layers a probe sample captures, and the names after which its forward may stop.

        A rotating sample takes a block of ``layers_per_sample`` consecutive layers in the order the
        forward meets them and stops the probe forward after the block's last one (on average half the
        forward); the blocks come in :func:`spread_order`, so that a run too short for a whole sweep
        still sees every depth. Before the order is known, or when a layer is called twice in a
        forward, it takes every k-th layer and runs the whole forward."""
        layers = self._subset(self._layers, full)
        if layers is self._layers or self._fire_order is None:
            return layers, None
        k = math.ceil(len(self._fire_order) / self.layers_per_sample)
        block = spread_order(k)[self._rotation % k]
        names = self._fire_order[block * self.layers_per_sample:(block + 1) * self.layers_per_sample]
        by_name = dict(self._layers)
        return [(n, by_name[n]) for n in names], names

    def _subset(self, layers: list, full: bool) -> list:
        """Every layer for the first and last samples, else the rotating every-k-th subset."""
        if full or self.layers_per_sample is None or len(layers) <= self.layers_per_sample:
            return layers
        k = math.ceil(len(layers) / self.layers_per_sample)
        return [item for i, item in enumerate(layers) if i % k == self._rotation % k]

    def _rows_needed(self, trainer, pl_module, batch) -> int:
        """The probe size, asked when the shared probe is drawn: the layers' widths come from a 2-sample probe
        forward, and with a budget the full samples' plan decides which layers are measured at all
        (:mod:`deepplain.callbacks.costs`); said once."""
        fixed = None if self.auto_probe_size else self.probe_size
        if batch is None:
            return fixed or MIN_PROBE
        if fixed and not self._budgeted(trainer):  # every layer, on the probe the user sized: nothing to plan
            self.plan = everything([LayerShape(n, 0) for n, _ in self._watched],
                                   [WeightShape(n, 0, 0) for n, _ in self._watched_weights], fixed)
            return fixed
        inputs = batch_inputs(batch)
        shapes = ProbeBatch(2, inputs[:2]).run(trainer, pl_module, LayerCapture(
            self._watched, lambda name, out: (int(out.shape[1]) if out.dim() > 1 else 1, int(out[0, 0].numel())
                                              if out.dim() > 2 else 1), self.unit_dims), self.probe_fn)
        self._check_probe_reach(shapes, self._watched)
        layers = [LayerShape(name.split("#")[0], units, positions) for name, (units, positions) in shapes.items()
                  if "#" not in name]
        weights = [WeightShape(name, *weight_matrix(module).shape) for name, module in self._watched_weights]
        self.plan = self._plan(trainer, pl_module, inputs, layers, weights, fixed)
        self._apply(self.plan)
        self._say_plan(layers)
        return self.plan.probe_size

    def _budgeted(self, trainer) -> bool:
        """Whether the full samples are planned within ``full_sample_share`` of the run: not when the user asked
        for every layer (``max_overhead=None``, ``every_n_steps``) or the run's length is unknown."""
        return (self.full_sample_share is not None and self.budget.fraction is not None
                and self.schedule.every_n_steps is None and not self.schedule.use_log_every_n_steps
                and planned_steps(trainer) is not None)

    def _plan(self, trainer, pl_module, inputs, layers, weights, fixed) -> Plan:
        if not self._budgeted(trainer):
            return everything(layers, weights, fixed)
        timing = ProbeBatch(inputs.shape[0], inputs)
        start = time.perf_counter()
        timing.run(trainer, pl_module, LayerCapture([], lambda name, out: None), self.probe_fn)
        forward = (time.perf_counter() - start) / max(1, inputs.shape[0])
        run_seconds = planned_steps(trainer) * FORWARD_BACKWARD * forward * inputs.shape[0]
        allowance = max(self.full_sample_share * run_seconds, MIN_ALLOWANCE)
        device = next((t.device.type for t in pl_module.parameters()), "cpu")
        plan = plan_full_samples(layers, weights, forward, allowance, costs.measured_rates(device), self.max_rows,
                                 fixed_probe=fixed)
        plan.run_seconds = run_seconds
        return plan

    def _apply(self, plan: Plan) -> None:
        measured = plan.measured()
        self._layers = [(n, m) for n, m in self._watched if n in measured]
        self._weights = [(n, m) for n, m in self._watched_weights if n in set(plan.weights)]
        self._estimated = set(plan.estimated)
        if self.auto_probe_size:
            self.max_rows = max(self.max_rows, 2 * max((w for w in plan.widths.values()), default=0))

    def _say_plan(self, layers: list) -> None:
        """One line at setup: what the full samples measure, what they leave out and how to get it."""
        plan = self.plan
        if not (plan.estimated or plan.left_out or plan.left_out_weights):
            return
        units = {layer.name: layer.units for layer in layers}

        def named(names, what=""):
            shown = ", ".join(f"{n} ({units[n]:,} units)" if n in units else n for n in names[:6])
            return what + shown + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        measured = [f"{len(plan.exact)} of {len(layers)} layers exactly"]
        if plan.estimated:
            measured.append(f"{named(plan.estimated)} by the Cholesky estimate of kappa (within 1e-4 of the exact "
                            "value where measured; rank and near-zero share not measured)")
        left = [named(plan.left_out, "the representations of ")] if plan.left_out else []
        left += [named(plan.left_out_weights, "the weights of ")] if plan.left_out_weights else []
        rank_zero_info(f"ConditionNumberProbe: this run is about {plan.run_seconds:.0f} s (estimated); its first and "
                       f"last samples may take {100 * self.full_sample_share:g}% of it or {MIN_ALLOWANCE:g} s "
                       f"({plan.allowance:.2f} s): they measure {' and '.join(measured)}, and leave out "
                       f"{' and '.join(left) or 'nothing'}. To measure every layer: full_sample_share=0.2 or more, "
                       "max_overhead=None, or every_n_steps=N")

    def _start_training_capture(self, trainer) -> None:
        """Hooks for the training step's own forward (a module without forward()); weights copied now,
        before the update."""
        full = self.is_full(trainer.global_step)
        with self.budget.charge(optional=not self._mandatory), torch.no_grad():
            weights = [(n, weight_matrix(m).clone()) for n, m in self._subset(self._weights, full)]
        capture = LayerCapture(self._subset(self._layers, full), self.budget.timed(
            lambda name, out: representation_matrix(out, self.max_rows), optional=not self._mandatory),
            self.unit_dims)
        self._capture = (capture.__enter__(), trainer.global_step, weights, self._mandatory, full)

    def _check_probe_reach(self, matrices: dict, layers: list) -> None:
        """Said once each: a probe that reached none of the layers it should have (a ``probe_fn`` that does not
        call the model), and layers with fewer rows than units (singular by construction)."""
        if layers and not matrices and "reach" not in self._said:
            self._said.add("reach")
            warn(f"ConditionNumberProbe: the probe ran ({self.probe_mode}) but none of the "
                           f"{len(layers)} watched layers produced an output; only weights are measured. Check "
                           "that probe_fn(pl_module, inputs) calls the model")
        short = [f"{n} ({m.shape[0]} rows, {m.shape[1]} units)" for n, m in matrices.items()
                 if isinstance(m, torch.Tensor) and m.shape[0] < m.shape[1]]
        if short and "short" not in self._said:
            self._said.add("short")
            warn(f"ConditionNumberProbe: {len(short)} layer(s) have fewer probe rows than units, so their "
                           f"units cannot be independent and kappa is inf by construction: "
                           f"{', '.join(short[:4])}{' ...' if len(short) > 4 else ''}; give probe_size (or max_rows) "
                           "of at least the units, or leave probe_size=None to size it from the widest layer")

    def _check_probe_rows(self):
        if self.probe.inputs is not None and self.auto_probe_size and self.probe.inputs.shape[0] < self.probe.size:
            warn(f"ConditionNumberProbe: the probe batch has {self.probe.inputs.shape[0]} samples (all "
                           f"the training data gave), fewer than the {self.probe.size} the widest layer needs for "
                           "full unit rank; the condition numbers of wider layers are infinite by construction")

    def _analyse(self, trainer, step: int, matrices: dict, weights: list, mandatory: bool, captured: float,
                 source: str = "probe", full: bool = True) -> None:
        """Spectra and statistics of one sample (``weights``: ``[(name, matrix)]``), published as
        ``condition/...`` (the probe) or ``condition/train/...`` (training-batch statistics)."""
        start = time.perf_counter()
        with self.budget.charge(optional=not mandatory):
            names = list(matrices)
            stats, weight_stats = self._measure(matrices, names, weights)
            self._remember(stats, weight_stats, names, source, full)
            self._publish_sample(trainer, step, source, stats, weight_stats)
            self._keep_figures(trainer, step, source, matrices, names, stats, weight_stats, full)
        self.sample_seconds.append(captured + time.perf_counter() - start)
        self.maybe_refresh(trainer, step)
        if not full:
            self._partial_seconds.append(self.sample_seconds[-1])

    def _measure(self, matrices: dict, names: list, weights: list) -> tuple[dict, dict]:
        """Each representation's spectrum statistics and each weight's condition numbers, with their log10."""
        estimated = [n.split("#")[0] in self._estimated for n in names]
        stats = dict(zip(names, representation_stats_many([matrices[n] for n in names], self.near_zero_rtol,
                                                          estimated)))
        rows = weight_condition_stats([w for _, w in weights], self.weight_norms) if weights else []
        weight_stats = {name: row for (name, _), row in zip(weights, rows)}
        for row in stats.values():
            row["log10_kappa"] = log10_kappa(row["kappa"])
        for row in weight_stats.values():
            row.update({f"weight_log10_{k[len('weight_'):]}": log10_kappa(v) for k, v in list(row.items())})
        return stats, weight_stats

    def _remember(self, stats: dict, weight_stats: dict, names: list, source: str, full: bool) -> None:
        """Every layer's latest values (a rotating sample measures some layers), in the model's order."""
        self._rotation += 0 if full else 1
        if full and source == "probe":
            order = [n.split("#")[0] for n in names]  # names fire in forward order; "#2": a module called twice
            self._fire_order = order if len(set(order)) == len(order) == len(self._layers) else None
        self._latest.update(stats)
        self._latest_weights.update(weight_stats)
        self.last_stats = {n: self._latest[n] for n, _ in self._layers if n in self._latest}
        self.last_stats.update({n: row for n, row in self._latest.items() if n not in self.last_stats})  # n#2
        self.last_weight_stats = {n: self._latest_weights[n] for n, _ in self._weights if n in self._latest_weights}

    def _publish_sample(self, trainer, step: int, source: str, stats: dict, weight_stats: dict) -> None:
        """The table (what was measured), the images (every layer's latest), the overview scalars and the findings."""
        measured, latest = _merge(stats, weight_stats), _merge(self.last_stats, self.last_weight_stats)
        found = self.find(self.last_stats)
        worst = max((row["log10_kappa"] for row in self.last_stats.values()
                     if not math.isnan(row["log10_kappa"])), default=None)
        counts = {"layers_singular": len(found["singular"])}
        if worst is not None:
            counts["worst_log10_kappa"] = worst
        overview = overview_values(self.overview_scalars, counts)
        note = "bn_batch_statistics" if source == "probe" and self.probe is not None \
            and self.probe.used_batch_stats else ""
        # the images draw a singular layer as inf (black), not as the finite stand-in the scalars carry
        shown = {n: {k: (math.inf if k in ("log10_kappa", "weight_log10_kappa_inf") and v == SINGULAR_LOG10_KAPPA
                         else v) for k, v in row.items()} for n, row in latest.items()}
        self.publisher.publish(trainer, step, source, measured, note, self.overview_tags(overview), record=shown)
        self.findings.update(step, "probe" if source == "probe" else "training batch", found)

    def _keep_figures(self, trainer, step: int, source: str, matrices: dict, names: list, stats: dict,
                      weight_stats: dict, full: bool) -> None:
        """What the end-of-run figures need from this sample: the profiles' values and the units' heat maps."""
        heatmaps = {name: matrices[name].detach().cpu() for name in self._heatmap_names(names)} \
            if names and len(names) == len(self._layers) else {}
        # a rotating sample's profile shows the layers it measured, not values held from other steps
        kept = (self.last_stats, self.last_weight_stats) if full else (stats, weight_stats)
        self.keep_for_figures(trainer, source, step, (dict(kept[0]), dict(kept[1]), heatmaps))

    def _raise_worker_error(self) -> None:
        for future in self._futures:
            if future.done() and future.exception() is not None:
                self._futures.remove(future)
                raise future.exception()

    def _stop_worker(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _check_heatmap_layers(self) -> None:
        """``heatmap_layers`` must name watched layers (an index into them, or a name): said at setup."""
        names = [n for n, _ in self._watched]
        wrong = [item for item in self.heatmap_layers or [] if _heatmap_layer(item, names) is None]
        if wrong:
            shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
            raise ValueError(f"ConditionNumberProbe: heatmap_layers {wrong} name no watched layer; there are "
                             f"{len(names)} (indices -{len(names)} to {len(names) - 1}): {shown}")

    def _heatmap_names(self, names: list[str]) -> list[str]:
        if self.heatmap_layers is None:
            return sorted({names[len(names) // 2], names[-1]}, key=names.index)
        return [name for name in (_heatmap_layer(item, names) for item in self.heatmap_layers) if name is not None]
