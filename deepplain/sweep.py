"""Sweep runner: train a grid of runs (models x depths x seeds x flag variants) and collect one CSV.

    python -m deepplain.sweep --out sweeps/fmnist --dataset fashion-mnist --models plain,van,resnet,highway \\
        --depths 1,2,4,8,16,30 --seeds 0,1 --epochs 5 -- --width 50 --lr 0.01

Each run is ``python -m deepplain`` (the training CLI) in its own process, logging to
``<out>/runs/<run id>/version_N`` and its output to ``<out>/runs/<run id>/train.log``. A run whose
``summary.json`` already says ``completed`` or ``diverged`` is skipped, so an interrupted sweep
resumes where it stopped (an interrupted or failed run is run again). ``--parallel N`` runs N at
a time; ``--gpus 0,1`` gives each concurrent run its own GPU. At the end ``<out>/results.csv``
holds every run's summary; rows that an earlier sweep with another grid wrote into the same folder
are kept, so a grid can be extended (more models, depths, seeds) into one CSV.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

CSV_FIELDS = ["run_id", "model", "depth", "seed", "variant", "dataset", "status", "parameters", "epochs_done",
              "global_step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
              "wall_seconds", "samples_per_second", "alpha_residual", "alpha_removed_step", "alpha_target_step",
              "alpha_closed_at_target", "alpha_residual_at_target",
              "run_dir", "flags"]
FINISHED = ("completed", "diverged")


@dataclass
class Run:
    model: str
    depth: int
    seed: int
    variant: str = ""
    flags: list = field(default_factory=list)  # variant flags, then the sweep's common flags

    @property
    def run_id(self) -> str:
        return "-".join(p for p in (self.model, f"d{self.depth}", f"s{self.seed}", self.variant) if p)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME=--flag value --flag2`` -> (NAME, [flags]); ``NAME=`` is a variant with no flags."""
    if "=" not in text:
        raise ConfigError(f"--variant must be NAME=FLAGS (e.g. bn='--norm bn'), got {text!r}")
    name, flags = text.split("=", 1)
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"variant name must be letters, digits, - and _, got {name!r}")
    return name, flags.split()


def grid(models, depths, seeds, variants, common_flags) -> list[Run]:
    variants = variants or [("", [])]
    return [Run(m, d, s, v, [*vf, *common_flags])
            for m, d, s, (v, vf) in itertools.product(models, depths, seeds, variants)]


def latest_summary(run_root: Path) -> dict | None:
    summaries = sorted(run_root.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    if not summaries:
        return None
    try:
        return json.loads(summaries[-1].read_text())
    except json.JSONDecodeError:
        return None


def run_one(run: Run, out: Path, dataset: str, epochs: int, gpu: str | None, python: str) -> dict:
    root = out / "runs" / run.run_id
    summary = latest_summary(root)
    if summary and summary.get("status") in FINISHED:
        return row(run, dataset, summary, skipped=True)
    root.mkdir(parents=True, exist_ok=True)
    cmd = [python, "-m", "deepplain", "--model", run.model, "--depth", str(run.depth), "--seed", str(run.seed),
           "--dataset", dataset, "--epochs", str(epochs), "--logdir", str(out / "runs"), "--name", run.run_id,
           "--no-progress", *run.flags]
    env = dict(os.environ)
    env.pop("DEEPPLAIN_RUN_DIR", None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    with open(root / "train.log", "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary = latest_summary(root)
    if summary is None:
        summary = {"status": f"failed (exit {code}, see {root / 'train.log'})"}
    return row(run, dataset, summary)


def row(run: Run, dataset: str, summary: dict, skipped: bool = False) -> dict:
    out = {key: summary.get(key) for key in CSV_FIELDS}
    out.update(run_id=run.run_id, model=run.model, depth=run.depth, seed=run.seed, variant=run.variant,
               dataset=summary.get("dataset", dataset), flags=" ".join(run.flags), status=summary.get("status"))
    out["_skipped"] = skipped
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["model"], r["variant"] or "", int(r["depth"]), int(r["seed"]))):
            writer.writerow(r)
    os.replace(tmp, path)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_grid(runs: list[Run], out: Path, dataset: str, epochs: int, parallel: int = 1, gpus=None,
             python: str = sys.executable, echo=print) -> list[dict]:
    """Run (or skip) every run, ``parallel`` at a time; write and return ``<out>/results.csv`` rows."""
    out.mkdir(parents=True, exist_ok=True)
    gpus = list(gpus or [])
    free = list(gpus)
    lock = threading.Lock()
    rows = []
    # Rows that earlier sweeps with another grid wrote into this folder stay in the CSV.
    csv_path, ids = out / "results.csv", {run.run_id for run in runs}
    earlier = [r for r in read_csv(csv_path) if r["run_id"] not in ids] if csv_path.is_file() else []

    def task(run):
        gpu = None
        if gpus:
            with lock:
                gpu = free.pop(0)
        try:
            r = run_one(run, out, dataset, epochs, gpu, python)
        finally:
            if gpu is not None:
                with lock:
                    free.append(gpu)
        with lock:
            rows.append(r)
            state = "skipped (done)" if r["_skipped"] else r["status"]
            acc = r.get("test_acc")
            echo(f"[{len(rows)}/{len(runs)}] {run.run_id}: {state}" + (f", test acc {float(acc):.4f}" if acc else ""))
            write_csv(earlier + rows, csv_path)  # kept current, so a killed sweep still leaves its CSV
        return r
    workers = max(1, min(parallel, len(gpus) if gpus else parallel))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(task, runs))
    write_csv(earlier + rows, csv_path)
    return rows


def _csv_list(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser
    p = OneLineParser(prog="python -m deepplain.sweep", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="sweep folder (runs/ and results.csv go there)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--models", type=_csv_list(str), required=True, help="comma list, e.g. plain,van,resnet,highway")
    p.add_argument("--depths", type=_csv_list(int), required=True, help="comma list, e.g. 1,2,4,8,16,30")
    p.add_argument("--seeds", type=_csv_list(int), default=[0])
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--variant", action="append", default=[], help="NAME=FLAGS, repeatable (e.g. bn='--norm bn')")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--gpus", type=_csv_list(str), default=None, help="one GPU per concurrent run, e.g. 0,1,2,3")
    return p


def split_at_double_dash(argv) -> tuple[list[str], list[str]]:
    """(own arguments, train.py flags after ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv=None) -> int:
    from .datamodules.paths import resolve_data_env
    resolve_data_env()
    own, flags = split_at_double_dash(argv)
    args = build_parser().parse_args(own)
    try:
        if args.epochs < 1 or any(d < 1 for d in args.depths) or args.parallel < 1:
            raise ConfigError("--epochs, --depths and --parallel must be positive")
        variants = [parse_variant(v) for v in args.variant]
        runs = grid(args.models, args.depths, args.seeds, variants, flags)
        rows = run_grid(runs, Path(args.out), args.dataset, args.epochs, args.parallel, args.gpus)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r["status"] not in FINISHED]
    print(f"{len(rows)} runs, {len(failed)} not completed; results: {Path(args.out) / 'results.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
