"""Train the verdict's corpus, or score the early verdict on it.

    python -m deepplain.verdicts run --out results/verdict-corpus --parallel 2
    python -m deepplain.verdicts score --out results/verdict-corpus

``run`` trains every run of the corpus (``deepplain.verdicts.corpus``: about 180 runs, 11 MLP family variants
x 3 draws of depth and learning rate on MNIST, USPS, Fashion-MNIST and COIL-20, the 100-layer 300-unit nets on
USPS and COIL-20, conv nets on COIL-20) through the sweep runner, one folder per group under ``--out``
(finished runs are skipped and an interrupted one resumes: the same command continues, across sessions);
``--groups`` picks groups. ``score`` reads every finished run, labels it, gives the verdict its diagnostics.csv
recorded up to the verdict step, fits the loss-only baseline on the design groups (MNIST, USPS) and writes
``<out>/verdicts.md``: confusion tables, shares decided, accuracies with 95% intervals, per family, and the
compute ``--stop-if-fails`` would have saved.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import depth_rule, merge
from ..datamodules.paths import resolve_data_env
from ..errors import ConfigError
from ..inputs import OneLineParser, output_dir
from ..sweep import csv_list, exit_status, run_grid_stoppable
from .corpus import GROUPS, group_runs
from .scoring import score


def run_corpus(out: Path, groups: list[str], parallel: int, dry_run: bool) -> int:
    for name in groups:  # every run's flags as train.py checks them, before anything trains
        group = GROUPS[name]
        for run in group_runs(group):
            depth_rule(merge(run.train_options(group.dataset, group.epochs)))
    total = sum(len(group_runs(GROUPS[n])) for n in groups)
    if dry_run:
        for name in groups:
            group = GROUPS[name]
            for run in group_runs(group):
                print(f"{name}/{run.run_id}: python train.py {' '.join(run.train_flags(group.dataset, group.epochs))}")
        print(f"{total} runs")
        return 0
    output_dir(out)
    for name in groups:
        group = GROUPS[name]
        print(f"group {name}: {len(group_runs(group))} runs ({group.dataset}, {group.epochs} epochs)")
        run_grid_stoppable(group_runs(group), out / name, group.dataset, group.epochs, parallel)
    return 0


def main(argv=None) -> int:
    resolve_data_env()
    p = OneLineParser(prog="python -m deepplain.verdicts", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("command", choices=["run", "score"])
    p.add_argument("--out", required=True, help="the corpus folder (one sweep folder per group)")
    p.add_argument("--groups", type=csv_list(str), default=list(GROUPS), help=f"comma list of {','.join(GROUPS)}")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (run)")
    p.add_argument("--dry-run", action="store_true", help="run: check and list every run's train.py flags")
    args = p.parse_args(argv)

    def command() -> int:
        unknown = [g for g in args.groups if g not in GROUPS]
        if unknown:
            raise ConfigError(f"unknown groups {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
        if args.parallel < 1:
            raise ConfigError("--parallel must be positive")
        if args.command == "run":
            return run_corpus(Path(args.out), args.groups, args.parallel, args.dry_run)
        return score(Path(args.out), args.groups)
    return exit_status(command)


if __name__ == "__main__":
    sys.exit(main())
