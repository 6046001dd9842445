"""Checks of a run's configuration against the machine, before any data is read or folder written.

* :func:`check_trainer_flags`: ``--precision``, ``--accelerator``, ``--devices``, ``--strategy``
  and ``--num-nodes`` are handed to Lightning's own connector (a Trainer is built and dropped),
  so an invalid value is one line with Lightning's reason; the precision actually used is returned
  (16-mixed runs as bf16-mixed on a CPU).
* :func:`check_logdir`: the log folder can be created and written.
* :func:`check_model_memory`: the model is built on the meta device (no memory) to check depth,
  width and options, and its parameter and activation memory is compared with what the machine
  has, so that ``--depth 100000`` is refused with the numbers instead of being killed.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from .config import depth_rule, model_options
from .errors import ConfigError, one_line
from .registry import build_model
from .schema import DEFAULTS, RunConfig, flag

GIB = 2 ** 30
DIRECT_BUILD_DEPTH = 256  # deeper models are estimated from two shallow ones before being built
HARDWARE_FLAGS = ("accelerator", "devices", "strategy", "num_nodes", "precision")


@contextlib.contextmanager
def quiet():
    """Silence Lightning's informational output and warnings while probing."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric",
                                               "lightning.pytorch.utilities.rank_zero")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def multi_node_launcher() -> bool:
    """Whether this process was started by something that connects several nodes."""
    env = os.environ
    if int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) or 1) > 1:
        return True
    if "TORCHELASTIC_RUN_ID" in env or "LSB_JOBID" in env or "OMPI_COMM_WORLD_SIZE" in env:
        return True
    return "NODE_RANK" in env and "MASTER_ADDR" in env  # Lightning's manual multi-node setup


def check_trainer_flags(config: RunConfig) -> tuple[str, str, int]:
    """Validate the flags passed through to Lightning. Returns the precision that will be used, the
    strategy's class name and how many training processes this machine will hold."""
    if config.num_nodes > 1 and not multi_node_launcher():
        raise ConfigError(f"--num-nodes {config.num_nodes} needs a multi-node launcher (srun under SLURM, torchrun, "
                          "or NODE_RANK and MASTER_ADDR set on every node); started alone it would wait for the other "
                          "nodes forever")
    flags = {k: getattr(config, k) for k in HARDWARE_FLAGS}
    try:
        with quiet():
            trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, **flags)
    except Exception as exc:  # Lightning raises ValueError, TypeError, MisconfigurationException, RuntimeError
        shown = " ".join(f"{flag(k)} {v}" for k, v in flags.items() if v != DEFAULTS[k])
        reason = " ".join(str(exc).split())  # Lightning's message, on one line
        raise ConfigError(f"{shown or 'the hardware flags'}: {reason[:400]}") from None
    on_cpu = trainer.strategy.root_device.type == "cpu"
    return str(trainer.precision), type(trainer.strategy).__name__, trainer.num_devices if on_cpu else 1


