"""Run configuration: defaults, dataset recipes, presets and explicit flags, merged and checked."""
from __future__ import annotations

from .errors import ConfigError
from .presets import get_preset

# Family defaults when --depth is not given, per (model, arch).
DEFAULT_DEPTH = {("plain", "mlp"): 10, ("plain", "conv"): 20, ("van", "mlp"): 10, ("van", "conv"): 26,
                 ("dirac", "mlp"): 10, ("dirac", "conv"): 28, ("resnet", "mlp"): 10, ("resnet", "conv"): 56,
                 ("highway", "mlp"): 10}

BASE = dict(
    model="plain", dataset="cifar10", data_dir=None, download=False, val_split=0.1, seed=0,
    optimizer="sgd", momentum=0.9, nesterov=False, gamma=0.1, max_norm=None,
    precision="32-true", accelerator="auto", devices="auto", strategy="auto", num_nodes=1,
    logdir="runs", name=None, num_workers=0, fast_dev_run=False, limit_train_batches=None,
    limit_val_batches=None, resume=None, diagnostics="all", diag_every=None, alpha_mode="lagrangian",
    lambda_lr_ratio=None, phase_out_epochs=None, channels_last=False, compile=False, image_size=None,
    accumulate_grad_batches=1, deterministic=False, progress=True, verify_checksums=True,
)

# The recipe a dataset implies when neither a preset nor a flag says otherwise.
CONV_RECIPE = dict(arch="conv", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, epochs=165,
                   batch_size=128, schedule="multistep", milestones=[82, 125])  # the VAN/ResNet CIFAR recipe
MLP_RECIPE = dict(arch="mlp", optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, epochs=50,
                  batch_size=128, schedule="none", milestones=[0.5, 0.75])

MODEL_OPTION_KEYS = ("width", "activation", "negative_slope", "norm", "init", "layout", "block", "gate_bias")
VAN_ONLY = ("alpha_mode", "lambda_lr_ratio", "phase_out_epochs")


def merge(explicit: dict) -> dict:
    """defaults <- dataset recipe <- preset <- explicit flags."""
    preset = get_preset(explicit["preset"]) if explicit.get("preset") else {}
    dataset = explicit.get("dataset", preset.get("dataset", BASE["dataset"]))
    from datamodules import CONV_DATASETS
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
    validate_model(config)
    return config


def validate_model(config: dict) -> None:
    """Build the model on the meta device (no memory, no data) so that a bad depth, width or option
    is reported before any dataset is read."""
    import torch

    from .registry import build_model
    shape = (3, 32, 32) if config["arch"] == "conv" else (1, 28, 28)
    with torch.device("meta"):
        build_model(config["model"], config["depth"], arch=config["arch"], input_shape=shape, num_classes=10,
                    **model_options(config))


def check(config: dict, explicit: dict) -> None:
    def positive_int(key, flag):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{flag} must be a positive integer, got {value}")

    positive_int("depth", "--depth")
    positive_int("width", "--width")
    positive_int("epochs", "--epochs")
    positive_int("batch_size", "--batch-size")
    positive_int("num_nodes", "--num-nodes")
    positive_int("diag_every", "--diag-every")
    positive_int("accumulate_grad_batches", "--accumulate-grad-batches")
    if config["lr"] <= 0:
        raise ConfigError(f"--lr must be positive, got {config['lr']}")
    if config["weight_decay"] < 0:
        raise ConfigError(f"--weight-decay must be >= 0, got {config['weight_decay']}")
    if not 0 <= config["momentum"] < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {config['momentum']}")
    if not 0 <= config["val_split"] < 1:
        raise ConfigError(f"--val-split must be in [0, 1) (0 validates on the test set), got {config['val_split']}")
    if config["max_norm"] is not None and config["max_norm"] <= 0:
        raise ConfigError(f"--max-norm must be positive, got {config['max_norm']}")
    if config.get("negative_slope") is not None and not 0 <= config["negative_slope"] < 1:
        raise ConfigError(f"--negative-slope must be in [0, 1), got {config['negative_slope']}")
    for key in ("limit_train_batches", "limit_val_batches"):
        value = config.get(key)
        if value is not None and (value <= 0 or (isinstance(value, float) and value > 1)):
            raise ConfigError(f"--{key.replace('_', '-')} must be a count >= 1 or a fraction in (0, 1], got {value}")
    if config["model"] != "van":
        for key in VAN_ONLY:
            if explicit.get(key) is not None:
                raise ConfigError(f"--{key.replace('_', '-')} applies to --model van only, got --model {config['model']}")
    if config["dataset"] == "imagefolder" and not config.get("data_dir"):
        raise ConfigError("--dataset imagefolder needs --data-dir <root with train/ and val/>")


def model_options(config: dict) -> dict:
    """The family options the user (or a preset) set; the rest take the family's defaults."""
    options = {k: config[k] for k in MODEL_OPTION_KEYS if config.get(k) is not None}
    if config["dataset"] == "imagefolder" and config["model"] == "dirac" and config["arch"] == "conv":
        options.setdefault("layout", "imagenet")
    return options
