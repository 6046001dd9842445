"""What the diagnostics measured, kept three ways: per statistic a depth x time record (drawn as
an image), one tidy table per run (``diagnostics.csv``), and the findings of the trainability
report with the worst state each reached during the run.

The rules of the findings live here, once: the report, the ``overview/`` scalars and the
warnings all read them.
"""
from __future__ import annotations

import csv
import math
import weakref
from pathlib import Path
from typing import Optional

import numpy as np

from .outputs import run_folder

VANISHED_BELOW = 0.05     # PlainNet (Oyedotun et al.): mean |a| below this is a vanished activation
EXPLODED_ABOVE = 50.0     # PlainNet: |a| above this is an exploded activation
DEAD_SHARE = 0.5          # a layer is "dead" when more than this share of its units never fire on the batch
ILL_CONDITIONED = 1e6     # representation kappa above this (and finite) is ill-conditioned
# A singular representation (kappa = inf) is logged as log10 kappa = 17: above any finite float64
# condition number (1 / eps = 4.5e15, log10 = 15.65), so it tops every chart instead of vanishing
# from it (TensorBoard drops inf).
SINGULAR_LOG10_KAPPA = 17.0


def finding_rules(low: float = VANISHED_BELOW, high: float = EXPLODED_ABOVE) -> dict[str, str]:
    """Each finding of the trainability report and its rule, in the report's order."""
    return {"vanished": f"mean |a| < {low:g}", "exploded": f"max |a| > {high:g}",
            "dead": f"> {DEAD_SHARE:.0%} of units never fire", "singular": "representation kappa = inf",
            "ill-conditioned": f"representation kappa > {ILL_CONDITIONED:.0e}".replace("e+0", "e"),
            "eval-only": "vanished or exploded in eval mode only, past the first epoch"}


def log10_kappa(kappa: float) -> float:
    """log10 of a condition number, with :data:`SINGULAR_LOG10_KAPPA` for a singular one; NaN stays NaN."""
    if math.isnan(kappa):
        return math.nan
    if math.isinf(kappa):
        return SINGULAR_LOG10_KAPPA
    return math.log10(max(kappa, 1.0))


class DepthTimeRecord:
    """Per statistic, the per-layer values of every sample: the data of a depth x time image.

    ``columns[stat]`` is a list of ``(step, {layer: value}, note, fresh)``: ``fresh`` is the set of
    layers measured at that sample (None: all of them); the others hold a value measured earlier
    (drawn faded) or are absent (drawn blank).
    """

    MAX_COLUMNS = 400  # beyond this, every other column is dropped (the table keeps every sample)

    def __init__(self):
        self.columns: dict[str, list[tuple]] = {}

    def add(self, stat: str, step: int, values: dict[str, float], note: str = "",
            fresh: Optional[set] = None) -> None:
        columns = self.columns.setdefault(stat, [])
        columns.append((int(step), dict(values), note, fresh))
        if len(columns) > self.MAX_COLUMNS:  # a long run sampled often: memory and image width stay bounded
            columns[:] = columns[:-1:2] + columns[-1:]

    def matrix(self, stat: str):
        """(layers in order of first appearance, steps, layers x steps values (NaN where not measured),
        layers x steps mask of the values measured at that sample, notes per column)."""
        columns = self.columns.get(stat, [])
        layers: dict[str, None] = {}
        for _, values, _, _ in columns:
            layers.update(dict.fromkeys(values))
        names = list(layers)
        index = {name: i for i, name in enumerate(names)}
        data = np.full((len(names), len(columns)), np.nan)
        measured = np.zeros(data.shape, dtype=bool)
        for j, (_, values, _, fresh) in enumerate(columns):
            for name, value in values.items():
                data[index[name], j] = value
                measured[index[name], j] = fresh is None or name in fresh
        return names, [c[0] for c in columns], data, measured, [c[2] for c in columns]

    def __len__(self) -> int:
        return max((len(c) for c in self.columns.values()), default=0)


