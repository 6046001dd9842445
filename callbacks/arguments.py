"""Checking a callback's constructor arguments: one way, with one-line messages that name the argument.

Public, so that a project's own callbacks can check their arguments the same way.
"""
from __future__ import annotations

import math
from typing import Optional


def check_int(name: str, value, low: int = 1, allow_none: bool = False, what: str = "") -> Optional[int]:
    """``value`` if it is an integer >= ``low`` (or None, when allowed), else a ValueError:
    ``"<name> must be <what>, got <value>"`` (``what`` defaults to "a positive integer" or "an integer >= low")."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = what or (("a positive integer" if low == 1 else f"an integer >= {low}")
                        + (" or None" if allow_none else ""))
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_number(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False, allow_none: bool = False,
                 what: str = "") -> Optional[float]:
    """``float(value)`` if it is a finite number within the bounds (open or closed ends), or None when allowed;
    else a ValueError ``"<name> must be <what>, got <value>"`` (``what`` defaults to the interval)."""
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if not what:
            ends = ("(" if low_open else "[") + (f"{low:g}" if low is not None else "-inf") + ", " + (
                f"{high:g}" if high is not None else "inf") + (")" if high_open or high is None else "]")
            what = f"a number in {ends}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)
