"""Training curves from a run's TensorBoard event files: the VAN paper's Fig. 2 (right).

    python -m deepplain.curves --run VAN-30=results/mnist-fig1/runs/van-d30-s0 \\
        --run plain-30=results/mnist-fig1/runs/plain-d30-s0 --out docs/figures/van_fig2_mnist.png

One figure against epoch: each run's train error (dashed) and evaluation error (solid; ``val/acc``,
which is the test split when the run used ``--val-split 0``) on the left axis, and for runs with
skip gates the mean alpha residual ``mean(1 - alpha)`` (dotted) on the right axis.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .callbacks.alpha import AlphaScheduler
from .errors import ConfigError
from .exits import EXIT_BAD_INPUT
from .inputs import OneLineParser, output_file
from .rundir import SUMMARY_FILE, RunFolder
from .status import METRIC_TAGS


def _event_dir(run_dir: Path) -> Path:
    """The newest folder under ``run_dir`` (itself included) that holds event files."""
    dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}, key=lambda d: d.stat().st_mtime)
    if not dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    return dirs[-1]


def _why_no_epochs(run_dir: Path) -> str:
    """Why a run has no epoch metrics, from its summary.json when it has one."""
    try:
        summary = json.loads(RunFolder(run_dir).summary.read_text())
    except (OSError, ValueError):
        summary = {}
    status, epochs = summary.get("status"), summary.get("epochs_done")
    if status and status != "completed":
        return (f"the run {status} after {epochs or 0} complete epoch(s) and step {summary.get('global_step')}, "
                f"before a whole epoch was validated; its {SUMMARY_FILE} and trainability report say why")
    return "the run was not validated at the end of an epoch (--limit-val-batches 0, or no epoch finished)"


def read_curves(run_dir) -> dict[str, list[tuple[float, float]]]:
    """``{"train_error", "eval_error", "alpha_residual"}`` -> [(epoch, value), ...] from a run's events.

    Epoch-level metrics are placed at their epoch number (1, 2, ...); ``alpha/residual``, logged per
    step, at ``step / steps_per_epoch`` (so 0 is the start of training). A run without skip gates
    has an empty ``alpha_residual``.
    """
    acc = EventAccumulator(str(_event_dir(Path(run_dir))), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    train_acc, val_acc = METRIC_TAGS["train_acc"], METRIC_TAGS["val_acc"]
    missing = {train_acc, val_acc} - tags
    if missing:
        raise ValueError(f"{run_dir}: the events have no {', '.join(sorted(missing))}: {_why_no_epochs(Path(run_dir))}")
    per_epoch = {name: [e.value for e in scalars(acc, tag)] for name, tag in
                 (("train_error", train_acc), ("eval_error", val_acc))}
    curves = {name: [(i + 1.0, 1.0 - v) for i, v in enumerate(values)] for name, values in per_epoch.items()}
    # Validation runs at the last step of each epoch, so its steps give the epoch length.
    val_steps = [e.step for e in scalars(acc, val_acc)]
    steps_per_epoch = (val_steps[-1] + 1) / len(val_steps)
    residual = AlphaScheduler.residual_tag
    curves["alpha_residual"] = ([(e.step / steps_per_epoch, e.value) for e in scalars(acc, residual)]
                                if residual in tags else [])
    return curves


def scalars(acc: EventAccumulator, tag: str) -> list:
    """A tag's events in step order, one per step (the latest written): a resumed run adds an event file, and
    the accumulator reads files in name order, which is not always the order they were written in (two
    written in the same second sort by process id and a counter)."""
    latest = {}
    for event in sorted(acc.Scalars(tag), key=lambda e: (e.step, e.wall_time)):
        latest[event.step] = event
    return list(latest.values())


def plot_curves(runs: dict[str, dict], out: Path, title: str = "") -> Path:
    fig = Figure(figsize=(9.5, 4.2), dpi=120)
    ax = fig.add_subplot()
    alpha_ax = None
    for name, curves in runs.items():
        line, = ax.plot(*zip(*curves["eval_error"]), label=f"{name} eval error")
        ax.plot(*zip(*curves["train_error"]), linestyle="--", color=line.get_color(), label=f"{name} train error")
        if curves["alpha_residual"]:
            alpha_ax = alpha_ax or ax.twinx()
            alpha_ax.plot(*zip(*curves["alpha_residual"]), linestyle=":", color=line.get_color(),
                          label=f"{name} mean(1 - alpha)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (1 - accuracy), log scale")
    ax.set_yscale("log")  # late-training differences of a few tenths of a percent stay visible
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    if alpha_ax is not None:
        alpha_ax.set_ylabel("alpha residual mean(1 - alpha)")
        alpha_ax.set_ylim(-0.02, 1.02)
        more = alpha_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # beside the axes, not on them: a failing run's curves sit at the top, where a legend inside would be
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02 if alpha_ax is None else 1.12, 1.0),
              borderaxespad=0.0)
    ax.set_title(title or "training curves")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m deepplain.curves", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                   help="a run folder (train.py's --logdir/--name, or a sweep's runs/<id>), repeatable")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs = {}
    try:
        out = output_file(args.out, ".png")
        specs = [spec.partition("=") for spec in args.run]
        for spec, (name, sep, run_dir) in zip(args.run, specs):
            if not sep or not name or not run_dir:
                raise ConfigError(f"--run must be NAME=DIR, got {spec!r}")
            if [n for n, _, _ in specs].count(name) > 1:
                raise ConfigError(f"--run name {name!r} is given twice; each run needs its own name")
        for name, _, run_dir in specs:
            runs[name] = read_curves(run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for name, curves in runs.items():
        final = curves["alpha_residual"][-1][1] if curves["alpha_residual"] else None
        removed = next((epoch for epoch, r in curves["alpha_residual"] if r == 0.0), None)
        print(f"{name}: final eval error {curves['eval_error'][-1][1]:.4f}, train error "
              f"{curves['train_error'][-1][1]:.4f}" + ("" if final is None else
              f", alpha residual {final:.4f}" + (f" (0 from epoch {removed:.2f})" if removed is not None else "")))
    print(f"wrote {plot_curves(runs, out, args.title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
