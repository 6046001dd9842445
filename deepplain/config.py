"""Run configuration: defaults, dataset recipes, presets, a config file and explicit flags, merged
and checked before anything is read or written.

Precedence, lowest first: :data:`BASE` <- the dataset's recipe (:data:`CONV_RECIPE` or
:data:`MLP_RECIPE`) <- ``--preset`` <- ``--config FILE.yaml`` <- flags on the command line.
Every check here is about the values alone; ``deepplain.preflight`` checks them against the
machine (devices, memory, folders, data, checkpoints).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ConfigError
from .presets import get_preset

# Family defaults when --depth is not given, per (model, arch).
DEFAULT_DEPTH = {("plain", "mlp"): 10, ("plain", "conv"): 20, ("van", "mlp"): 10, ("van", "conv"): 26,
                 ("dirac", "mlp"): 10, ("dirac", "conv"): 28, ("resnet", "mlp"): 10, ("resnet", "conv"): 56,
                 ("highway", "mlp"): 10}

BASE = dict(
    model="plain", dataset="cifar10", data_dir=None, download=False, val_split=0.1, seed=0,
    optimizer="sgd", momentum=0.9, nesterov=False, gamma=0.1, max_norm=None, max_norm_classifier=False,
    precision="32-true", accelerator="auto", devices="auto", strategy="auto", num_nodes=1, dist_timeout=1800,
    logdir="runs", name=None, num_workers=0, fast_dev_run=False, limit_train_batches=None,
    limit_val_batches=None, resume=None, diagnostics="all", diag_every=None, alpha_mode="lagrangian",
    lambda_lr_ratio=None, phase_out=None, channels_last=False, compile=False, image_size=None,
    accumulate_grad_batches=1, deterministic=False, progress=True, verify_checksums=True, per_layer_scalars=False,
)

# The recipe a dataset implies when neither a preset nor a flag says otherwise.
CONV_RECIPE = dict(arch="conv", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=165,
                   batch_size=128, schedule="multistep", milestones=[82, 125])  # the VAN/ResNet CIFAR recipe
MLP_RECIPE = dict(arch="mlp", optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, epochs=50,
                  batch_size=128, schedule="none", milestones=[0.5, 0.75])

MODEL_OPTION_KEYS = ("width", "activation", "negative_slope", "norm", "init", "layout", "block", "gate_bias")
VAN_ONLY = ("alpha_mode", "lambda_lr_ratio", "phase_out")
# What --resume may change: the length of the run, hardware, logging and where the data is.
CHANGEABLE_ON_RESUME = {"epochs", "resume", "accelerator", "devices", "strategy", "num_nodes", "precision",
                        "progress", "limit_train_batches", "limit_val_batches", "num_workers", "data_dir",
                        "diag_every", "dist_timeout", "download", "verify_checksums", "per_layer_scalars"}
MAX_SEED = 2 ** 32 - 1
MAX_NAME_BYTES = 200
MAX_IMAGE_SIZE = 1024


def merge(explicit: dict) -> dict:
    """defaults <- dataset recipe <- preset <- explicit values (config file and flags), checked."""
    preset = get_preset(explicit["preset"]) if explicit.get("preset") else {}
    dataset = explicit.get("dataset", preset.get("dataset", BASE["dataset"]))
    from .datamodules import CONV_DATASETS, DATAMODULES
    if dataset not in DATAMODULES:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATAMODULES)}")
    recipe = CONV_RECIPE if dataset in CONV_DATASETS else MLP_RECIPE
    config = {**BASE, **recipe, **preset, **explicit}
    config["dataset"] = dataset
    from .registry import get_family
    forms = sorted(get_family(config["model"]).builders)
    if config["arch"] not in forms:
        if "arch" in explicit or "arch" in preset:
            raise ConfigError(f"{config['model']} has no {config['arch']!r} form; valid: {', '.join(forms)}")
        config["arch"] = forms[0]  # e.g. highway has only an MLP form, also on CIFAR
    if config.get("depth") is None:
        config["depth"] = DEFAULT_DEPTH[(config["model"], config["arch"])]
    check(config, explicit)
    return config


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check(config: dict, explicit: dict) -> None:
    """Every check that needs only the values: types, ranges, finiteness, names, combinations."""
    def integer(key, low=1, high=None, what="a positive integer"):
        value = config.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            raise ConfigError(f"{_flag(key)} must be {what}, got {value!r}")

    def number(key, low=None, high=None, low_open=False, high_open=False, what=None):
        value = config.get(key)
        if value is None:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise ConfigError(f"{_flag(key)} must be {what}, got {value!r}")

    for key in ("depth", "width", "epochs", "batch_size", "num_nodes", "diag_every", "accumulate_grad_batches"):
        integer(key)
    integer("seed", 0, MAX_SEED, f"an integer in [0, {MAX_SEED}]")
    integer("num_workers", 0, 256, "an integer in [0, 256]")
    integer("dist_timeout", 10, 24 * 3600, "a number of seconds in [10, 86400]")
    number("lr", 0, low_open=True, what="a positive finite number")
    number("weight_decay", 0, what="a finite number >= 0")
    number("momentum", 0, 1, high_open=True, what="in [0, 1)")
    number("gamma", 0, 1, low_open=True, what="in (0, 1] (the multistep decay factor)")
    number("val_split", 0, 0.9, what="in [0, 0.9] (0 validates on the test set)")
    number("max_norm", 0, low_open=True, what="a positive finite number")
    number("negative_slope", 0, 1, high_open=True, what="in [0, 1)")
    number("gate_bias", what="a finite number")
    number("lambda_lr_ratio", 0, what="a finite number >= 0")
    number("phase_out", 0, low_open=True, what="a share of training in (0, 1) or an epoch >= 1")
    if config.get("phase_out") is not None and config["phase_out"] >= 1 and config["phase_out"] > config["epochs"]:
        raise ConfigError(f"--phase-out {config['phase_out']:g} is an epoch after the last one (--epochs "
                          f"{config['epochs']}); give an epoch <= {config['epochs']} or a share below 1")
    if config.get("nesterov") and (config["optimizer"] != "sgd" or not config["momentum"] > 0):
        raise ConfigError("--nesterov needs --optimizer sgd and a positive --momentum")
    milestones = config.get("milestones") or []
    if config.get("schedule") == "multistep" and not milestones:
        raise ConfigError("--schedule multistep needs --milestones (e.g. 82,125, or 0.5,0.75 as shares of --epochs)")
    for m in milestones:
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m <= 0 or (
                m >= 1 and float(m) != int(m)):
            raise ConfigError(f"--milestones must be shares of --epochs in (0, 1) or whole epochs >= 1, got {m!r}")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0
                                  or (isinstance(value, float) and value > 1)):
            raise ConfigError(f"{_flag(key)} must be a count >= 1 or a fraction in (0, 1], got {value}")
    if config["model"] != "van":
        for key in VAN_ONLY:
            if explicit.get(key) is not None:
                raise ConfigError(f"{_flag(key)} applies to --model van only, got --model {config['model']}")
    if config.get("max_norm_classifier") and not config.get("max_norm"):
        raise ConfigError("--max-norm-classifier needs --max-norm")
    if config["dataset"] == "imagefolder" and not config.get("data_dir"):
        raise ConfigError("--dataset imagefolder needs --data-dir <root with train/ and val/>")
    if config.get("image_size") is not None:
        if config["dataset"] not in ("coil20", "imagefolder"):
            raise ConfigError(f"--image-size applies to coil20 and imagefolder, got --dataset {config['dataset']}")
        integer("image_size", 4, MAX_IMAGE_SIZE, f"an integer in [4, {MAX_IMAGE_SIZE}]")
    check_diagnostics(config.get("diagnostics"))
    check_run_name(config)


def check_diagnostics(spec) -> list[str]:
    """The diagnostic callbacks named by ``--diagnostics`` (``all``, ``none`` or a comma list)."""
    from .callbacks import DIAGNOSTICS
    if spec in (None, "none", ""):
        return []
    names = list(DIAGNOSTICS) if spec == "all" else [s.strip() for s in str(spec).split(",") if s.strip()]
    unknown = [n for n in names if n not in DIAGNOSTICS]
    if unknown or not names:
        raise ConfigError(f"unknown diagnostics {', '.join(unknown) or repr(spec)}; valid: all, none, "
                          f"{', '.join(DIAGNOSTICS)} (comma-separated)")
    return names


def check_run_name(config: dict) -> None:
    """``--logdir`` and ``--name`` must name a folder inside the log folder, never outside it."""
    logdir = config.get("logdir")
    if not isinstance(logdir, str) or not logdir.strip() or "\0" in logdir:
        raise ConfigError(f"--logdir must be a folder name, got {logdir!r}")
    name = config.get("name")
    if name is None:
        return
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name.startswith("-")):
        raise ConfigError(f"--name must be one folder name (no '/', not '.' or '..', not starting with '-'), "
                          f"got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"--name is {len(name.encode())} bytes long; at most {MAX_NAME_BYTES} are allowed")


def default_name(config: dict) -> str:
    return config.get("name") or f"{config['model']}-{config['arch']}-{config['depth']}-{config['dataset']}"


def model_options(config: dict) -> dict:
    """The family options the user (or a preset) set; the rest take the family's defaults."""
    options = {k: config[k] for k in MODEL_OPTION_KEYS if config.get(k) is not None}
    if config["dataset"] == "imagefolder" and config["model"] == "dirac" and config["arch"] == "conv":
        options.setdefault("layout", "imagenet")
    return options


