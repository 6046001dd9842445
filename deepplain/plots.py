"""Figures from a sweep's results.csv: accuracy and error against depth, per family.

    python -m deepplain.plots --csv sweeps/fmnist/results.csv [more.csv ...] --out docs/figures/fmnist

writes ``accuracy_vs_depth.png`` (mean test accuracy over seeds with a +-1 std band: the VAN
paper's Fig. 1/2) and ``error_vs_depth.png`` (train and test error: the PlainNet paper's Fig. 1),
and prints a markdown table of mean test accuracy per family and depth.
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from .errors import ConfigError
from .exits import EXIT_BAD_INPUT
from .inputs import OneLineParser, output_dir, read_results_csv
from .rundir import RESULTS_FILE
from .status import RunStatus


def label(row: dict, with_epochs: bool = False) -> str:
    name = f"{row['model']} ({row['variant']})" if row.get("variant") else row["model"]
    return f"{name}, {row['epochs_done']} ep" if with_epochs else name


def aggregate(rows: list[dict], metric: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """label -> depth -> (mean, std, n) of ``metric`` over completed runs (other runs are left out).

    When the runs trained for different numbers of epochs, each label says its epochs, so that
    budgets are never averaged together or compared unmarked."""
    done = [r for r in rows if r.get("status") == RunStatus.COMPLETED and r.get(metric) not in (None, "")]
    with_epochs = len({str(r.get("epochs_done")) for r in done}) > 1
    values = defaultdict(lambda: defaultdict(list))
    for r in done:
        values[label(r, with_epochs)][int(r["depth"])].append(float(r[metric]))
    return {lab: {d: (statistics.fmean(v), statistics.pstdev(v) if len(v) > 1 else 0.0, len(v))
                  for d, v in sorted(by_depth.items())} for lab, by_depth in values.items()}


def _plot_curves(ax, table, transform=lambda x: x):
    for lab, by_depth in sorted(table.items()):
        depths = list(by_depth)
        means = [transform(by_depth[d][0]) for d in depths]
        stds = [by_depth[d][1] for d in depths]
        line, = ax.plot(depths, means, marker="o", markersize=3, label=lab)
        if len(depths) == 1:  # a band over one depth has no width: show the spread as an error bar
            ax.errorbar(depths, means, yerr=stds, color=line.get_color(), capsize=3, linewidth=1)
        ax.fill_between(depths, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def plot_sweep(rows: list[dict], out: Path, title: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    test = aggregate(rows, "test_acc")
    if not test:
        raise ValueError("no completed runs with test accuracy in the CSV")
    fig = Figure(figsize=(6, 4), dpi=120)
    ax = fig.add_subplot()
    _plot_curves(ax, test)
    ax.set_xlabel("depth")
    ax.set_ylabel("test accuracy (mean over seeds, band: +-1 std)")
    ax.set_title(title or "test accuracy against depth")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_depth.png")
    fig.savefig(paths[-1])

    fig = Figure(figsize=(10, 4), dpi=120)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, name in ((axes[0], "train_acc", "train"), (axes[1], "test_acc", "test")):
        _plot_curves(ax, aggregate(rows, metric), transform=lambda acc: 1.0 - acc)
        ax.set_xlabel("depth")
        ax.set_title(f"{name} error")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("error (1 - accuracy)")
    axes[1].legend(fontsize=8)
    fig.suptitle(title or "error against depth")
    fig.tight_layout()
    paths.append(out / "error_vs_depth.png")
    fig.savefig(paths[-1])
    return paths


def markdown_table(rows: list[dict], metric: str = "test_acc") -> str:
    table = aggregate(rows, metric)
    depths = sorted({d for by_depth in table.values() for d in by_depth})
    lines = ["| family | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for lab, by_depth in sorted(table.items()):
        cells = []
        for d in depths:
            if d in by_depth:
                mean, std, n = by_depth[d]
                cells.append(f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if n > 1 else ""))
            else:
                cells.append("–")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_rows(paths) -> list[dict]:
    """The rows of one or more results.csv files; the same file twice, or a run id in two rows, is refused
    (its runs would be averaged as if they were seeds)."""
    resolved = [Path(p).resolve() for p in paths]
    twice = sorted({str(p) for p in resolved if resolved.count(p) > 1})
    if twice:
        raise ConfigError(f"--csv names {', '.join(twice)} more than once")
    rows, where = [], {}
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"{path} does not exist (run python -m deepplain.sweep first)")
        for row in read_results_csv(path):
            key = (row["run_id"], row.get("dataset", ""))
            if key in where:
                raise ConfigError(f"run {row['run_id']} ({row.get('dataset') or 'no dataset'}) is in {where[key]} and "
                                  f"{path}; combine CSVs of different runs only")
            where[key] = path
            rows.append(row)
    return rows


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m deepplain.plots", description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, nargs="+", help=f"one or more sweeps' {RESULTS_FILE} (rows are combined)")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    try:
        rows = load_rows(args.csv)
        out = output_dir(args.out)
        paths = plot_sweep(rows, out, args.title)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(markdown_table(rows))
    for p_ in paths:
        print(f"wrote {p_}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
