"""The one description of a run: every option's type, default, valid values, help text, where its
value goes and whether ``--resume`` may change it (which families take it is theirs to say:
``registry.families_taking``).

``RunConfig`` is that description as a frozen dataclass; everything else is derived from it:
the command line (``cli.build_parser``), config files and ``--print-config``, the value checks
(``config.check``), the resume rules and the keyword arguments of the model, the LightningModule
and the datamodule (``options_for``). Adding an option is one field here and the code that uses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from .callbacks import DIAGNOSTICS
from .callbacks.alpha import DEFAULT_MODE as DEFAULT_ALPHA_MODE
from .callbacks.alpha import MODES as SCHEDULER_MODES
from .callbacks.alpha import PAPER_LAMBDA_LR_RATIO, PAPER_PHASE_OUT
from .callbacks.sampling import NUM_SAMPLES
from .callbacks.verdict_step import VERDICT_MAX_STEP, VERDICT_MIN_STEP, VERDICT_SHARE
from .datamodules import DATASETS
from .datamodules.splits import MAX_VAL_SPLIT
from .layers import ACTIVATIONS, INITS, NEGATIVE_SLOPE, NORMS
from .loggers import LOGGERS
from .models.dirac import DIRAC_LAYOUTS
from .models.plain import CONV_LAYOUTS
from .models.resnet import LAYOUTS as RESNET_LAYOUTS
from .models.resnet import BLOCKS
from .optim import OPTIMIZERS, SCHEDULES
from .presets import PRESETS, RECIPES
from .registry import describe_depth_rules, families_taking, get_family, model_names
from .rundir import LAST_IN_RUN

FORMS = tuple(sorted({arch for name in model_names() for arch in get_family(name).forms}, reverse=True))  # mlp, conv
ALPHA_MODES = SCHEDULER_MODES + ("off",)  # "off": a VAN without a scheduler (alpha stays a free parameter)
MAX_SEED = 2 ** 32 - 1
MAX_IMAGE_SIZE = 1024
RUN_NAME = "{model}-{arch}-{depth}-{dataset}"  # a run's folder name when --name is not given
RESIZABLE = {name: d.image_size for name, d in DATASETS.items() if d.image_size is not None}  # dataset -> default side


def builder_default(family: str, arch: str, option: str):
    """A model option's default: the builder's own (``Form.defaults``), never restated."""
    return get_family(family).form(arch).defaults()[option]


# Where an option's value goes (``options_for``).
MODEL, MODULE, DATAMODULE, TRAINER, RUN = "model", "module", "datamodule", "trainer", "run"
GROUPS = {"configuration": "configuration", "model": "model", "van": "VAN", "data": "data",
          "optimisation": "optimisation", "hardware": "hardware (passed to Lightning, checked before anything runs)",
          "run": "run"}


# -- what a valid value is ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A number in [low, high] (ends open or closed), optionally an integer; ``what`` is the error's wording."""
    what: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def error(self, flag: str, value) -> Optional[str]:
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            ok = False
        else:
            ok = math.isfinite(value)
            if ok and self.low is not None:
                ok = value > self.low if self.low_open else value >= self.low
            if ok and self.high is not None:
                ok = value < self.high if self.high_open else value <= self.high
        return None if ok else f"{flag} must be {self.what}, got {value!r}"


@dataclass(frozen=True)
class CountOrFraction:
    """A batch count >= 1 or a share of the batches in (0, 1] (Lightning's ``limit_*_batches``)."""

    def error(self, flag: str, value) -> Optional[str]:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
                or (isinstance(value, float) and value > 1)):
            return f"{flag} must be a count >= 1 or a fraction in (0, 1], got {value}"
        return None


@dataclass(frozen=True)
class Milestones:
    """Shares of the run in (0, 1) or whole epochs >= 1."""

    def error(self, flag: str, value) -> Optional[str]:
        for m in value or []:
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0 or (
                    m >= 1 and float(m) != int(m)):
                return f"{flag} must be shares of --epochs in (0, 1) or whole epochs >= 1, got {m!r}"
        return None


POSITIVE_INT = Range("a positive integer", low=1, integer=True)


# -- command-line parsers -------------------------------------------------------------------------------
def parse_devices(value: str):
    if value == "auto" or "," in value:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a count or a comma list of device indices, got {value!r}") \
            from None