def load_resume_config(explicit: dict) -> dict:
    """For ``--resume``: the run's saved configuration, with the explicit flags that may change.

    The checkpoint itself is checked by ``deepplain.checkpoints.check_checkpoint``.
    """
    ckpt = Path(explicit["resume"])
    if not ckpt.is_file():
        raise ConfigError(f"--resume checkpoint {ckpt} does not exist")
    if ckpt.name != "last.ckpt" and not (ckpt.name.startswith("hpc_ckpt_") and ckpt.suffix == ".ckpt"):
        # Resuming continues the run in its folder; from an older state it would overwrite the newer last.ckpt.
        raise ConfigError(f"--resume continues a run in place from its checkpoints/last.ckpt; {ckpt.name} is an "
                          "earlier state of that run (load it with <Module>.load_from_checkpoint to use it elsewhere)")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--resume: {saved} not found; pass a checkpoint inside a deepplain run folder")
    try:
        config = json.loads(saved.read_text())
        if not isinstance(config, dict) or "model" not in config or "dataset" not in config:
            raise ValueError("not a deepplain run configuration")
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--resume: {saved} is unreadable or malformed ({str(exc).splitlines()[0]}); "
                          "the run folder cannot be resumed") from None
    fixed = sorted(k for k in explicit if k not in CHANGEABLE_ON_RESUME and explicit[k] != config.get(k))
    if fixed:
        raise ConfigError(f"--resume continues the saved run; these flags cannot change: "
                          f"{', '.join(_flag(k) for k in fixed)}")
    merged = {**BASE, **config, **explicit}
    merged["run_dir"] = str(run_dir)
    check(merged, {})
    return merged
