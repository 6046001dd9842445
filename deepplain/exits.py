"""The exit status of train.py and of every tool (sweep, experiments, comparisons, plots, curves, verdicts),
defined once: the README's table and ``train.py --help`` say the same."""
from __future__ import annotations

from .status import RunStatus

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_IO, EXIT_STOPPED_EARLY = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED, EXIT_PREEMPTED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as a shell reports them
MEANING = {EXIT_OK: "completed", EXIT_BAD_INPUT: "bad input", EXIT_DIVERGED: "diverged", EXIT_IO: "I/O failure",
           EXIT_STOPPED_EARLY: "stopped early (--stop-if-fails)", EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
           EXIT_PREEMPTED: "preempted (SIGTERM)"}  # EXIT_BUG: a traceback says it
EXIT_BY_STATUS = {RunStatus.COMPLETED: EXIT_OK, RunStatus.INTERRUPTED: EXIT_INTERRUPTED,
                  RunStatus.PREEMPTED: EXIT_PREEMPTED, RunStatus.DIVERGED: EXIT_DIVERGED,
                  RunStatus.STOPPED_EARLY: EXIT_STOPPED_EARLY}


def describe_exits() -> str:
    """One line for ``--help``: ``0 completed, 2 bad input, ...``."""
    return ", ".join(f"{code} {words}" for code, words in MEANING.items())
