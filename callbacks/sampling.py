"""The shared core of the sampling diagnostics: when to sample, how much time they may take, the
probe batch, figures and the state kept in checkpoints.

:class:`SamplingCallback` is the base of ``ActivationSaturationMonitor``,
``ConditionNumberProbe`` and ``GradientFlowMonitor``. A subclass says *where* it samples (a
Lightning hook) and *what* it computes; the base decides *whether* to sample at that step:

* **Cadence.** Global step 0 and the last optimizer step of the run are always sampled, and with a
  ``TrainabilityVerdict`` in the trainer so are the early steps it reads (v/4, v/2 and v, the verdict
  step v of ``deepplain.callbacks.verdict_step``: four samples by then, whatever the budget). In between, ``every_n_steps`` if given, else ``num_samples`` samples spread evenly over
  ``trainer.estimated_stepping_batches`` (so a 200-step run and a 200,000-step run both show
  their evolution), else ``trainer.log_every_n_steps`` with ``use_log_every_n_steps=True``.
* **Time budget.** ``max_overhead`` (default 1%) postpones an intermediate sample unless the time
  the callback spent on intermediate samples, plus what the last sample took, stays within that
  share of the wall time since training started; the first and last samples are never postponed
  and do not count against it, nor do the samples that keep ``min_samples`` (default 10; the
  condition probe's spectra, whose cost it plans itself, 2) spread over a run of known length:
  whatever the budget, a run has at least that many points in time (one due by the end of every
  tenth of the run), so that its evolution and the ``overview/`` charts show. A
  postponed sample is taken at the first later step the budget allows (due points that pass
  meanwhile merge into it) and every postponement is logged on the ``deepplain.callbacks`` logger,
  with a summary line at the end of training.
* **What a sample writes** (``deepplain.callbacks.publish``): its per-layer values go to the run's
  ``diagnostics.csv`` and to the depth x time images ``<prefix>/depth_time/<stat>``; its scalars are
  a few depth quantiles, the ``overview/`` counts, and one scalar per layer only with
  ``per_layer_scalars=True``. The findings (vanished, exploded, ... layers) are kept with the
  worst state each reached (:class:`~deepplain.callbacks.records.FindingsLog`).
* **Figures** cost far more than the statistics (40-120 ms each on a CPU, against a few ms). The
  depth x time images are redrawn during the run when the time budget allows (someone watching a
  long run sees them grow) and always when training ends. Depth profiles are drawn when training
  ends, off the training path, for the first, middle and last samples in one image (with
  ``figure_every_n_samples=k`` also every k-th sample's own image).
* **The probe.** Callbacks that probe share one probe batch per run
  (``deepplain.callbacks.probe_batch``). How it goes through the model is said once, at setup:
  ``forward()``, the user's ``probe_fn(pl_module, inputs)``, or, for a module without
  ``forward()``, no probe at all: the layers' outputs are captured during the training step's own
  forward at sampled steps (training-batch statistics). A probe that fails (a ``forward`` that
  wants other arguments, a batch without an input tensor) falls back to the same, with one warning:
  a diagnostic never stops the fit it watches.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from . import outputs
from .arguments import check_int, check_number
from .layer_outputs import unit_dims
from .messages import warn
from .probe_batch import ProbeBatch, ProbeMode
from .probing import check_selection, glob_list, has_forward, hidden_layers, select_modules
from .publish import Publisher, finish_run_files
from .records import DiagnosticsTable, FindingsLog
from .tensorboard import write_layout
from .verdict_step import early_steps, verdict_step

# The sampling diagnostics' defaults, shared by all of them (and train.py's --diag-every help)
NUM_SAMPLES = 20       # samples spread over the run
MIN_SAMPLES = 10       # taken whatever the time budget
MAX_OVERHEAD = 0.01    # share of the training time the optional samples may cost

log = logging.getLogger("deepplain.callbacks")


def planned_steps(trainer) -> Optional[int]:
    """The optimizer steps the trainer plans for this fit, or None when no length is known."""
    try:
        total = float(trainer.estimated_stepping_batches)
    except Exception:  # no length known; Lightning raises for some iterable loaders
        return None
    return int(total) if math.isfinite(total) and total > 0 else None


def every_percent(trainer, fallback: int) -> int:
    """An interval of 1% of the planned run (at least 1 step); ``fallback`` when its length is unknown."""
    total = planned_steps(trainer)
    return max(1, total // 100) if total else max(1, fallback)


class SamplingSchedule:
    """Which optimizer steps are due for a sample (see the module docstring)."""

    FALLBACK_EVERY = 200  # when the run's length is unknown (an iterable without len, max_epochs=-1)

    def __init__(self, every_n_steps: Optional[int] = None, num_samples: int = NUM_SAMPLES,
                 use_log_every_n_steps: bool = False, min_samples: int = MIN_SAMPLES):
        self.every_n_steps = check_int("every_n_steps", every_n_steps, allow_none=True)
        self.num_samples = check_int("num_samples", num_samples)
        check_int("min_samples", min_samples, low=0)
        self.min_samples = min(min_samples, self.num_samples)
        self.use_log_every_n_steps = bool(use_log_every_n_steps)
        self.total_steps: Optional[int] = None
        self.every = self.every_n_steps or self.FALLBACK_EVERY
        self.serves_verdict = False  # set by TrainabilityVerdict: then the early samples below are due
        self.verdict_at: Optional[int] = None  # the verdict's own step, if it was given one (else the rule)
        self.early: frozenset = frozenset()

    def start(self, trainer) -> None:
        """Fix the cadence for this fit from the trainer's planned number of optimizer steps."""
        self.total_steps = planned_steps(trainer)
        if self.use_log_every_n_steps:
            self.every = max(1, int(trainer.log_every_n_steps))
        elif self.every_n_steps:
            self.every = self.every_n_steps
        elif self.total_steps:
            self.every = max(1, math.ceil((self.total_steps - 1) / max(1, self.num_samples - 1)))
        else:
            self.every = self.FALLBACK_EVERY
        self.early = frozenset(early_steps(verdict_step(self.total_steps, self.verdict_at))) \
            if self.serves_verdict else frozenset()

    def behind(self, step: int, taken: int) -> bool:
        """Whether ``taken`` samples by ``step`` fall short of ``min_samples`` spread evenly over the run
        (one due by the end of every ``total / min_samples`` steps, the last by the last step, so that a run
        of at least ``min_samples`` steps has them all): such a sample is taken whatever the budget."""
        if not self.min_samples or not self.total_steps:
            return False
        return taken < min(self.min_samples, math.floor(self.min_samples * (step + 1) / self.total_steps))

    def is_last(self, step: int) -> bool:
        return self.total_steps is not None and step == self.total_steps - 1

    def due(self, step: int) -> bool:
        return step % self.every == 0 or self.is_last(step) or step in self.early

    def planned_steps(self) -> list[int]:
        """The due steps of a run of known length (for reports and tests)."""
        if self.total_steps is None:
            return []
        return sorted({s for s in range(0, self.total_steps, self.every)} | {self.total_steps - 1} | set(self.early))