def parse_count_or_fraction(value: str):
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def parse_numbers(value: str):
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


# -- the option record ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """What the code knows of one option, besides its name, type and default (the dataclass field's)."""
    help: str = ""
    group: str = "run"
    goes_to: str = RUN
    parse: Optional[Callable] = None        # argparse ``type``
    choices: Optional[Sequence] = None
    valid: Any = None                       # an object with ``error(flag, value) -> message or None``
    resumable: bool = False                 # ``--resume`` may change it
    switch: Optional[str] = None            # "on": --flag sets True; "off": --flag sets False
    flags: tuple = ()                       # command-line spellings (default ``--name-with-dashes``)
    metavar: Optional[str] = None
    on_command_line: bool = True            # False: set by the run itself (run_dir, data_root)


def option(default=None, help: str = "", **info) -> Any:
    return field(default=default, metadata={"option": Option(help=help, **info)})


@dataclass(frozen=True)
class RunConfig:
    """A checked run configuration. ``None`` means "the family's, dataset's or recipe's default"
    until ``config.merge`` resolves it (depth, arch and the recipe's values are always resolved)."""

    # configuration
    preset: Optional[str] = option(None, "load a named recipe (listed below)", group="configuration",
                                   choices=tuple(PRESETS), metavar="NAME")
    # model
    model: str = option("plain", "model family", group="model", goes_to=MODULE,
                        choices=tuple(model_names()))
    depth: Optional[int] = option(None, "default: the family's; any depth for MLPs, else "
                                  + describe_depth_rules(),
                                  group="model", goes_to=MODULE, parse=int, valid=POSITIVE_INT)
    width: Optional[int] = option(None, "MLP: units per layer; conv: widening factor k", group="model",
                                  goes_to=MODEL, parse=int, valid=POSITIVE_INT)
    arch: Optional[str] = option(None, "default: the dataset's (conv for "
                                 + ", ".join(n for n, d in DATASETS.items() if d.arch == "conv") + ", mlp otherwise)",
                                 group="model",
                                 goes_to=MODULE, choices=FORMS)
    activation: Optional[str] = option(None, "plain family; resnet conv layout coursework", group="model",
                                       goes_to=MODEL, choices=ACTIVATIONS)
    negative_slope: Optional[float] = option(None, "LeakyReLU slope / PReLU initial slope (default "
                                             f"{NEGATIVE_SLOPE:g})",
                                             group="model", goes_to=MODEL, parse=float,
                                             valid=Range("in [0, 1)", 0, 1, high_open=True))
    norm: Optional[str] = option(None, group="model", goes_to=MODEL, choices=NORMS)
    init: Optional[str] = option(None, group="model", goes_to=MODEL, choices=INITS)
    layout: Optional[str] = option(None, f"plain conv: {' | '.join(CONV_LAYOUTS)}; resnet conv: "
                                         f"{' | '.join(RESNET_LAYOUTS)}; dirac conv: {' | '.join(DIRAC_LAYOUTS)}",
                                   group="model", goes_to=MODEL,
                                   choices=tuple(sorted(set(CONV_LAYOUTS) | set(RESNET_LAYOUTS) | set(DIRAC_LAYOUTS))))
    block: Optional[str] = option(None, "resnet conv block (default: by depth, see README)", group="model",
                                  goes_to=MODEL, choices=BLOCKS)
    cardinality: Optional[int] = option(None, "resnext: groups of each 3x3 conv (default "
                                        f"{builder_default('resnext', 'conv', 'cardinality')})", group="model",
                                        goes_to=MODEL, parse=int, valid=POSITIVE_INT)
    bottleneck_width: Optional[int] = option(None, "resnext: channels per group at the first stage (default "
                                             f"{builder_default('resnext', 'conv', 'bottleneck_width')})",
                                             group="model", goes_to=MODEL, parse=int, valid=POSITIVE_INT)
    gate_bias: Optional[float] = option(None, "highway transform-gate bias init (default "
                                        f"{builder_default('highway', 'mlp', 'gate_bias'):g})", group="model",
                                        goes_to=MODEL, parse=float, valid=Range("a finite number"))
    max_norm: Optional[float] = option(None, "add MaxNormConstraint with this bound (PlainNet: 3)", group="model",
                                       goes_to=MODULE, parse=float,
                                       valid=Range("a positive finite number", 0, low_open=True))
    max_norm_classifier: bool = option(False, "constrain the classifier too", group="model",
                                       goes_to=MODULE, switch="on")
    # VAN
    alpha_mode: str = option(DEFAULT_ALPHA_MODE, "how alpha is driven to 1 (lagrangian: the paper's eq. 7-8, "
                                                 "calibrated)", group="van", goes_to=MODULE, choices=ALPHA_MODES)
    lambda_lr_ratio: Optional[float] = option(None, f"eta'/eta (default {PAPER_LAMBDA_LR_RATIO['mlp']:g} for MLPs, "
                                                    f"{PAPER_LAMBDA_LR_RATIO['conv']:g} for conv)", group="van",
                                              goes_to=MODULE, parse=float,
                                              valid=Range("a finite number >= 0", 0))
    phase_out: Optional[float] = option(None, "when the skips must be gone: a share of training (< 1) or an epoch "
                                              f"(default {PAPER_PHASE_OUT[0]}/{PAPER_PHASE_OUT[1]})", group="van",
                                        goes_to=MODULE, parse=float,
                                        flags=("--phase-out", "--phase-out-epochs"),
                                        valid=Range("a share of training in (0, 1) or an epoch >= 1", 0,
                                                    low_open=True))
    # data
    dataset: str = option("cifar10", "the dataset", group="data", choices=tuple(DATASETS))
    data_dir: Optional[str] = option(None, "data root, searched alone (default: $DEEPPLAIN_DATA, then ./data)",
                                     group="data", goes_to=DATAMODULE, resumable=True)
    download: bool = option(False, "download the dataset with torchvision if missing", group="data",
                            goes_to=DATAMODULE, switch="on", resumable=True)
    val_split: float = option(0.1, "share of the training split held out (0 = validate on test)", group="data",
                              goes_to=DATAMODULE, parse=float,
                              valid=Range(f"in [0, {MAX_VAL_SPLIT:g}] (0 validates on the test set)", 0,
                                          MAX_VAL_SPLIT))
    verify_checksums: bool = option(True, "do not check files against published checksums and split sizes "
                                          "(re-packed or custom files)", group="data", goes_to=DATAMODULE,
                                    switch="off", flags=("--skip-checksums",), resumable=True)
    image_size: Optional[int] = option(None, "image side of " + " / ".join(RESIZABLE) + " (default "
                                       + " / ".join(map(str, RESIZABLE.values())) + ")", group="data",
                                       goes_to=DATAMODULE, parse=int,
                                       valid=Range(f"an integer in [4, {MAX_IMAGE_SIZE}]", 4, MAX_IMAGE_SIZE,
                                                   integer=True))
    num_workers: int = option(0, "DataLoader workers (folder datasets only)", group="data", goes_to=DATAMODULE,
                              parse=int, valid=Range("an integer in [0, 256]", 0, 256, integer=True),
                              resumable=True)
    # optimisation (None: the dataset's recipe, ``presets.RECIPES``)
    epochs: Optional[int] = option(None, group="optimisation", goes_to=TRAINER, parse=int, valid=POSITIVE_INT,
                                   resumable=True)
    batch_size: Optional[int] = option(None, group="optimisation", goes_to=DATAMODULE, parse=int,
                                       valid=POSITIVE_INT)
    lr: Optional[float] = option(None, group="optimisation", goes_to=MODULE, parse=float,
                                 valid=Range("a positive finite number", 0, low_open=True))
    momentum: float = option(0.9, group="optimisation", goes_to=MODULE, parse=float,
                             valid=Range("in [0, 1)", 0, 1, high_open=True))
    nesterov: bool = option(False, group="optimisation", goes_to=MODULE, switch="on")
    weight_decay: Optional[float] = option(None, "not applied to biases, norms, alpha, Dirac a/b", group="optimisation",
                                           goes_to=MODULE, parse=float, valid=Range("a finite number >= 0", 0))
    optimizer: str = option("sgd", group="optimisation", goes_to=MODULE, choices=OPTIMIZERS)
    schedule: Optional[str] = option(None, group="optimisation", goes_to=MODULE, choices=SCHEDULES)
    milestones: Optional[list] = option(None, "comma-separated; values < 1 are fractions of --epochs",
                                        group="optimisation", goes_to=MODULE, parse=parse_numbers, valid=Milestones())
    gamma: float = option(0.1, "multistep decay factor", group="optimisation", goes_to=MODULE,
                          parse=float, valid=Range("in (0, 1] (the multistep decay factor)", 0, 1, low_open=True))
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", group="optimisation",
                                    goes_to=MODULE, parse=float, valid=Range("in [0, 1)", 0, 1, high_open=True))
    accumulate_grad_batches: int = option(1, group="optimisation", goes_to=TRAINER, parse=int, valid=POSITIVE_INT)
    # hardware
    precision: str = option("32-true", "32-true | bf16-mixed | 16-mixed | 64-true | ...", group="hardware",
                            goes_to=TRAINER, resumable=True)
    accelerator: str = option("auto", "auto | cpu | gpu | ...", group="hardware", goes_to=TRAINER, resumable=True)
    devices: Any = option("auto", "auto | a count | a comma list of device indices", group="hardware",
                          goes_to=TRAINER, parse=parse_devices, resumable=True)
    strategy: str = option("auto", "auto | ddp | ddp_spawn | fsdp | ...", group="hardware", goes_to=TRAINER,
                           resumable=True)
    num_nodes: int = option(1, group="hardware", goes_to=TRAINER, parse=int, valid=POSITIVE_INT, resumable=True)
    dist_timeout: int = option(1800, "seconds a DDP collective or rendezvous may wait",
                               group="hardware", parse=int,
                               valid=Range("a number of seconds in [10, 86400]", 10, 24 * 3600, integer=True),
                               resumable=True)
    channels_last: bool = option(False, group="hardware", goes_to=MODULE, switch="on")
    compile: bool = option(False, "torch.compile the model", group="hardware", goes_to=MODULE, switch="on")
    deterministic: bool = option(False, group="hardware", goes_to=TRAINER, switch="on")
    # run
    seed: int = option(0, group="run", goes_to=DATAMODULE, parse=int,
                       valid=Range(f"an integer in [0, {MAX_SEED}]", 0, MAX_SEED, integer=True))
    logdir: str = option("runs", "where run folders go")
    name: Optional[str] = option(None, "the run's folder name (default " + RUN_NAME.replace("{", "<").replace("}", ">")
                                 + ")")
    fast_dev_run: bool = option(False, "one batch of train/val/test, nothing logged", goes_to=TRAINER, switch="on")
    limit_train_batches: Any = option(None, goes_to=TRAINER, parse=parse_count_or_fraction, valid=CountOrFraction(),
                                      resumable=True)
    limit_val_batches: Any = option(None, goes_to=TRAINER, parse=parse_count_or_fraction, valid=CountOrFraction(),
                                    resumable=True)
    resume: Optional[str] = option(None, f"<run>/{LAST_IN_RUN}: continue that run", resumable=True)
    diagnostics: str = option("all", f"all | none | comma list of {','.join(DIAGNOSTICS)}")
    stop_if_fails: bool = option(False, "end the run at the early verdict step when the verdict is fails (status "
                                        "stopped-early, exit 5; needs the verdict diagnostic)", switch="on")
    verdict_step: Optional[int] = option(None, f"the early verdict's step (default: {VERDICT_SHARE:.0%} of the planned "
                                               f"steps, {VERDICT_MIN_STEP} to {VERDICT_MAX_STEP})",
                                         parse=int, valid=POSITIVE_INT)
    diag_every: Optional[int] = option(None, "sampling interval in steps for every diagnostic (default: about "
                                             f"{NUM_SAMPLES} samples spread over the run)", parse=int,
                                       valid=POSITIVE_INT,
                                       resumable=True)
    logger: Optional[str] = option(None, f"loggers besides TensorBoard (always written): a comma list of "
                                         f"{', '.join(LOGGERS)}", metavar="NAMES", resumable=True)
    per_layer_scalars: bool = option(False, "also one TensorBoard scalar per layer and statistic (thousands of tags "
                                            "for a 100-layer net; every value is in <run>/diagnostics.csv and the "
                                            "depth x time images anyway)", switch="on", resumable=True)
    progress: bool = option(True, "no progress bar", switch="off", flags=("--no-progress",), resumable=True)
    # set by the run itself
    run_dir: Optional[str] = option(None, on_command_line=False)
    data_root: Optional[str] = option(None, on_command_line=False)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field, as ``config.json`` stores it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def applies(self, name: str) -> bool:
        """Whether option ``name`` applies to this run's family."""
        families = families_taking(name)
        return families is None or self.model in families

    @property
    def default_name(self) -> str:
        return self.name or RUN_NAME.format(model=self.model, arch=self.arch, depth=self.depth, dataset=self.dataset)


OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(RunConfig)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RunConfig)}
CHANGEABLE_ON_RESUME = frozenset(name for name, o in OPTIONS.items() if o.resumable)


def spellings(name: str) -> tuple:
    """The option's command-line spellings: its own ``flags``, else ``--name-with-dashes`` (the one rule)."""
    own = OPTIONS[name].flags if name in OPTIONS else ()
    return own or ("--" + name.replace("_", "-"),)


def flag(name: str) -> str:
    """The option's command-line spelling, for messages and argument lists."""
    return spellings(name)[0]


def to_argv(values: dict) -> list[str]:
    """train.py's arguments for option values (name -> value), in the mapping's order: what parsing them gives
    back. A switch appears when its value is the one its flag sets; None is left out; a list is comma-joined."""
    unknown = sorted(name for name in values if name not in OPTIONS or not OPTIONS[name].on_command_line)
    if unknown:
        raise KeyError(f"not train.py options: {', '.join(unknown)}")
    argv = []
    for name, value in values.items():
        o = OPTIONS[name]
        if value is None:
            continue
        if o.switch:
            if value == (o.switch == "on"):
                argv.append(flag(name))
            continue
        argv += [flag(name), spelled(value)]
    return argv


def spelled(value) -> str:
    """A value as a train.py argument: a list comma-joined; str() of a float is its shortest exact spelling, so
    the value parses back unchanged."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def from_dict(values: dict) -> RunConfig:
    """A RunConfig from a mapping such as a saved ``config.json``; keys it does not know are ignored."""
    return RunConfig(**{k: v for k, v in values.items() if k in OPTIONS})


def options_for(config: RunConfig, goes_to: str) -> dict:
    """The values of the options that go to ``goes_to`` and apply to the run's family."""
    return {name: getattr(config, name) for name, o in OPTIONS.items() if o.goes_to == goes_to and config.applies(name)}


