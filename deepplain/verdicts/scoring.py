"""Scoring the early verdict on the corpus: each finished run's label (``corpus.label``), the verdict its
``diagnostics.csv`` gives at its verdict step (``verdict_rules.decide``, the function a live run calls), and the
loss-only baseline (a threshold on the training loss at the verdict step over the loss at step 0, with an unsure
band, fitted on the design groups), compared on the scoring groups.
"""
from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..callbacks.records import DiagnosticsTable
from ..callbacks.verdict_rules import (CODE_STATISTIC, THRESHOLDS, VERDICT_CALLBACK, Samples, Verdict,
                                        decide, loss_ratio)
from ..datamodules import get_datamodule
from ..inputs import read_results_csv
from ..rundir import SweepFolder
from .corpus import CEILINGS, DESIGN, GROUPS, label

WORDS = ("trains", "fails", "unsure")
MIN_DECIDED = 0.8  # the goal for the share of runs decided; the baseline is fitted to reach it


@dataclass
class Record:
    """One run of the corpus as scoring sees it."""
    group: str
    run_id: str
    family: str
    variant: str
    depth: int
    status: str
    test_acc: Optional[float]
    label: Optional[str]
    global_step: int
    wall_seconds: float
    chance: float = 0.0
    verdict_step: Optional[int] = None
    rows: list = field(default_factory=list)  # (step, callback, statistic, layer, value) up to the verdict step
    verdict: Optional[Verdict] = None

    @property
    def design(self) -> bool:
        return self.group in DESIGN

    @functools.cached_property
    def samples(self) -> Samples:
        return Samples(self.rows)

    @functools.cached_property
    def loss_ratio(self) -> Optional[float]:
        return loss_ratio(self.samples, self.verdict_step)


def chance(dataset: str) -> float:
    """The majority class's share of the test split."""
    datamodule = get_datamodule(dataset)
    datamodule.setup("test")
    labels = datamodule.tensors_on("test", torch.device("cpu"))[1]
    return float(torch.bincount(labels).max()) / labels.numel()


def read_rows(path: Path) -> tuple[Optional[int], list]:
    """The verdict step (the step of the verdict's code row) and every row up to it: the rows the verdict read
    are written before its code row, so the file is read no further."""
    if not path.is_file():
        return None, []
    rows = []
    with path.open(newline="") as handle:
        for r in csv.DictReader(handle):
            row = (int(r["step"]), r["callback"], r["statistic"], r["layer"], float(r["value"]))
            rows.append(row)
            if row[1] == VERDICT_CALLBACK and row[2] == CODE_STATISTIC:
                return row[0], [r for r in rows if r[0] <= row[0]]
    return None, []


def collect(out: Path, groups: list[str]) -> list[Record]:
    records, chances = [], {}
    for name in groups:
        group = GROUPS[name]
        path = SweepFolder(out / name).results
        if not path.is_file():
            continue
        if group.dataset not in chances:
            chances[group.dataset] = chance(group.dataset)
        ceiling = CEILINGS[(group.dataset, group.form)][0]
        for r in read_results_csv(path):
            acc = float(r["test_acc"]) if r.get("test_acc") not in (None, "") else None
            record = Record(name, r["run_id"], r["model"], r["variant"], int(r["depth"]), r["status"], acc,
                            label(r["status"], acc, chances[group.dataset], ceiling), int(r.get("global_step") or 0),
                            float(r.get("wall_seconds") or 0.0), chances[group.dataset])
            if record.label is None:
                continue
            if r.get("run_dir"):
                record.verdict_step, record.rows = read_rows(Path(r["run_dir"]) / DiagnosticsTable.FILENAME)
            if record.verdict_step is not None:
                record.verdict = decide(record.samples, record.verdict_step)
            records.append(record)
    return records


# -- the loss-only baseline ---------------------------------------------------------------------------------
def loss_word(ratio: Optional[float], trains_below: float, fails_above: float) -> str:
    if ratio is None:
        return "unsure"
    return "trains" if ratio <= trains_below else "fails" if ratio > fails_above else "unsure"


