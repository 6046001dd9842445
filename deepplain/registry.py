"""Registry from CLI model name to constructor, and the public ``build_model`` entry point."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    builders: dict  # arch -> constructor(depth, input_shape, num_classes, **options)
    summary: str
    paper: str


_FAMILIES: dict[str, Family] = {}


def register(name: str, arch: str, summary: str = "", paper: str = "") -> Callable:
    """Decorator registering ``fn(depth, *, input_shape, num_classes, **options)`` as family ``name``/``arch``."""
    def decorate(fn):
        family = _FAMILIES.get(name)
        builders = dict(family.builders) if family else {}
        builders[arch] = fn
        _FAMILIES[name] = Family(name, builders, summary or (family.summary if family else ""),
                                 paper or (family.paper if family else ""))
        return fn
    return decorate


def model_names() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _ensure_loaded()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def build_model(name: str, depth: int, *, arch: str = "mlp", input_shape=(1, 28, 28), num_classes: int = 10,
                **options) -> nn.Module:
    """Build model family ``name`` at ``depth`` as a plain ``nn.Module``.

    ``options`` are family specific (``width``, ``activation``, ``norm``, ``init``, ...); an option
    the family does not take is an error naming the ones it does.
    """
    family = get_family(name)
    if arch not in family.builders:
        raise ConfigError(f"{name} has no {arch!r} form; valid: {', '.join(sorted(family.builders))}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ConfigError(f"depth must be a positive integer, got {depth!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    builder = family.builders[arch]
    accepted = [p for p in inspect.signature(builder).parameters if p not in ("depth", "input_shape", "num_classes")]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"{name} {arch} does not take option(s) {', '.join(unknown)}; valid: {', '.join(accepted)}")
    width = options.get("width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise ConfigError(f"width must be a positive integer, got {width!r}")
    return builder(depth, input_shape=tuple(input_shape), num_classes=num_classes, **options)


def describe_models() -> str:
    """One line per family for ``--help``: forms, what it is, and its paper."""
    _ensure_loaded()
    return "\n".join(f"  {f.name:<8} ({', '.join(sorted(f.builders))}) {f.summary}; {f.paper}"
                     for f in sorted(_FAMILIES.values(), key=lambda f: f.name))


def _ensure_loaded() -> None:
    # Importing the models package runs every @register decorator exactly once.
    from . import models  # noqa: F401