def argument_groups(parser: argparse.ArgumentParser) -> dict:
    """The parser's groups, in :data:`GROUPS` order (for ``--help``)."""
    return {key: parser.add_argument_group(title) for key, title in GROUPS.items()}


def shown(value) -> str:
    """A value as the command line writes it (a list comma-joined, a float in its short form)."""
    if isinstance(value, (list, tuple)):
        return ",".join(map(shown, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(name: str) -> str:
    """The option's help, with its default from the field (a switch's default is off, or on for a --no- flag)."""
    o, default = OPTIONS[name], DEFAULTS[name]
    by_recipe = {arch: recipe[name] for arch, recipe in RECIPES.items() if name in recipe and name != "arch"}
    if default is None and by_recipe:  # the dataset's recipe (presets.RECIPES) decides
        recipes = ", ".join(f"{shown(value)} for {arch}" for arch, value in by_recipe.items())
        return f"{o.help} (default: the dataset's recipe, {recipes})".lstrip()
    if default is None or o.switch:
        return o.help
    return f"{o.help} (default {shown(default)})" if o.help else f"default {shown(default)}"


def add_arguments(groups: dict) -> None:
    """One command-line flag per option, each in its group."""
    for name, o in OPTIONS.items():
        if not o.on_command_line:
            continue
        kwargs = dict(dest=name, help=help_text(name) or None)
        if o.switch:
            kwargs["action"] = "store_true" if o.switch == "on" else "store_false"
        else:
            if o.parse is not None:
                kwargs["type"] = o.parse
            if o.choices is not None:
                kwargs["choices"] = list(o.choices)
            if o.metavar:
                kwargs["metavar"] = o.metavar
        if kwargs["help"]:
            kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help with %
        groups[o.group].add_argument(*spellings(name), **kwargs)