class OverheadBudget:
    """Keeps a callback's optional work under ``fraction`` of the wall time since training started.

    ``allows()`` is False while the optional work done so far exceeds that share; ``fraction=None``
    disables the budget. Work is charged with ``with budget.charge(): ...``; work that is never
    postponed (the first and last samples, the figures) is charged with ``optional=False``: it is
    counted in ``spent`` but does not use up the share.
    """

    def __init__(self, fraction: Optional[float], clock: Callable[[], float] = time.perf_counter):
        self.fraction = check_number("max_overhead", fraction, 0, 1, low_open=True, high_open=True, allow_none=True,
                                     what="in (0, 1) or None")
        self.clock = clock  # seconds; a test passes its own
        self.spent, self.spent_optional, self.started = 0.0, 0.0, None

    def start(self) -> None:
        if self.started is None:
            self.started = self.clock()

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started is None else self.clock() - self.started

    def allows(self, expected: float = 0.0) -> bool:
        """Whether optional work expected to take ``expected`` seconds still fits in the share."""
        if self.fraction is None or self.started is None:
            return True
        return self.spent_optional + expected <= self.fraction * self.elapsed

    @contextlib.contextmanager
    def charge(self, optional: bool = True):
        start = self.clock()
        try:
            yield
        finally:
            seconds = self.clock() - start
            self.spent += seconds
            if optional:
                self.spent_optional += seconds

    def timed(self, fn, optional: bool = True):
        """``fn`` with its running time charged to this budget (for work done inside hooks)."""
        def wrapper(*args, **kwargs):
            with self.charge(optional):
                return fn(*args, **kwargs)
        return wrapper