def most_right(candidates, words_of, records: list[Record]):
    """The candidate whose words (``words_of(candidate)``: one per record) are right most often among the decided
    ones while deciding at least :data:`MIN_DECIDED` of the runs (ties: more decided); None when none decides
    enough. The criterion both fits use, on the design part."""
    best, best_key = None, (-1.0, -1.0)
    for candidate in candidates:
        decided = [(w, r.label) for w, r in zip(words_of(candidate), records) if w != "unsure"]
        if not records or len(decided) < MIN_DECIDED * len(records):
            continue
        key = (sum(w == lab for w, lab in decided) / len(decided), len(decided))
        if key > best_key:
            best, best_key = candidate, key
    return best


def fit_loss_rule(records: list[Record]) -> tuple[float, float]:
    """``(trains_below, fails_above)`` of the loss-only baseline (:func:`most_right`), from the runs' own ratios."""
    ratios = sorted({round(r.loss_ratio, 4) for r in records if r.loss_ratio is not None})
    pairs = [(low, high) for i, low in enumerate(ratios) for high in ratios[i:]]
    best = most_right(pairs, lambda pair: [loss_word(r.loss_ratio, *pair) for r in records], records)
    return best or (0.5, 0.5)


def fit_verdict_loss(records: list[Record]) -> float:
    """The verdict's ``loss_learning`` by the baseline's criterion (:func:`most_right`); the rules' other numbers
    stay as they are."""
    values = sorted({round(r.loss_ratio, 2) for r in records if r.loss_ratio is not None})
    best = most_right(values, lambda value: [decide(r.samples, r.verdict_step, {"loss_learning": value}).word
                                             for r in records], records)
    return THRESHOLDS["loss_learning"].value if best is None else best


