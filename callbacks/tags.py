"""The ``overview/`` section: the few scalars that say at a glance which layers fail, declared once each.

A callback lists its :class:`OverviewScalar` s in ``overview_scalars``; the value it logs
(``scalar.tag``) and the Custom Scalars chart that draws it (:func:`overview_charts`) are read from the
same declaration. Every other tag of a callback derives from its ``prefix`` (its TensorBoard section).
"""
from __future__ import annotations

from dataclasses import dataclass

OVERVIEW = "overview"  # the section every callback's overview scalars share


@dataclass(frozen=True)
class OverviewScalar:
    """``overview/<name>``, drawn in the Custom Scalars chart titled ``chart`` (scalars of one chart share it)."""
    name: str
    chart: str
    anchored: bool = False  # the chart matches this tag only (not a second instance's ``#2`` copy)

    @property
    def tag(self) -> str:
        return f"{OVERVIEW}/{self.name}"


def overview_charts(scalars) -> dict[str, str]:
    """Custom Scalars charts (title -> regex of its tags) of the declared overview scalars, in their order."""
    grouped: dict[str, list[OverviewScalar]] = {}
    for scalar in scalars:
        grouped.setdefault(scalar.chart, []).append(scalar)
    charts = {}
    for title, members in grouped.items():
        names = [s.name for s in members]
        regex = f"{OVERVIEW}/{names[0]}" if len(names) == 1 else f"{OVERVIEW}/({'|'.join(names)})"
        charts[title] = f"^{regex}$" if all(s.anchored for s in members) else regex
    return charts


def overview_values(scalars, values: dict) -> dict[str, float]:
    """``{tag: value}`` for the declared scalars whose name is in ``values`` (name -> value)."""
    return {s.tag: values[s.name] for s in scalars if s.name in values}
