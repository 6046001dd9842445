"""The end of a run in the terminal and in ``summary.json``: the trainability report (which layers
vanished, exploded, died or went singular, at their worst and at the end), what the diagnostics
warned about during the run, the final metrics and how to look at the run in TensorBoard."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .callbacks.records import finding_rules
from .datamodules.splits import ValidationSource
from .status import RunSummary


def trainability_findings(callbacks) -> dict:
    """Per finding (``records.finding_rules`` order): its rule, the ``worst`` sample (most layers; step,
    source, count, layers) and the ``final`` one, from every callback that keeps findings; and the
    ``messages`` the callbacks gave during the run."""
    keepers = [cb for cb in callbacks if getattr(cb, "findings", None) is not None]
    low = next((cb.low for cb in keepers if hasattr(cb, "low")), 0.05)
    high = next((cb.high for cb in keepers if hasattr(cb, "high")), 50.0)
    report = {name: {"rule": rule, "worst": None, "final": None} for name, rule in finding_rules(low, high).items()}
    messages = []
    for cb in keepers:
        for name, entry in cb.findings.worst.items():
            current = report[name]["worst"]
            if current is None or entry["count"] > current["count"]:
                report[name]["worst"] = entry
        for name, entry in cb.findings.final.items():
            current = report[name]["final"]
            if current is None or entry["step"] >= current["step"]:
                report[name]["final"] = entry
        messages.extend(cb.findings.messages)
    measured = {name for cb in keepers for name in cb.findings.final}
    return {"findings": {name: row for name, row in report.items() if name in measured},
            "messages": sorted(messages, key=lambda m: m["step"])}


def _layers(entry) -> str:
    if not entry or not entry["count"]:
        return "none"
    shown = ", ".join(entry["layers"][:4]) + (f" (+{entry['count'] - 4} more)" if entry["count"] > 4 else "")
    return f"{entry['count']} at step {entry['step']} ({entry['source']}): {shown}"


def print_trainability_report(callbacks, console: Console | None = None) -> dict:
    """Print the report (nothing when no diagnostic ran); returns :func:`trainability_findings`."""
    report = trainability_findings(callbacks)
    if not report["findings"]:
        return report
    console = console or Console()
    table = Table(title="trainability report", show_lines=False)
    table.add_column("finding")
    table.add_column("worst during the run", overflow="fold")
    table.add_column("at the end", overflow="fold")
    for name, row in report["findings"].items():
        table.add_row(f"{name} ({row['rule']})", _layers(row["worst"]), _layers(row["final"]))
    console.print(table)
    for message in report["messages"]:
        console.print(f"during the run: {message['message']}", highlight=False)
    return report


def print_run_end(summary: RunSummary, console: Console | None = None) -> None:
    """Final loss and accuracy of each split, the run folder and the TensorBoard command that shows it."""
    console = console or Console()
    table = Table(title=f"run {summary.status}", show_lines=False)
    for column in ("split", "loss", "accuracy"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for split in ("train", "val", "test"):
        loss, acc = getattr(summary, f"{split}_loss"), getattr(summary, f"{split}_acc")
        if loss is not None or acc is not None:
            name = "val (test set)" if split == "val" and summary.validation_source == ValidationSource.TEST else split
            table.add_row(name, "-" if loss is None else f"{loss:.4f}", "-" if acc is None else f"{acc:.2%}")
    console.print(table)
    if summary.verdict:
        outcome = f"test accuracy {summary.test_acc:.2%}" if summary.test_acc is not None else "no test accuracy"
        console.print(f"early verdict at step {summary.verdict_step}: {summary.verdict} ("
                      f"{'; '.join(summary.verdict_reasons or [])}); what happened: {summary.status} at step "
                      f"{summary.global_step}, {outcome}", highlight=False, soft_wrap=True)
    run_dir = summary.run_dir
    console.print(f"run folder: {run_dir}", highlight=False, soft_wrap=True)
    console.print(f"see it in TensorBoard: tensorboard --logdir {run_dir}", highlight=False, soft_wrap=True)
