"""The end-of-run "trainability report": which layers vanished, exploded or went singular."""
from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def trainability_findings(callbacks, low: float = 0.05, high: float = 50.0) -> dict[str, list[str]]:
    """Layer names per finding, from the diagnostics' latest samples (empty when none ran)."""
    from deepplain.callbacks import ActivationSaturationMonitor, ConditionNumberProbe
    findings = {"vanished": [], "exploded": [], "dead units": [], "singular": [], "ill-conditioned": []}
    for cb in callbacks:
        if isinstance(cb, ActivationSaturationMonitor):
            for name, s in cb.last_stats.items():
                if s["mean_abs"] < cb.low:
                    findings["vanished"].append(name)
                if s["max_abs"] > cb.high:
                    findings["exploded"].append(name)
                if s["frac_dead"] > 0.5:
                    findings["dead units"].append(name)
        if isinstance(cb, ConditionNumberProbe):
            for name, s in cb.last_stats.items():
                if math.isinf(s["kappa"]):
                    findings["singular"].append(name)
                elif s["kappa"] > 1e6:
                    findings["ill-conditioned"].append(name)
    return findings


def print_trainability_report(callbacks, console: Console | None = None) -> dict[str, list[str]]:
    findings = trainability_findings(callbacks)
    console = console or Console(stderr=False)
    table = Table(title="trainability report", show_lines=False)
    table.add_column("finding")
    table.add_column("layers", overflow="fold")
    rules = {"vanished": "mean |a| < 0.05", "exploded": "max |a| > 50", "dead units": "> 50% of units never fire",
             "singular": "representation kappa = inf", "ill-conditioned": "representation kappa > 1e6"}
    for kind, layers in findings.items():
        shown = ", ".join(layers[:6]) + (f" (+{len(layers) - 6} more)" if len(layers) > 6 else "")
        table.add_row(f"{kind} ({rules[kind]})", f"{len(layers)}: {shown}" if layers else "none")
    console.print(table)
    return findings
