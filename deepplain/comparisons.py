"""Two comparisons from the papers' folder, on data that is here: skips at 164 layers, and the coursework's VGG38.

    python -m deepplain.comparisons skips --dataset mnist --epochs 6 --out results/skips-164-mnist \\
        -- --limit-train-batches 40 --limit-val-batches 10 --diag-every 40
    python -m deepplain.comparisons coursework --dataset coil20 --epochs 50 --out results/coursework-coil20 \\
        -- --diag-every 45

``skips`` (the blog post ``003_*``): PlainNet, ResNet and ResNeXt with the same depth (``--depth``,
default 164) on one recipe -- SGD 0.1, momentum 0.9, weight decay 1e-4, batch 128, the rate divided by
10 at 50% and 75% of the epochs -- and the PlainNet once more at lr 0.01 (whether it fails only by
diverging at 0.1). The ResNet is our pre-activation ResNet (bottleneck blocks at 164),
the plain net the same layers with every skip path removed (``--model plain --layout resnet``, with
the ResNet's He-normal init), the ResNeXt the same network with grouped 3x3 convs (``--cardinality 8
--bottleneck-width 4 --width 1``: 8 groups of 4 channels where the ResNet has 16 channels, the
ResNeXt paper's trade of width for cardinality at about the ResNet's cost, 2.04M against 1.70M
parameters). ``coursework`` (the coursework report ``004_*``, its Table 1): the seven rows, each from
its preset (``vgg08-cifar100``, ``vgg38-cifar100``, ...; the two lr 1e-2 rows with ``--lr 0.01``) on
the dataset given instead of CIFAR-100, which is not here.

Both run every configuration through the sweep runner (finished runs are skipped, an interrupted one
resumes: the same command continues), pass the train.py flags after ``--`` to every run, and write
``<out>/comparison.md`` (ours beside the papers') and ``<out>/figures/``: for ``skips`` the depth
profile of each net's representation condition number and gradient norm at its first and last
samples; for ``coursework`` each row's gradient flow (mean |gradient| per layer, the report's Figs.
2, 3 and 5) at the first, middle and last samples. Every figure is read from the runs'
``diagnostics.csv``, which is why ``--diag-every`` belongs after ``--``: with it the first and last
samples measure every layer (without it, the condition probe's time plan may leave layers out of a
short run, or measure none).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .callbacks import ConditionNumberProbe, GradientFlowMonitor
from .callbacks.records import DiagnosticsTable
from .config import depth_rule, merge
from .datamodules.paths import resolve_data_env
from .errors import ConfigError
from .inputs import OneLineParser, output_dir
from .presets import PRESETS
from .schema import flag
from .status import FINISHED, RunStatus
from .sweep import Run, csv_list, exit_status, options_of, run_grid_stoppable, split_at_double_dash

CONDITION, GRAD_FLOW = ConditionNumberProbe.prefix, GradientFlowMonitor.prefix  # their diagnostics.csv names
SHORTCUT = ".shortcut"  # a ResidualBlock's projection, in its layers' names

# -- what each comparison trains ----------------------------------------------------------------------
SKIPS_RECIPE = dict(arch="conv", optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, batch_size=128,
                    schedule="multistep", milestones=[0.5, 0.75])
SKIPS = {  # net -> (family, its options)
    "PlainNet": ("plain", dict(layout="resnet", init="he-normal")),
    "ResNet": ("resnet", {}),
    "ResNeXt": ("resnext", dict(width=1, cardinality=8, bottleneck_width=4)),
    # the plain net again at a tenth of the rate: whether it fails only by diverging at 0.1, or at any rate
    "PlainNet, lr 0.01": ("plain", dict(layout="resnet", init="he-normal", lr=0.01)),
}
# The coursework report's Table 1 (CIFAR-100): row -> (preset, lr or None for the preset's, paper's
# parameters, train acc %, val acc %)
COURSEWORK = {
    "VGG08": ("vgg08-cifar100", None, "60K", 51.59, 46.84),
    "VGG38": ("vgg38-cifar100", None, "336K", 0.01, 0.01),
    "VGG38 BN": ("vgg38-bn-cifar100", None, "339K", 56.15, 48.04),
    "VGG38 RC": ("vgg38-rc-cifar100", None, "336K", 61.52, 52.32),
    "VGG38 BN + RC": ("vgg38-bn-rc-cifar100", None, "339K", 62.99, 53.76),
    "VGG38 BN, lr 1e-2": ("vgg38-bn-cifar100", 1e-2, "339K", 52.28, 46.72),
    "VGG38 BN + RC, lr 1e-2": ("vgg38-bn-rc-cifar100", 1e-2, "339K", 82.72, 61.44),
}
SET_BY_COMPARISON = {"skips": {"arch", "layout", "init", "width", "cardinality", "bottleneck_width", "norm",
                               "activation", "block", "lr"},
                     "coursework": {"preset", "arch", "layout", "norm", "activation", "negative_slope", "lr", "init",
                                    "width"}}


def slug(name: str) -> str:
    return name.lower().replace(" + ", "-").replace(", ", "-").replace(" ", "-")


def skips_runs(depth: int, extra: dict) -> dict[str, Run]:
    return {name: Run(family, depth, 0, slug(name), {**SKIPS_RECIPE, **options, **extra})
            for name, (family, options) in SKIPS.items()}


def coursework_runs(extra: dict) -> dict[str, Run]:
    runs = {}
    for name, (preset, lr, *_) in COURSEWORK.items():
        spec = PRESETS[preset]
        options = {"preset": preset, **({"lr": lr} if lr is not None else {})}
        runs[name] = Run(spec["model"], spec["depth"], 0, slug(name), {**options, **extra})
    return runs


# -- what the runs measured ---------------------------------------------------------------------------
def read_samples(run_dir: Path | str | None, callback: str, statistic: str) -> dict[int, dict[str, float]]:
    """step -> {layer: value} of one statistic in a run's ``diagnostics.csv``, layers in the file's (the
    model's) order; empty for a run without a folder or a table yet."""
    samples: dict[int, dict[str, float]] = {}
    path = Path(run_dir) / DiagnosticsTable.FILENAME if run_dir else None
    if path is None or not path.is_file():
        return samples
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["callback"] == callback and row["statistic"] == statistic:
                samples.setdefault(int(row["step"]), {})[row["layer"]] = float(row["value"])
    return samples


def first_middle_last(samples: dict) -> list[int]:
    steps = sorted(samples)
    return sorted({steps[0], steps[len(steps) // 2], steps[-1]}) if steps else []


def _percent(value) -> str:
    return f"{100 * float(value):.2f}" if value not in (None, "") else "-"


def _status(r: dict) -> str:
    status = r.get("status") or "missing"
    if status == RunStatus.COMPLETED:
        return ""
    return f" ({status})" if r.get("global_step") in (None, "") else f" ({status} at step {r['global_step']})"


def infinite_layers(kappa: dict[str, float]) -> int:
    return sum(1 for v in kappa.values() if not math.isfinite(v))


def skips_table(rows: dict[str, dict]) -> str:
    lines = ["| net | parameters | train acc % (last epoch) | val acc % | test acc % | layers with kappa = inf, "
             "first / last sample | largest finite log10 kappa, first / last | gradient norm, first layer / last "
             "layer at the first sample |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        kappa = read_samples(r.get("run_dir"), CONDITION, "kappa")
        grads = read_samples(r.get("run_dir"), GRAD_FLOW, "norm")
        ends = sorted({min(kappa), max(kappa)}) if kappa else []
        only = f" (step {ends[0]} only)" if len(ends) == 1 else ""  # e.g. a run that diverged before its 2nd
        inf = " / ".join(f"{infinite_layers(kappa[s])} of {len(kappa[s])}" for s in ends) + only if ends else "-"
        finite = [max((math.log10(v) for v in kappa[s].values() if math.isfinite(v) and v > 0), default=math.nan)
                  for s in ends]
        grad = "-"
        if grads:
            first = list(grads[min(grads)].values())
            grad = f"{first[0]:.3g} / {first[-1]:.3g}"
        lines.append(f"| {name} | {_params(r)} | {_percent(r.get('train_acc'))}{_status(r)} | "
                     f"{_percent(r.get('val_acc'))} | {_percent(r.get('test_acc'))} | {inf} | "
                     f"{' / '.join(f'{v:.1f}' for v in finite) or '-'} | {grad} |")
    return "\n".join(lines)


def coursework_table(rows: dict[str, dict]) -> str:
    lines = ["| row | parameters (here / report, CIFAR-100) | train acc % (ours) | val acc % (ours) | "
             "test acc % (ours) | train acc % (report) | val acc % (report) |", "|---|---|---|---|---|---|---|"]
    for name, (_, _, params, train, val) in COURSEWORK.items():
        r = rows[name]
        lines.append(f"| {name} | {_params(r)} / {params} | {_percent(r.get('train_acc'))}{_status(r)} | "
                     f"{_percent(r.get('val_acc'))} | {_percent(r.get('test_acc'))} | {train:.2f} | {val:.2f} |")
    return "\n".join(lines)


def _params(r: dict) -> str:
    count = r.get("parameters")
    return f"{int(count) / 1e3:,.0f}K" if count not in (None, "") else "-"


def skips_figure(rows: dict[str, dict], out: Path) -> Path:
    fig = Figure(figsize=(11, 4), dpi=120)
    axes = fig.subplots(1, 2)
    for (name, r), color in zip(rows.items(), ("tab:red", "tab:blue", "tab:green", "tab:orange")):
        for ax, (callback, statistic) in zip(axes, ((CONDITION, "kappa"), (GRAD_FLOW, "norm"))):
            samples = read_samples(r.get("run_dir"), callback, statistic)
            if not samples:
                continue
            steps = sorted(samples)
            shown_steps = [(steps[0], "--"), (steps[-1], "-")] if len(steps) > 1 else [(steps[0], "-")]
            for step, style in shown_steps:
                # the skips' 1x1 projections have no counterpart in the plain net: left out, so layer i is
                # the same conv in every net
                values = np.asarray([v for layer, v in samples[step].items() if SHORTCUT not in layer], dtype=float)
                shown = np.where(np.isfinite(values), values, np.nan)
                ax.plot(np.arange(1, len(values) + 1), shown, style, color=color, lw=1,
                        label=f"{name}, step {step}")
                inf = np.flatnonzero(~np.isfinite(values))
                if inf.size:  # an infinite kappa has no place on a log axis: marked along the top
                    ax.plot(inf + 1, np.full(inf.size, np.nanmax(shown) if np.isfinite(shown).any() else 1.0),
                            "^", color=color, ms=3)
    axes[0].set_title("condition number of each layer's representation\n(^ along the top: infinite)")
    axes[1].set_title("gradient norm of each layer's weights\n(skip projections left out)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("layer (input to output)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "kappa-and-gradient-by-depth.png"
    fig.savefig(path)
    return path


def coursework_figure(rows: dict[str, dict], out: Path) -> Path:
    fig = Figure(figsize=(14, 6.5), dpi=110)
    axes = fig.subplots(2, 4).flatten()
    for ax, (name, r) in zip(axes, rows.items()):
        samples = read_samples(r.get("run_dir"), GRAD_FLOW, "mean_abs")
        for step in first_middle_last(samples):
            values = np.asarray(list(samples[step].values()), dtype=float)
            ax.plot(np.arange(1, len(values) + 1), np.where(values > 0, values, np.nan), label=f"step {step}")
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        if samples:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("mean |gradient| of the weights")
    axes[-1].set_visible(False)
    fig.tight_layout()
    path = out / "gradient-flow.png"
    fig.savefig(path)
    return path


# -- the command --------------------------------------------------------------------------------------
def check(args, runs: dict[str, Run], extra: dict) -> None:
    """Everything that can be wrong, before anything trains: the numbers, options after -- that the comparison
    sets itself, and every run's options as train.py checks them (without reading data)."""
    if args.epochs < 1 or args.parallel < 1:
        raise ConfigError("--epochs and --parallel must be positive")
    taken = sorted(flag(name) for name in set(extra) & SET_BY_COMPARISON[args.comparison])
    if taken:
        raise ConfigError(f"{', '.join(taken)} after -- would change what the comparison compares; its rows set them")
    for run in runs.values():
        depth_rule(merge(run.train_options(args.dataset, args.epochs)))
    if not args.dry_run:
        output_dir(args.out)  # last: bad flags leave nothing behind


def main(argv=None) -> int:
    resolve_data_env()
    p = OneLineParser(prog="python -m deepplain.comparisons", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("comparison", choices=["skips", "coursework"])
    p.add_argument("--dataset", required=True, help="e.g. mnist (skips), coil20 (coursework, at 32x32)")
    p.add_argument("--epochs", type=int, required=True, help="the budget of every run")
    p.add_argument("--depth", type=int, default=164, help="skips: the depth of all three nets (default %(default)s)")
    p.add_argument("--out", required=True)
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--gpus", type=csv_list(str), default=None, help="one GPU per concurrent run, e.g. 0,1")
    p.add_argument("--dry-run", action="store_true", help="check everything and print each run's train.py flags; "
                                                          "train nothing")
    own, extra = split_at_double_dash(argv)
    args = p.parse_args(own)
    out = Path(args.out)

    def command() -> int:  # a bad command, or a folder another sweep holds or that holds other settings: exit 2
        options = options_of(extra, "after --")
        runs = skips_runs(args.depth, options) if args.comparison == "skips" else coursework_runs(options)
        check(args, runs, options)
        if args.dry_run:
            for name, run in runs.items():
                print(f"{name}: python train.py {' '.join(run.train_flags(args.dataset, args.epochs))}")
            return 0
        grid = run_grid_stoppable(list(runs.values()), out, args.dataset, args.epochs, args.parallel, args.gpus)
        return write_comparison(args.comparison, runs, grid, out)
    return exit_status(command)


def write_comparison(comparison: str, runs: dict[str, Run], grid: list[dict], out: Path) -> int:
    """``<out>/comparison.md`` and the figures from the runs' rows; 0 when every run finished."""
    by_id = {r["run_id"]: r for r in grid}
    rows = {name: by_id[run.run_id] for name, run in runs.items()}
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    if comparison == "skips":
        table, figure = skips_table(rows), skips_figure(rows, figures)
    else:
        table, figure = coursework_table(rows), coursework_figure(rows, figures)
    (out / "comparison.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'comparison.md'} and {figure}")
    return 0 if all(r["status"] in FINISHED for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
