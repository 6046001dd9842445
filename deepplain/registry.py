"""The model families: one record per family (its forms, their builders, default depths and depth
rules, its LightningModule), and the public ``build_model`` entry point.

A model file declares its family once with :func:`define_family` and registers each form
(``mlp``, ``conv``) with the :func:`register` decorator; nothing else in deepplain names a family.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class DepthRule:
    """The depths a form can be built at: ``step * n + offset`` for ``n >= 1`` (any depth >= 1 by
    default), or only the ``fixed`` depths of a fixed architecture. ``examples`` and ``label`` are
    the wording of the error that lists them."""
    step: int = 1
    offset: int = 0
    examples: str = ""
    label: str = ""
    fixed: tuple = ()

    def allows(self, depth: int) -> bool:
        if self.fixed:
            return depth in self.fixed
        return depth >= self.step + self.offset and (depth - self.offset) % self.step == 0

    def blocks(self, depth: int) -> int:
        """``n`` of ``depth = step * n + offset``."""
        return (depth - self.offset) // self.step

    def first_depths(self, count: int = 2) -> list[int]:
        return list(self.fixed[:count]) if self.fixed else [self.step * n + self.offset for n in range(1, count + 1)]

    def describe(self) -> str:
        if self.fixed:
            return " or ".join(map(str, self.fixed))
        rule = f"{self.step}n+{self.offset}" + (f" {self.label}" if self.label else "")
        return f"{rule} ({self.examples})" if self.examples else rule


ANY_DEPTH = DepthRule()


@dataclass(frozen=True)
class Form:
    """One architecture (``mlp`` or ``conv``) of a family."""
    builder: Callable                     # builder(depth, *, input_shape, num_classes, **options) -> nn.Module
    default_depth: int
    depth_rules: tuple = (ANY_DEPTH,)     # any of them
    depth_rules_by_option: dict = field(default_factory=dict)  # (option, value) -> rules replacing the default
    pick_options: Optional[Callable] = None  # (depth, options) -> options the builder would choose (resnet's block)

    def options(self) -> list[str]:
        """The options the builder takes, in its signature's order."""
        return [p for p in inspect.signature(self.builder).parameters if p not in ("depth", "input_shape",
                                                                                     "num_classes")]

    def defaults(self) -> dict:
        """The builder's own default of each option it takes (what a run that leaves an option unset trains with)."""
        parameters = inspect.signature(self.builder).parameters
        return {name: parameters[name].default for name in self.options()
                if parameters[name].default is not inspect.Parameter.empty}

    def rules(self, options: dict) -> tuple:
        """The depth rules at these options, and the ``(option, value)`` that chose them (None: the default)."""
        for key, rules in self.depth_rules_by_option.items():
            if options.get(key[0]) == key[1]:
                return rules, key
        return self.depth_rules, None

    def check_depth(self, what: str, depth: int, options: dict) -> DepthRule:
        """The rule ``depth`` follows, or a ConfigError listing the valid depths."""
        rules, chosen_by = self.rules(options)
        for rule in rules:
            if rule.allows(depth):
                return rule
        valid = " or ".join(r.describe() for r in rules)
        if chosen_by and all(r.fixed for r in rules):  # a fixed architecture, e.g. layout oyedotun-50
            raise ConfigError(f"{what} {chosen_by[0]} {chosen_by[1]} has depth {valid}, got {depth}")
        raise ConfigError(f"{what} depth must be {valid}, got {depth}")


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    paper: str
    module: str  # "package.module:Class" of its LightningModule, imported when asked for (models need no Lightning)
    forms: dict = field(default_factory=dict)  # arch -> Form

    def form(self, arch: str) -> Form:
        if arch not in self.forms:
            raise ConfigError(f"{self.name} has no {arch!r} form; valid: {', '.join(sorted(self.forms))}")
        return self.forms[arch]

    def module_class(self) -> type:
        path, name = self.module.split(":")
        return getattr(importlib.import_module(path), name)

    def module_options(self) -> list[str]:
        """The options the family's LightningModule adds to the common ones: its own ``__init__``'s keywords."""
        init = vars(self.module_class()).get("__init__")
        if init is None:
            return []
        return [p.name for p in inspect.signature(init).parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]

    def takes(self, option: str) -> bool:
        """Whether a form's builder or the family's own LightningModule takes ``option``."""
        return any(option in form.options() for form in self.forms.values()) or option in self.module_options()


