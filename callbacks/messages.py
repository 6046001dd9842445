"""What the diagnostics tell the user while a run trains: one clean line each.

A warning stays a Python warning of its own category, :class:`DiagnosticWarning` (a ``UserWarning``),
so a project's warning filters can silence or raise it; it prints as ``warning: <message>``, without
the file and line of our code that raised it and without that source line. Only this category is
formatted so: every other warning keeps the format it had (Lightning's, the user's own).
"""
from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_warn


class DiagnosticWarning(UserWarning):
    """A warning from a deepplain diagnostic (filter with ``warnings.filterwarnings(..., category=...)``)."""


def warn(message: str) -> None:
    """``message`` as a :class:`DiagnosticWarning`, on rank zero."""
    rank_zero_warn(message, category=DiagnosticWarning)


def format_line(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _chained(previous):
    def formatwarning(message, category, filename, lineno, line=None):
        if isinstance(category, type) and issubclass(category, DiagnosticWarning):
            return format_line(message, category, filename, lineno, line)
        return previous(message, category, filename, lineno, line)
    formatwarning.deepplain = True
    return formatwarning


def install_format() -> None:
    """Format :class:`DiagnosticWarning` as one line, on top of whatever format is in place (once)."""
    if not getattr(warnings.formatwarning, "deepplain", False):
        warnings.formatwarning = _chained(warnings.formatwarning)