class FindingsLog:
    """Per finding, the worst sample (most layers) and the latest one, and what was said during the run.

    An entry is ``{"step", "source", "count", "layers"}``; ``source`` is "training batch" or "probe".
    """

    def __init__(self):
        self.worst: dict[str, dict] = {}
        self.final: dict[str, dict] = {}
        self.messages: list[dict] = []

    def update(self, step: int, source: str, found: dict[str, list[str]]) -> None:
        for name, layers in found.items():
            entry = {"step": int(step), "source": source, "count": len(layers), "layers": list(layers)}
            self.final[name] = entry
            if len(layers) > self.worst.get(name, {"count": 0})["count"]:
                self.worst[name] = entry

    def say(self, step: int, text: str) -> None:
        self.messages.append({"step": int(step), "message": text})

    def state_dict(self) -> dict:
        return {"worst": self.worst, "final": self.final, "messages": self.messages}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        self.worst, self.final = dict(state.get("worst", {})), dict(state.get("final", {}))
        self.messages = list(state.get("messages", []))


class DiagnosticsTable:
    """The run's ``diagnostics.csv`` in the run folder (``outputs.run_folder``): one row per value, columns
    :data:`COLUMNS`, appended and flushed as each sample is taken (an interrupted run keeps what
    it measured). Shared by every callback of a trainer, rank zero only.

    A run that resumes at step s first drops the rows of steps >= s (they are measured again) and any
    row a kill cut mid-write.
    """

    FILENAME = "diagnostics.csv"
    COLUMNS = ("step", "callback", "statistic", "layer", "value")
    _of_trainer: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _keep_of_trainer: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, path: Path, start_step: int, keep_until: int = -1):
        self.path = path
        self.keep_until = keep_until  # rows of steps up to this one are also kept in memory (the verdict reads them)
        self._early: list[tuple] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                kept = [row for row in csv.DictReader(handle)
                        if _complete(row) and _step(row) is not None and _step(row) < start_step]
        self._file = open(path, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(self.COLUMNS)
        self._writer.writerows([row[c] for c in self.COLUMNS] for row in kept)
        self._file.flush()
        self._early = [(_step(row), row["callback"], row["statistic"], row["layer"], float(row["value"]))
                       for row in kept if _step(row) <= keep_until]

    @classmethod
    def shared(cls, trainer) -> Optional["DiagnosticsTable"]:
        if getattr(trainer, "global_rank", 0) != 0:
            return None
        table = cls._of_trainer.get(trainer)
        if table is None:  # the folder is looked up once per fit, not at every sample
            folder = run_folder(trainer)
            if folder is not None:
                table = cls._of_trainer[trainer] = cls(folder / cls.FILENAME, int(trainer.global_step),
                                                       cls._keep_of_trainer.get(trainer, -1))
        return table

    @classmethod
    def keep_early(cls, trainer, until: int) -> None:
        """Keep the rows of steps up to ``until`` in memory as well (the early verdict reads them, also those a
        resumed run wrote before it stopped)."""
        cls._keep_of_trainer[trainer] = until
        table = cls.shared(trainer)
        if table is not None:
            table.keep_until = max(table.keep_until, until)

    def early_rows(self) -> list[tuple]:
        """``(step, callback, statistic, layer, value)`` of every row up to ``keep_until``."""
        return list(self._early)

    def write(self, step: int, callback: str, statistic: str, values: dict[str, float]) -> None:
        self._writer.writerows((int(step), callback, statistic, layer, repr(float(value)))
                               for layer, value in values.items())
        self._file.flush()
        if step <= self.keep_until:
            self._early.extend((int(step), callback, statistic, layer, float(value)) for layer, value in values.items())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    @classmethod
    def close_for(cls, trainer) -> None:
        table = cls._of_trainer.pop(trainer, None)
        if table is not None:
            table.close()


def _complete(row: dict) -> bool:
    """A whole row: every column there and its value a number (a row cut by a kill mid-write is not)."""
    if any(row.get(column) in (None, "") for column in DiagnosticsTable.COLUMNS) or None in row:
        return False
    try:
        float(row["value"])
    except ValueError:
        return False
    return True


def _step(row: dict) -> Optional[int]:
    try:
        return int(row.get("step"))
    except (TypeError, ValueError):
        return None