_FAMILIES: dict[str, Family] = {}


def define_family(name: str, summary: str, paper: str, module: str) -> None:
    if name in _FAMILIES:
        raise ConfigError(f"model family {name!r} is already defined")
    _FAMILIES[name] = Family(name, summary, paper, module)


def register(name: str, arch: str, default_depth: int, depth: tuple | DepthRule = ANY_DEPTH,
             depth_by_option: dict | None = None, pick_options: Callable | None = None) -> Callable:
    """Decorator registering ``fn(depth, *, input_shape, num_classes, **options)`` as form ``arch`` of
    family ``name`` (declared with :func:`define_family`); a form registered twice is an error."""
    def decorate(fn):
        if name not in _FAMILIES:
            raise ConfigError(f"register {name}/{arch}: define_family({name!r}, ...) first")
        if arch in _FAMILIES[name].forms:
            raise ConfigError(f"model {name} already has a {arch!r} form")
        rules = depth if isinstance(depth, tuple) else (depth,)
        _FAMILIES[name].forms[arch] = Form(fn, default_depth, rules, dict(depth_by_option or {}), pick_options)
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
    form = get_family(name).form(arch)
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ConfigError(f"depth must be a positive integer, got {depth!r}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    accepted = form.options()
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"{name} {arch} does not take option(s) {', '.join(unknown)}; valid: {', '.join(accepted)}")
    width = options.get("width")
    if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 1):
        raise ConfigError(f"width must be a positive integer, got {width!r}")
    form.check_depth(f"{name} {arch}", depth, options)
    return form.builder(depth, input_shape=tuple(input_shape), num_classes=num_classes, **options)


def family_naming(module_path: str) -> Optional[str]:
    """The family whose record names the LightningModule ``module_path`` (``package.module:Class``), if any."""
    _ensure_loaded()
    return next((f.name for f in _FAMILIES.values() if f.module == module_path), None)


@functools.lru_cache(maxsize=None)
def families_taking(option: str) -> Optional[tuple]:
    """The families that take ``option`` (the one rule for which options apply to which family, read from the
    family records); None for an option of every family (``lr``, ``width``, or one only some forms take)."""
    _ensure_loaded()
    takers = tuple(name for name, family in sorted(_FAMILIES.items()) if family.takes(option))
    return takers if takers and len(takers) < len(_FAMILIES) else None


def describe_depth_rules() -> str:
    """The depth rules that are not "any depth", in one line: ``plain conv 3n+2, van conv 8n+2, ...``."""
    _ensure_loaded()
    return ", ".join(f"{name} {arch} {' or '.join(f'{r.step}n+{r.offset}' for r in form.depth_rules)}"
                     for name, family in sorted(_FAMILIES.items()) for arch, form in sorted(family.forms.items())
                     if form.depth_rules != (ANY_DEPTH,))


def describe_models() -> str:
    """One line per family for ``--help``: forms, what it is, and its paper."""
    _ensure_loaded()
    return "\n".join(f"  {f.name:<8} ({', '.join(sorted(f.forms))}) {f.summary}; {f.paper}"
                     for f in sorted(_FAMILIES.values(), key=lambda f: f.name))


def _ensure_loaded() -> None:
    # A real cycle: the model files import this module to register themselves; importing the package
    # here, on first use, runs every registration exactly once.
    from . import models  # noqa: F401