def check_logdir(logdir: str, name: str | None) -> None:
    """The log folder and the run's name folder can be created and written."""
    base = Path(logdir).expanduser()
    for path in (base, base / (name or "")):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--logdir {path} is a file, not a folder")
    existing = base
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--logdir {base}: {existing} is a file, not a folder")
    try:  # the only reliable test (root, read-only mounts, sysfs): create a folder there and remove it
        os.rmdir(tempfile.mkdtemp(prefix=".deepplain-write-test-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"--logdir {base}: cannot create folders in {existing} ({exc.strerror})") from None


# -- memory ------------------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    parameters: int
    activations_per_sample: int

    def bytes_needed(self, batch_size: int, optimizer: str, momentum: float, data_bytes: int) -> int:
        slots = 2 if optimizer == "adam" else (1 if momentum > 0 else 0)
        weights = 4 * self.parameters * (2 + slots)                    # weights, gradients, optimizer state
        activations = 4 * 2 * self.activations_per_sample * batch_size  # outputs kept for backward, and their grads
        return weights + activations + data_bytes


def measure(config: RunConfig, depth: int, input_shape, num_classes: int, options: dict | None = None) \
        -> MemoryEstimate:
    """Parameters and activation elements per sample of the model at ``depth``, on the meta device."""
    with torch.device("meta"):
        model = build_model(config.model, depth, arch=config.arch, input_shape=tuple(input_shape),
                            num_classes=num_classes, **(model_options(config) if options is None else options))
    total = [0]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()
    handles = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(torch.empty((1, *input_shape), device="meta"))
    except (RuntimeError, ValueError) as exc:  # a layout whose pooling stages need larger inputs
        if isinstance(exc, ConfigError):
            raise
        shape = "x".join(map(str, input_shape))
        raise ConfigError(f"{config.model} {config.arch} depth {depth} cannot take {shape} inputs "
                          f"({one_line(exc, 160)}); use a larger --image-size") from None
    finally:
        for h in handles:
            h.remove()
    return MemoryEstimate(sum(p.numel() for p in model.parameters()), total[0])


def estimate(config: RunConfig, input_shape, num_classes: int) -> MemoryEstimate:
    """The model's size at ``config.depth``. Deeper than ``DIRECT_BUILD_DEPTH``, it is extrapolated
    from the first two depths of the family's depth rule that ``depth`` follows, exactly: every
    family's parameters and activations grow linearly with its number of blocks. The depth is
    checked against the rule first; those builds check the options."""
    depth = config.depth
    if depth <= DIRECT_BUILD_DEPTH:
        return measure(config, depth, input_shape, num_classes)
    rule, options = depth_rule(config)  # options with what the builder picks at this depth, fixed for all three
    (d1, e1), (d2, e2) = [(d, measure(config, d, input_shape, num_classes, options)) for d in rule.first_depths(2)]
    n = (depth - d1) / (d2 - d1)
    return MemoryEstimate(int(e1.parameters + n * (e2.parameters - e1.parameters)),
                          int(e1.activations_per_sample + n * (e2.activations_per_sample - e1.activations_per_sample)))


def check_batch_limits(config: RunConfig, info, eval_batch_size: int | None = None) -> None:
    """A fractional ``--limit-train-batches``/``--limit-val-batches`` that leaves no batch is refused here,
    not by Lightning after the run folder is written."""
    if info.train_size is None:
        return  # a folder dataset: its size is known only once listed
    held = int(round(info.train_size * config.val_split))
    splits = {"limit_train_batches": (info.train_size - held, config.batch_size),
              "limit_val_batches": (held if held else (info.test_size or 0), eval_batch_size or config.batch_size)}
    for key, (samples, size) in splits.items():
        value = getattr(config, key)
        if isinstance(value, float) and value < 1 and samples:
            batches = -(-samples // size)
            if int(value * batches) < 1:
                raise ConfigError(f"{flag(key)} {value:g} of {batches} batch(es) is less than one batch; give at least "
                                  f"{1 / batches:.3g} or a count")


def available_memory(accelerator: str) -> tuple[int, str]:
    """Bytes of memory the run can use and where: the smallest free GPU, or the machine's RAM."""
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return free, "the GPU"
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "this machine"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"), "this machine"


def check_model_memory(config: RunConfig, info, processes: int = 1) -> MemoryEstimate:
    """Refuse, with the numbers, a model (and dataset) that cannot fit; return the estimate."""
    est = estimate(config, info.input_shape, info.num_classes)
    need = _need(config, est, info, processes)
    available, where = available_memory(config.accelerator)
    if need > 0.9 * available:
        raise ConfigError(
            f"this run needs about {need / GIB:.1f} GiB ({est.parameters / 1e6:,.1f}M parameters, "
            f"{est.activations_per_sample * config.batch_size * 8 / GIB:.1f} GiB of activations at batch "
            f"{config.batch_size}{f', {processes} processes' if processes > 1 else ''}) but "
            f"{available / GIB:.1f} GiB is free on {where}; lower --depth, --width or --batch-size")
    return est


def _need(config, est: MemoryEstimate, info, processes: int) -> int:
    samples = (info.train_size or 0) + (info.test_size or 0)
    data = samples * math.prod(info.input_shape)  # decoded once to uint8
    per_process = est.bytes_needed(config.batch_size, config.optimizer, config.momentum, data)
    return per_process * max(1, processes)