# -- tables ---------------------------------------------------------------------------------------------------
def wilson(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a share ``right / n``."""
    if n == 0:
        return math.nan, math.nan
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def score_line(pairs: list[tuple[str, str]]) -> dict:
    """pairs (word, label) -> counts, share decided, accuracy of the decided and its interval."""
    decided = [(w, lab) for w, lab in pairs if w != "unsure"]
    right = sum(w == lab for w, lab in decided)
    low, high = wilson(right, len(decided))
    dlow, dhigh = wilson(len(decided), len(pairs))
    return {"n": len(pairs), "decided": len(decided), "right": right,
            "share_decided": len(decided) / len(pairs) if pairs else math.nan, "decided_ci": (dlow, dhigh),
            "accuracy": right / len(decided) if decided else math.nan, "accuracy_ci": (low, high)}


def confusion(pairs: list[tuple[str, str]]) -> str:
    lines = ["| verdict \\ label | trains | fails |", "|---|---|---|"]
    for word in WORDS:
        lines.append(f"| {word} | {sum(1 for w, lab in pairs if w == word and lab == 'trains')} | "
                     f"{sum(1 for w, lab in pairs if w == word and lab == 'fails')} |")
    return "\n".join(lines)


def describe(s: dict) -> str:
    return (f"{s['decided']} of {s['n']} decided ({s['share_decided']:.0%}, 95% CI {s['decided_ci'][0]:.0%}-"
            f"{s['decided_ci'][1]:.0%}); {s['right']} of {s['decided']} right ({s['accuracy']:.1%}, 95% CI "
            f"{s['accuracy_ci'][0]:.1%}-{s['accuracy_ci'][1]:.1%})")


def family_of(r: Record) -> str:
    name = r.variant.rsplit("-lr", 1)[0]  # "bn-lrelu-lr0.01" -> "bn-lrelu"
    return name if r.family == "plain" else r.family + ("-conv" if "conv" in name else "")


def report(records: list[Record]) -> str:
    ended = [r for r in records if r.verdict is None]
    judged = [r for r in records if r.verdict is not None]
    design, scoring = [r for r in judged if r.design], [r for r in judged if not r.design]
    low, high = fit_loss_rule(design)
    fitted = fit_verdict_loss(design)
    out = [f"# The early verdict on the corpus ({len(records)} labelled runs)", "",
           f"Runs: {len(records)}, of which {sum(r.label == 'fails' for r in records)} fail "
           f"({sum(r.label == 'fails' for r in records) / max(1, len(records)):.0%}); {len(ended)} ended before their "
           f"verdict step (diverged), {len(judged)} reached it: design part (MNIST, USPS) {len(design)}, scoring part "
           f"{len(scoring)}.", "",
           f"Loss-only baseline fitted on the design part: trains if loss(v)/loss(0) <= {low:g}, fails if > {high:g}, "
           "unsure between.", "",
           f"The verdict's loss threshold (loss_learning) in use: {THRESHOLDS['loss_learning'].value:g}; the same fit "
           f"on the design part gives {fitted:g}.", ""]
    out += ["| group | part | runs | fail | diverged before the verdict | chance | ceiling | fails below |",
            "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r.group for r in records):
        rows, group = [r for r in records if r.group == name], GROUPS[name]
        ceiling = CEILINGS[(group.dataset, group.form)][0]
        out.append(f"| {name} | {'design' if name in DESIGN else 'scoring'} | {len(rows)} | "
                   f"{sum(r.label == 'fails' for r in rows)} | {sum(r.verdict is None for r in rows)} | "
                   f"{rows[0].chance:.2%} | {ceiling:.2%} | {(rows[0].chance + ceiling) / 2:.2%} |")
    out.append("")
    rules = {"verdict": lambda r: r.verdict.word, "loss only": lambda r: loss_word(r.loss_ratio, low, high)}
    for part, rows in (("design", design), ("scoring", scoring)):
        for name, rule in rules.items():
            pairs = [(rule(r), r.label) for r in rows]
            out += [f"## {name}, {part} part", "", confusion(pairs), "", describe(score_line(pairs)), ""]
    out += ["## Per family, scoring part (verdict | loss only)", "",
            "| family | runs | fail | verdict: decided, right | loss only: decided, right |", "|---|---|---|---|---|"]
    for family in sorted({family_of(r) for r in scoring}):
        rows = [r for r in scoring if family_of(r) == family]
        cells = []
        for rule in rules.values():
            s = score_line([(rule(r), r.label) for r in rows])
            cells.append(f"{s['decided']}, {s['right']}")
        out.append(f"| {family} | {len(rows)} | {sum(r.label == 'fails' for r in rows)} | {cells[0]} | {cells[1]} |")
    wrong = [r for r in scoring if r.verdict.word not in ("unsure", r.label)]
    out += ["", f"## The wrong verdicts of the scoring part ({len(wrong)})", ""]
    out += [f"- {r.group}/{r.run_id}: said {r.verdict.word} at step {r.verdict_step} ({'; '.join(r.verdict.reasons)}); "
            f"ended {r.status}" + (f" at test accuracy {r.test_acc:.1%}" if r.test_acc is not None else "")
            for r in wrong]
    out += ["", "## What --stop-if-fails saves", ""] + saved(judged)
    return "\n".join(out) + "\n"


def saved(records: list[Record]) -> list[str]:
    """The share of the failing runs' compute after their verdict step, on the runs the verdict stops; and every
    run that trains and would have been stopped."""
    failing = [r for r in records if r.label == "fails"]
    total = sum(r.wall_seconds for r in failing)
    stopped = [r for r in failing if r.verdict.word == "fails" and r.global_step]
    spared = sum(r.wall_seconds * max(0, r.global_step - r.verdict_step - 1) / r.global_step for r in stopped)
    wrong = [r for r in records if r.label == "trains" and r.verdict.word == "fails"]
    lines = [f"Failing runs that reached their verdict step: {len(failing)}, {total / 60:.1f} core-minutes; stopped at "
             f"the verdict: {len(stopped)}; saved: {spared / 60:.1f} core-minutes ({spared / max(total, 1e-9):.0%} of "
             "their compute).", "", f"Runs that train and would have been stopped: {len(wrong)}."]
    for r in wrong:
        lines.append(f"- {r.group}/{r.run_id} (test accuracy {r.test_acc:.1%}): {r.verdict.line()}")
    return lines


def score(out: Path, groups: list[str]) -> int:
    records = collect(out, groups)
    if not records:
        print(f"no finished runs in {out}")
        return 1
    text = report(records)
    (out / "verdicts.md").write_text(text)
    print(text)
    print(f"wrote {out / 'verdicts.md'}; the verdict's thresholds: "
          + ", ".join(f"{k} {t.value:g}" for k, t in THRESHOLDS.items()))
    return 0