class SamplingCallback(Callback):
    """Base class of the sampling diagnostics (cadence, time budget, probe batch, layout, state).

    Subclasses set ``prefix`` (their TensorBoard section), implement ``tensorboard_layout()`` and
    call :meth:`decide` at the hook where they can sample, then :meth:`record` once a sample is
    taken. ``probe_size`` > 0 gives them a :class:`~deepplain.callbacks.probing.ProbeBatch`.
    """

    prefix = "diagnostics"
    overview_scalars: tuple = ()  # tags.OverviewScalar s this callback logs
    overview_images: dict = {}    # source -> statistics whose depth x time images go into overview.png

    def __init__(self, *, every_n_steps: Optional[int] = None, num_samples: int = NUM_SAMPLES,
                 use_log_every_n_steps: bool = False, max_overhead: Optional[float] = MAX_OVERHEAD,
                 figure_every_n_samples: Optional[int] = None, include: Optional[list[str]] = None,
                 exclude: Optional[list[str]] = None, probe_size: Optional[int] = None, probe_batch=None,
                 probe_fn: Optional[Callable[[Any, Any], Any]] = None, wants_probe: bool = False,
                 layer_types: Optional[Sequence[type]] = None, per_layer_scalars: bool = False,
                 min_samples: int = MIN_SAMPLES):
        if probe_fn is not None and not callable(probe_fn):
            raise TypeError(f"probe_fn must be callable as probe_fn(pl_module, inputs), got {probe_fn!r}")
        self.schedule = SamplingSchedule(every_n_steps, num_samples, use_log_every_n_steps, min_samples)
        OverheadBudget(max_overhead)  # checked now; each fit gets its own (reset_for_fit)
        self.max_overhead = max_overhead
        self.figure_every = check_int("figure_every_n_samples", figure_every_n_samples, allow_none=True)
        self.include, self.exclude = glob_list("include", include), glob_list("exclude", exclude)
        self.layer_types = tuple(layer_types) if layer_types else None
        self.wants_probe = bool(wants_probe or probe_batch is not None)
        self.probe_fn = probe_fn
        self.probe_size = probe_size
        self._own_probe = ProbeBatch(probe_size or 256, probe_batch) if probe_batch is not None else None
        self.per_layer_scalars = bool(per_layer_scalars)
        self.unit_dims: dict = {}
        self.reset_for_fit()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_fields())

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:  # built on first use: a subclass's settings (thresholds) exist by then
            self._publisher = self.make_publisher()
        return self._publisher

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.reset_for_fit()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule.start(trainer)
        self.budget.start()
        twins = [cb for cb in trainer.callbacks if type(cb) is type(self)]
        if len(twins) > 1 and twins.index(self) > 0:  # a second monitor on other layers: its own tags
            self.publisher.prefix = f"{self.prefix}#{twins.index(self) + 1}"
            self.publisher.stems = {k: v.replace(self.prefix, self.publisher.prefix, 1)
                                    for k, v in self.publisher.stems.items()}
        write_layout(trainer, self)
        outputs.announce(trainer)  # where the run's files go, said once

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: STEP_OUTPUT, batch: Any,
                           batch_idx: int) -> None:
        self.finish_sample(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw_at_end(trainer)
        if trainer.global_rank == 0 and self.samples_taken:
            shown = self.sampled_steps if len(self.sampled_steps) <= 12 else (
                self.sampled_steps[:6] + ["..."] + self.sampled_steps[-5:])
            log.info("%s: %d samples at steps %s; %d due points postponed by the time budget; %.2f s spent (%.2f%% of "
                     "training; %.2f s on optional samples)", type(self).__name__, self.samples_taken,
                     ", ".join(map(str, shown)), self.postponed, self.budget.spent,
                     100 * self.budget.spent / max(self.budget.elapsed, 1e-9), self.budget.spent_optional)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._capture is not None:  # never leave hooks behind
            self._capture[0].__exit__(None, None, None)
            self._capture = None
        # a run that diverged or was stopped is the one most in need of its pictures
        self.draw_at_end(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.draw_figures(trainer)  # a run that stopped early still gets the figures it kept
        DiagnosticsTable.close_for(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"samples_taken": self.samples_taken, "last_sampled_step": self.last_sampled_step,
                 "postponed": self.postponed, "pending": self._pending, "findings": self.findings.state_dict()}
        if self.probe is not None:
            state["probe"] = self.probe.state_dict(self)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples_taken = state_dict.get("samples_taken", 0)
        self.last_sampled_step = state_dict.get("last_sampled_step", -1)
        self.postponed = state_dict.get("postponed", 0)
        self._pending = state_dict.get("pending")
        self.findings.load_state_dict(state_dict.get("findings"))
        probe_state = state_dict.get("probe") or {}
        if self.probe is None and self.wants_probe and probe_state.get("inputs") is not None:
            self.probe = ProbeBatch(0)  # loaded before setup, which hands the inputs to the run's shared probe
        if self.probe is not None:
            self.probe.load_state_dict(probe_state)

    def reset_for_fit(self) -> None:
        """Everything one fit measures, fresh: a second ``fit`` with the same callback objects samples and logs
        as the first did (a resume then restores what it continues from; subclasses add their own)."""
        self.budget = OverheadBudget(self.max_overhead)
        self.probe: Optional[ProbeBatch] = self._own_probe  # the run's shared probe once set up
        self.probe_mode: Optional[ProbeMode] = None  # see setup_probe
        self.samples_taken = 0
        self.last_sampled_step = -1
        self.postponed = 0
        self.sampled_steps: list[int] = []
        self.sample_seconds: list[float] = []  # the duration of each sample (statistics and logging)
        self.figure_seconds = 0.0              # drawing the kept figures when training ended
        self.last_stats: dict[str, dict[str, float]] = {}
        self._figure_data: dict[str, dict] = {}  # key -> {"first", "middle", "latest": (step, payload), "extra", "n"}
        self._publisher: Optional[Publisher] = None
        self.findings = FindingsLog()
        self._refreshed_at = 0                 # samples taken when the depth x time images were last drawn
        self._refreshed_middle = False
        self._pending: Optional[int] = None   # the due step of a postponed sample
        self._mandatory = True                # whether the sample being taken may not be postponed
        self._refused: Optional[int] = None   # the due step whose postponement was counted
        self._capture: Optional[tuple] = None  # (LayerCapture, step, ...) of a training-batch sample in progress

    def state_key_fields(self) -> dict:
        """What tells two instances of this callback apart (their state is stored under it)."""
        return {"include": self.include, "exclude": self.exclude}

    def tensorboard_layout(self) -> dict:
        return {self.prefix: self.publisher.layout()}

    def make_publisher(self) -> Publisher:
        """Where this callback's per-layer statistics go (subclasses say what they draw and summarise)."""
        return Publisher(self.prefix, {}, {}, per_layer_scalars=self.per_layer_scalars)

    def publish(self, trainer, step: int, source: str, stats: dict, found: Optional[dict] = None,
                overview: Optional[dict] = None, note: str = "") -> None:
        """One sample out (rank zero): table, depth x time record, scalars, findings. Callers then call
        :meth:`maybe_refresh` outside the sample's own time charge."""
        if trainer.global_rank != 0:
            return
        self.publisher.publish(trainer, step, source, stats, note, self.overview_tags(overview))
        if found is not None:
            self.findings.update(step, "probe" if source == "probe" else "training batch", found)

    def overview_tags(self, overview: Optional[dict]) -> dict:
        """``overview/...`` scalars, suffixed ``#2``, ``#3``, ... for a second, third instance of a class."""
        suffix = self.publisher.prefix[len(self.prefix):]
        return {f"{k}{suffix}": v for k, v in (overview or {}).items()}

    def maybe_refresh(self, trainer, step: int) -> None:
        """Redraw the depth x time images during the run: once at the first sample past the middle of
        the run (always), and every quarter of the planned samples when the time budget allows what
        the last drawing took."""
        if trainer.global_rank != 0 or self.publisher.columns() < 2:
            return
        total = self.schedule.total_steps
        if total and not self._refreshed_middle and step >= total // 2 and not self.schedule.is_last(step):
            self._refreshed_middle, self._refreshed_at = True, self.samples_taken
            with self.budget.charge(optional=False):
                self.publisher.draw(trainer, step)
            return
        every = max(2, self.schedule.num_samples // 4)
        expected = self.publisher.draw_seconds[-1] if self.publisher.draw_seconds else 0.2
        if self.samples_taken - self._refreshed_at >= every and self.budget.allows(expected):
            self._refreshed_at = self.samples_taken
            with self.budget.charge():
                self.publisher.draw(trainer, step)

    def is_full(self, step: int) -> bool:
        """The first and the last samples of a run: never postponed, never partial."""
        return self.samples_taken == 0 or self.schedule.is_last(step)

    def is_mandatory(self, step: int) -> bool:
        """Not postponed by the budget: the first and last samples, and any sample needed to keep
        ``min_samples`` spread over a run of known length (``SamplingSchedule.behind``), and the early samples
        the verdict reads (``SamplingSchedule.early``)."""
        return self.is_full(step) or step in self.schedule.early or self.schedule.behind(step, self.samples_taken)

    def decide(self, trainer, collective: bool = False) -> bool:
        """Whether to take a sample at this step. ``collective=True`` when the sample enters a
        collective (an all-gather): rank zero's decision is then broadcast to every rank."""
        step = trainer.global_step
        if step == self.last_sampled_step:
            return False  # once per optimizer step, also under gradient accumulation
        # the first sample is due at once also when it could not be taken at step 0 (lazy layers)
        due = (self.schedule.due(step) or self.samples_taken == 0) and step != self._refused
        if due and self._pending is None:
            self._pending = step
        if self._pending is None:
            return False
        allowed = self.is_mandatory(step) or self.budget.allows(self.expected_seconds())
        if collective and trainer.world_size > 1:
            allowed = bool(trainer.strategy.broadcast(allowed, src=0))
        if allowed:
            self._pending = None
            self._mandatory = self.is_mandatory(step)
            return True
        if due:  # this due point passes without a sample; a later step takes one in its place
            self._refused = step
            self.note_postponed(trainer, "the sample", step, announce=self._pending == step)
        return False

    def expected_seconds(self) -> float:
        """What the next intermediate sample is expected to cost: the last one's duration."""
        return self.sample_seconds[-1] if self.sample_seconds else 0.0

    def note_postponed(self, trainer, what: str, step: int, announce: bool = True) -> None:
        """Count one postponed due point and log it (the first of a streak): nothing is dropped silently."""
        self.postponed += 1
        if announce and trainer.global_rank == 0:
            log.debug("%s: %s due at step %d is postponed: %.2f s of optional samples is over %.3g%% of the %.1f s "
                      "since training started; it is taken at the first step the budget allows", type(self).__name__,
                      what, step, self.budget.spent_optional, 100 * self.budget.fraction, self.budget.elapsed)

    def keep_for_figures(self, trainer, key: str, step: int, payload) -> None:
        """Keep what the figures of this sample need (rank zero only): the first sample, the one nearest
        the middle of the run, the latest, and with ``figure_every_n_samples`` every k-th."""
        if trainer.global_rank != 0:
            return
        slot = self._figure_data.setdefault(key, {"first": None, "middle": None, "latest": None, "extra": [],
                                                  "n": 0})
        if self.figure_every and slot["n"] % self.figure_every == 0 and slot["n"]:
            slot["extra"].append((step, payload))
        if slot["first"] is None:
            slot["first"] = (step, payload)
        else:
            half = (self.schedule.total_steps or step) / 2
            outgoing = slot["latest"]
            if outgoing is not None and (slot["middle"] is None
                                         or abs(outgoing[0] - half) < abs(slot["middle"][0] - half)):
                slot["middle"] = outgoing
            slot["latest"] = (step, payload)
        slot["n"] += 1

    def draw_figures(self, trainer) -> None:
        """Draw the kept figures (the first, middle and last samples' profiles in one image; every
        figure_every-th sample's alone) and the depth x time images as they stand."""
        data, self._figure_data = self._figure_data, {}
        if trainer.global_rank != 0:
            return
        start = time.perf_counter()
        with self.budget.charge(optional=False):
            self.publisher.draw(trainer, trainer.global_step)
            for key, slot in data.items():
                kept = sorted({item[0]: item for item in (slot["first"], slot["middle"], slot["latest"])
                               if item is not None}.values(), key=lambda item: item[0])
                if kept:
                    self.draw(trainer, key, kept)
                for item in slot["extra"]:
                    self.draw(trainer, key, [item])
        self.figure_seconds += time.perf_counter() - start

    def finish_sample(self, trainer) -> None:
        """Publish the sample of this step still in progress, if any (a training-batch capture is published at the
        batch's end; the early verdict reads it first, whatever the order of the callbacks)."""

    def draw(self, trainer, key: str, samples: list) -> None:
        """Draw the depth profiles of the kept samples, ``[(step, payload)]`` in step order, as one
        image at the last one's step (subclasses)."""

    def draw_at_end(self, trainer) -> None:
        """The figures this callback kept, and overview.png and the uploads (the last callback with a publisher
        does them), however the run ended."""
        self.draw_figures(trainer)
        finish_run_files(trainer, self)

    def record(self, step: int, seconds: float | None = None) -> None:
        self.samples_taken += 1
        self.last_sampled_step = step
        self.sampled_steps.append(step)
        if seconds is not None:
            self.sample_seconds.append(seconds)

    @contextlib.contextmanager
    def timed_sample(self, mandatory: Optional[bool] = None):
        """Charge the enclosed sample to the budget (as optional unless it is the first or last);
        yields a list that receives its duration."""
        mandatory = self._mandatory if mandatory is None else mandatory
        start = time.perf_counter()
        cost: list[float] = []
        with self.budget.charge(optional=not mandatory):
            yield cost
        cost.append(time.perf_counter() - start)

    def watched_layers(self, pl_module, what: str) -> list:
        """The layers whose outputs this callback watches: of ``layer_types`` if given, else
        ``probing.hidden_layers``; checked once (see :meth:`select_layers`)."""
        if self.layer_types is not None:
            layers = select_modules(pl_module, self.layer_types, self.include, self.exclude)
        else:
            layers = hidden_layers(pl_module, self.include, self.exclude)
        return self.select_layers(pl_module, layers, what)

    def select_layers(self, pl_module, layers: list, what: str) -> list:
        """``layers`` after the one setup check (see ``probing.check_selection``); notes the units' layout."""
        check_selection(type(self).__name__, pl_module, layers, self.include, self.exclude, what)
        self.unit_dims = unit_dims(pl_module)
        return layers

    def setup_probe(self, trainer, pl_module, size) -> None:
        """How this callback probes in this fit, said once; ``size``: the samples it needs, or a
        function ``(trainer, pl_module, batch) -> int`` asked when the shared probe is drawn."""
        if not self.wants_probe:
            return
        name, model = type(self).__name__, type(pl_module).__name__
        if self.probe_fn is not None:
            self.probe_mode = ProbeMode.PROBE_FN
        elif has_forward(pl_module):
            self.probe_mode = ProbeMode.FORWARD
        else:
            self.probe_mode = ProbeMode.TRAINING
            self.probe = None
            rank_zero_info(f"{name}: {model} has no forward(), so layer outputs are captured during the training "
                           "step's own forward at sampled steps (training-batch statistics); pass "
                           "probe_fn=lambda module, x: ... to probe a fixed batch in eval mode")
            return
        if self._own_probe is None and trainer is not None:
            restored, self.probe = self.probe, ProbeBatch.shared(trainer)
            self.probe.join(trainer, self, size)
            if restored is not None and restored.inputs is not None and self.probe.inputs is None:
                self.probe.load_state_dict(restored.state_dict())  # state loaded before setup
        elif self._own_probe is None:
            self.probe = ProbeBatch(size if isinstance(size, int) else 256)

    def ensure_probe(self, trainer, pl_module, batch=None):
        """The probe inputs (drawn on first use; None while there are none)."""
        if self.probe is None:
            return None
        try:
            return self.probe.ensure(trainer, pl_module, batch)
        except Exception as exc:  # a batch without an input tensor: observe the training batches instead
            self.probe_failed(exc)
            return None

    def probe_rows(self) -> Optional[int]:
        """How many of the shared probe's samples this callback's probe forward takes (the shared batch is as
        large as its most demanding member needs); None: all."""
        return self.probe_size

    def run_probe(self, trainer, pl_module, capture) -> Optional[dict]:
        """The probe's results under ``capture``, or None (and training-batch statistics from now on)
        when the model cannot take the probe batch."""
        try:
            return self.probe.run(trainer, pl_module, capture, self.probe_fn, rows=self.probe_rows())
        except Exception as exc:
            self.probe_failed(exc)
            return None

    def probe_failed(self, exc: Exception) -> None:
        message = " ".join(str(exc).split())[:300]
        warn(f"{type(self).__name__}: the probe batch could not go through the model ({type(exc).__name__}: "
                       f"{message}); from now on layer outputs are captured during the training step's own forward "
                       "(training-batch statistics). Pass probe_fn=lambda module, x: ... to say how to run the probe")
        if self.probe is not None:
            self.probe.leave(self)
        self.probe, self.probe_mode = None, ProbeMode.TRAINING
