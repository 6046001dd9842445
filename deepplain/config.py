"""From explicit values to a checked :class:`~deepplain.schema.RunConfig`: defaults, the dataset's
recipe, a preset, a config file and flags, merged and checked before anything is read or written.

Precedence, lowest first: the schema's defaults <- the dataset's recipe (``presets.RECIPES``, by
the dataset's default architecture) <- ``--preset`` <- ``--config FILE.yaml`` <- flags on the
command line. Every check here is about the values alone; ``deepplain.preflight`` checks them
against the machine (devices, memory, folders, data) and ``deepplain.checkpoints`` the checkpoint.
"""
from __future__ import annotations

from .callbacks import DIAGNOSTICS
from .datamodules import DATASETS, get_dataset
from .errors import ConfigError
from .loggers import check_loggers
from .presets import RECIPES, get_preset
from .registry import families_taking, get_family
from .schema import DEFAULTS, OPTIONS, RunConfig, flag, from_dict

MAX_NAME_BYTES = 200


def merge(explicit: dict) -> RunConfig:
    """defaults <- dataset recipe <- preset <- explicit values (config file and flags), checked."""
    preset = get_preset(explicit["preset"]) if explicit.get("preset") else {}
    dataset = get_dataset(explicit.get("dataset", preset.get("dataset", DEFAULTS["dataset"])))
    values = {**DEFAULTS, **RECIPES[dataset.arch], **preset, **explicit, "dataset": dataset.name}
    if not dataset.held_out_validation and "val_split" not in explicit:
        values["val_split"] = 0.0  # it validates on its own split
    family = get_family(values["model"])
    forms = sorted(family.forms)
    if values["arch"] not in forms:
        if "arch" in explicit or "arch" in preset:
            raise ConfigError(f"{values['model']} has no {values['arch']!r} form; valid: {', '.join(forms)}")
        values["arch"] = forms[0]  # e.g. highway has only an MLP form, also on CIFAR
    if values.get("depth") is None:
        values["depth"] = family.form(values["arch"]).default_depth
    check(values, explicit)
    return from_dict(values)


def check(values: dict, explicit: dict) -> None:
    """Every check that needs only the values: each option's range (the schema's), then combinations."""
    dataset = DATASETS[values["dataset"]]
    for name, o in OPTIONS.items():
        value = values.get(name)
        if value is None or o.valid is None or (name == "image_size" and dataset.image_size is None):
            continue
        message = o.valid.error(flag(name), value)
        if message:
            raise ConfigError(message)
    epochs, phase_out = values["epochs"], values.get("phase_out")
    if phase_out is not None and phase_out >= 1 and phase_out > epochs:
        raise ConfigError(f"--phase-out {phase_out:g} is an epoch after the last one (--epochs {epochs}); give an "
                          f"epoch <= {epochs} or a share below 1")
    if values.get("nesterov") and (values["optimizer"] != "sgd" or not values["momentum"] > 0):
        raise ConfigError("--nesterov needs --optimizer sgd and a positive --momentum")
    if values.get("schedule") == "multistep" and not values.get("milestones"):
        raise ConfigError("--schedule multistep needs --milestones (e.g. 82,125, or 0.5,0.75 as shares of --epochs)")
    for name in OPTIONS:
        families = families_taking(name)
        if families and values["model"] not in families and explicit.get(name) is not None:
            raise ConfigError(f"{flag(name)} applies to --model {' or '.join(families)} only, got --model "
                              f"{values['model']}")
    if values.get("max_norm_classifier") and not values.get("max_norm"):
        raise ConfigError("--max-norm-classifier needs --max-norm")
    if dataset.needs_data_dir and not values.get("data_dir"):
        raise ConfigError(f"--dataset {dataset.name} needs --data-dir <root with train/ and val/>")
    if not dataset.held_out_validation and values.get("val_split"):
        raise ConfigError(f"--val-split applies to datasets validated on a held-out share; --dataset {dataset.name} "
                          "validates on its own val/ split")
    if values.get("image_size") is not None and dataset.image_size is None:
        resizable = " and ".join(name for name, d in DATASETS.items() if d.image_size is not None)
        raise ConfigError(f"--image-size applies to {resizable}, got --dataset {dataset.name}")
    diagnostics = check_diagnostics(values.get("diagnostics"))
    for name in ("stop_if_fails", "verdict_step"):
        if values.get(name) and "verdict" not in diagnostics:
            raise ConfigError(f"{flag(name)} needs the verdict diagnostic; --diagnostics {values.get('diagnostics')} "
                              "leaves it out (all, or a list with saturation,verdict)")
    check_loggers(values.get("logger"))
    check_run_name(values)


def check_diagnostics(spec) -> list[str]:
    """The diagnostic callbacks named by ``--diagnostics`` (``all``, ``none`` or a comma list of names)."""
    valid = f"valid: all, none, or a comma list of {', '.join(DIAGNOSTICS)}"
    if spec is None or spec == "none":
        return []
    if not str(spec).strip():
        raise ConfigError(f"--diagnostics is empty; {valid} (none turns them off)")
    if spec == "all":
        return list(DIAGNOSTICS)
    names = [s.strip() for s in str(spec).split(",")]
    if "" in names:
        raise ConfigError(f"--diagnostics {spec!r} has an empty name; {valid}")
    if {"all", "none"} & set(names):
        word = "all" if "all" in names else "none"
        raise ConfigError(f"--diagnostics: {word} stands alone, not in a list (got {spec!r}); {valid}")
    unknown = [n for n in names if n not in DIAGNOSTICS]
    if unknown:
        raise ConfigError(f"unknown diagnostics {', '.join(unknown)}; {valid}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--diagnostics names {', '.join(twice)} twice; each diagnostic runs once")
    if "verdict" in names and "saturation" not in names:
        raise ConfigError(f"--diagnostics {spec}: the verdict reads what saturation measures; add saturation")
    return names


def check_run_name(values: dict) -> None:
    """``--logdir`` and ``--name`` must name a folder inside the log folder, never outside it."""
    logdir = values.get("logdir")
    if not isinstance(logdir, str) or not logdir.strip() or "\0" in logdir:
        raise ConfigError(f"--logdir must be a folder name, got {logdir!r}")
    name = values.get("name")
    if name is None:
        return
    if (not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name
            or "\0" in name or name.startswith("-")):
        raise ConfigError(f"--name must be one folder name (no '/', not '.' or '..', not starting with '-'), "
                          f"got {name!r}")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ConfigError(f"--name is {len(name.encode())} bytes long; at most {MAX_NAME_BYTES} are allowed")


def model_options(config: RunConfig) -> dict:
    """The family options the user (or a preset) set, and those the dataset calls for; the rest take the
    family's defaults."""
    options = {k: v for k, v in config.to_dict().items() if OPTIONS[k].goes_to == "model" and v is not None}
    return {**get_dataset(config.dataset).model_defaults.get((config.model, config.arch), {}), **options}


def depth_rule(config: RunConfig):
    """The family's depth rule ``config.depth`` follows, and the options the builder will use at that depth
    (with what it picks by depth, e.g. resnet's block); a ConfigError listing the valid depths otherwise.
    Builds nothing."""
    form = get_family(config.model).form(config.arch)
    options = model_options(config)
    if form.pick_options is not None:
        options = form.pick_options(config.depth, options)
    return form.check_depth(f"{config.model} {config.arch}", config.depth, options), options


