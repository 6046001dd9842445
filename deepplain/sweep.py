"""Sweep runner: train a grid of runs (models x depths x seeds x flag variants) and collect one CSV.

    python -m deepplain.sweep --out sweeps/fmnist --dataset fashion-mnist --models plain,van,resnet,highway \\
        --depths 1,2,4,8,16,30 --seeds 0,1 --epochs 5 -- --width 50 --lr 0.01

Each run is ``python -m deepplain`` (the training CLI) in its own process, logging to
``<out>/runs/<run id>/version_N`` and its output to ``<out>/runs/<run id>/train.log``. A run is
identified by its whole configuration (the train.py flags it runs with, in ``run.json``), not by its
name: a run whose configuration is the same and whose ``summary.json`` says ``completed`` or
``diverged`` is skipped; one that was interrupted, preempted or killed (no summary written) is
resumed from its ``last.ckpt``; one that failed is trained again; a run folder that holds another
configuration stops the sweep before anything trains, with one line saying which. The grid's own
flags (``--model``, ``--depth``, ``--seed``, ``--dataset``, ``--epochs``) and the run's place
(``--logdir``, ``--name``, ``--resume``, ``--config``) cannot be given after ``--`` or in a variant.
``--parallel N`` runs N at a time, each with its share of the CPU cores (``OMP_NUM_THREADS``;
``--threads-per-run`` or an ``OMP_NUM_THREADS`` already set decides instead); ``--gpus 0,1`` gives
each concurrent run its own GPU. At the end ``<out>/results.csv`` holds every run's summary and the
flags that produced it; rows that an earlier sweep with another grid wrote into the same folder are
kept, so a grid can be extended into one CSV. One sweep at a time writes into a folder (a lock that
a crashed sweep cannot leave stuck). Ctrl-C or SIGTERM is passed to the running trainings, which
save their step; the CSV is written and the sweep exits 130 or 143; the same command resumes.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .cli import parse_options
from .datamodules.paths import resolve_data_env
from .errors import ConfigError
from .exits import EXIT_BAD_INPUT
from .files import atomic_file
from .inputs import FolderLock, OneLineParser, output_dir, read_results_csv
from .resume import latest_summary, resumable_checkpoint, saved_epochs, stopped_from_outside
from .rundir import RESULTS_FILE, RUN_RECORD, SUMMARY_FILE, SWEEP_RUNS, TRAIN_LOG, RunFolder, SweepFolder
from .schema import flag, spelled, to_argv
from .status import FINISHED, RowStatus, RunSummary, failed_because

# The run's summary fields (``status.RunSummary``) between the sweep's own columns.
CSV_FIELDS = ["run_id", "variant", *RunSummary.csv_columns(), "flags"]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch's CPU kernels read at start-up
# What the grid sets for each run, and where the run lives (options, and the config-file flags of train.py):
# never given after -- or in a variant.
GRID_OPTIONS = ("model", "depth", "seed", "dataset", "epochs", "logdir", "name", "resume", "config", "print_config")
SET_BY_SWEEP = ("logdir", "name", "progress")  # on every training's command line, not part of its identity
EXAMPLE_VARIANT = f"bn='{' '.join(to_argv({'norm': 'bn'}))}'"


@dataclass
class Run:
    model: str
    depth: int
    seed: int
    variant: str = ""
    options: dict = field(default_factory=dict)  # option name -> value: the variant's, then the sweep's common ones

    @property
    def run_id(self) -> str:
        return "-".join(p for p in (self.model, f"d{self.depth}", f"s{self.seed}", self.variant) if p)

    @property
    def flags(self) -> list[str]:
        """The run's own options as train.py flags (``schema.to_argv``)."""
        return to_argv(self.options)

    def train_options(self, dataset: str, epochs: int) -> dict:
        """The options that define this run: its identity first, then its own options (the place it logs to is
        added apart)."""
        identity = {"model": self.model, "depth": self.depth, "seed": self.seed, "dataset": dataset, "epochs": epochs}
        return {**identity, **self.options, **identity}  # the grid's values win; the identity reads first

    def train_flags(self, dataset: str, epochs: int) -> list[str]:
        return to_argv(self.train_options(dataset, epochs))


def check_options(options: dict, where: str) -> None:
    """Refuse the grid's own options (and the run's place) in ``options``."""
    taken = [flag(name) for name in GRID_OPTIONS if name in options]
    if taken:
        raise ConfigError(f"{', '.join(sorted(taken))} {where} would override what the sweep sets for each run (use "
                          "--models/--depths/--seeds/--dataset/--epochs, or another --out)")


def options_of(flags: list[str], where: str) -> dict:
    """train.py flags as option values, checked by train.py's parser, without the grid's own options."""
    options = parse_options(flags, where)
    check_options(options, where)
    return options


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=--flag value --flag2`` -> (NAME, {option: value}); ``NAME=`` is a variant with no flags."""
    if "=" not in text:
        raise ConfigError(f"--variant must be NAME=FLAGS (e.g. {EXAMPLE_VARIANT}), got {text!r}")
    name, flags = text.split("=", 1)
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"variant name must be letters, digits, - and _, got {name!r}")
    return name, options_of(flags.split(), f"in --variant {name}")


def grid(models, depths, seeds, variants, common_flags) -> list[Run]:
    """Every (model, depth, seed, variant) run; ``variants`` are ``(name, options)``, ``common_flags`` the
    train.py flags every run gets (after ``--``)."""
    common = options_of(common_flags, "after --")
    names = [name for name, _ in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--variant names must be unique; {', '.join(repeated)} is given more than once")
    for kind, values in (("--models", models), ("--depths", depths), ("--seeds", seeds)):
        if len(set(values)) != len(values):
            raise ConfigError(f"{kind} lists a value twice: {','.join(map(str, values))}")
    variants = variants or [("", {})]
    return [Run(m, d, s, v, {**options, **common})
            for m, d, s, (v, options) in itertools.product(models, depths, seeds, variants)]


def recorded_flags(root: Path) -> list[str] | None:
    """The train.py flags a run folder was trained with: ``run.json``, or for folders of earlier sweeps
    the last command in ``train.log`` (without the sweep's own: its place and progress bar)."""
    record = root / RUN_RECORD
    if record.is_file():
        try:
            return list(json.loads(record.read_text())["flags"])
        except (ValueError, KeyError, TypeError, OSError):
            return None
    log = root / TRAIN_LOG
    if not log.is_file():
        return None
    commands = [line[2:].split() for line in log.read_text(errors="replace").splitlines() if line.startswith("$ ")]
    if not commands or "deepplain" not in commands[-1]:
        return None
    try:
        options = parse_options(commands[-1][commands[-1].index("deepplain") + 1:], str(log))
    except ConfigError:  # flags this train.py no longer reads: not a configuration it can compare
        return None
    return to_argv({name: value for name, value in options.items() if name not in SET_BY_SWEEP})


def check_identities(runs: list[Run], out: Path, dataset: str, epochs: int) -> None:
    """Before anything trains: every run folder already in ``out`` holds the configuration asked for."""
    for run in runs:
        root = SweepFolder(out).run_root(run.run_id)
        if not root.is_dir():
            continue
        before = recorded_flags(root)
        if before is None:
            if any(root.glob(f"*/{SUMMARY_FILE}")):
                raise ConfigError(f"{root} holds a run whose configuration is not recorded; move it away or use "
                                  "another --out")
            continue
        # compared as option values: the same settings in another order or spelling (1e-4, 0.0001) are the same run
        was = parse_options(before, f"{root / RUN_RECORD} (the flags that run was trained with)")
        asked = parse_options(run.train_flags(dataset, epochs), run.run_id)
        changed = [f"{flag(name)} {_shown(was, name)} -> {_shown(asked, name)}"
                   for name in sorted(set(was) | set(asked)) if was.get(name) != asked.get(name)]
        if changed:
            raise ConfigError(f"{root} was trained with other settings ({'; '.join(changed[:6])}); use another "
                              "--out or a --variant name for the new settings")


def _shown(options: dict, name: str) -> str:
    return spelled(options[name]) if name in options else "(not given)"


class Children:
    """The training processes the sweep is running, so that a signal to the sweep reaches them once."""

    def __init__(self):
        self.running: set[subprocess.Popen] = set()
        self.stop_signal: int | None = None
        self.lock = threading.Lock()

    def forward(self, signum, frame=None) -> None:
        """The signal handler: the first signal goes to every running training, exactly once each."""
        with self.lock:
            if self.stop_signal is not None:
                return  # a second signal is not passed on: it would stop a training without its checkpoint
            self.stop_signal = signum
            for proc in self.running:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def add(self, proc: subprocess.Popen) -> None:
        """Register a started training; one started after the signal gets it now (under the same lock, so
        never twice)."""
        with self.lock:
            self.running.add(proc)
            if self.stop_signal is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self.stop_signal)

    def remove(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(proc)


def die_with_parent(parent: int):
    """A ``preexec_fn`` for a training: on Linux it receives SIGTERM when the sweep dies, however the sweep dies
    (SIGKILL, the OOM killer, a closed terminal), and saves its step like a preempted run: no orphan goes on
    training a folder that the next sweep would resume. Elsewhere, None (nothing to do)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it

    def arm():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_run(parallel: int, requested: int | None = None, environ=os.environ) -> tuple[int | None, str]:
    """The threads each of ``parallel`` concurrent runs may use (None: leave torch's default), and a line
    saying so. Torch gives every process all cores: two runs on two cores then each run two threads, and
    their matrix kernels (the condition probe's spectra most of all) slow down many times over."""
    if requested is not None:
        return requested, f"each run uses {requested} CPU thread(s) (--threads-per-run)"
    if environ.get("OMP_NUM_THREADS"):
        return None, f"each run uses OMP_NUM_THREADS={environ['OMP_NUM_THREADS']} CPU thread(s) (set outside the sweep)"
    if parallel <= 1:
        return None, ""  # one run at a time: all cores, torch's default
    cores = cpu_cores()
    share = max(1, cores // parallel)
    return share, (f"each run uses {share} of the {cores} CPU cores (--parallel {parallel}; --threads-per-run N "
                   "to choose)")


def run_one(run: Run, out: Path, dataset: str, epochs: int, gpu: str | None, python: str,
            children: Children | None = None, threads: int | None = None) -> dict:
    root = SweepFolder(out).run_root(run.run_id)
    summary = latest_summary(root)
    if summary and summary.get("status") in FINISHED:
        return row(run, dataset, summary, skipped=True)
    if children is not None and children.stop_signal is not None:
        return row(run, dataset, summary or {"status": RowStatus.NOT_STARTED})
    root.mkdir(parents=True, exist_ok=True)
    flags = run.train_flags(dataset, epochs)
    (root / RUN_RECORD).write_text(json.dumps({"flags": flags}))
    checkpoint = resumable_checkpoint(root, epochs) if stopped_from_outside(root, summary) else None
    run_folder = RunFolder.of_checkpoint(checkpoint).path if checkpoint is not None else None
    holder = FolderLock.holder(run_folder) if run_folder is not None else None
    if holder is not None:  # an earlier training of it still runs (an orphan of a killed sweep): never resume under it
        return row(run, dataset, {"status": failed_because(f"its run folder {run_folder} is in use by pid {holder}; "
                                                           "wait for that process to end, or stop it, then run the "
                                                           "same command")})
    if checkpoint is not None:  # continue the interrupted run where it stopped
        cmd = [python, "-m", "deepplain", *to_argv({"resume": str(checkpoint), "progress": False})]
    else:
        cmd = [python, "-m", "deepplain", *flags,
               *to_argv({"logdir": str(SweepFolder(out).runs), "name": run.run_id, "progress": False})]
    env = dict(os.environ)
    env.pop("DEEPPLAIN_RUN_DIR", None)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        env.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    with open(root / TRAIN_LOG, "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # its own session: a Ctrl-C in the terminal reaches the sweep, which passes it on once
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=die_with_parent(os.getpid()))
        if children is not None:
            children.add(proc)
        code = proc.wait()
        if children is not None:
            children.remove(proc)
    summary = latest_summary(root)
    if summary is None:
        killed = code < 0 and -code in signal.valid_signals()
        how = f"killed by {signal.Signals(-code).name}" if killed else f"exit {code}"
        again = "; the same command resumes it" if resumable_checkpoint(root, epochs) is not None else ""
        summary = {"status": failed_because(f"{how}{again}, see {root / TRAIN_LOG}")}
    return row(run, dataset, summary)


def row(run: Run, dataset: str, summary: dict, skipped: bool = False) -> dict:
    out = {key: summary.get(key) for key in CSV_FIELDS}
    out.update(run_id=run.run_id, model=run.model, depth=run.depth, seed=run.seed, variant=run.variant,
               dataset=summary.get("dataset", dataset), flags=" ".join(run.flags), status=summary.get("status"))
    out["_skipped"] = skipped
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_file(path, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r["model"], r["variant"] or "", int(r["depth"]), int(r["seed"]))):
            writer.writerow(r)


def read_csv(path: Path) -> list[dict]:
    return read_results_csv(path)


class Stopped(Exception):
    """Ctrl-C or SIGTERM reached the sweep; its trainings have saved their step."""

    def __init__(self, signum: int, out: Path):
        name = "interrupted" if signum == signal.SIGINT else "preempted"
        super().__init__(f"{name}: the running trainings saved their step; results so far: {SweepFolder(out).results}; "
                         "run the same command to resume")
        self.exit_code = 128 + signum


def run_grid_stoppable(runs: list[Run], out: Path, dataset: str, epochs: int, parallel: int = 1, gpus=None,
                       threads: int | None = None) -> list[dict]:
    """:func:`run_grid` for a command line: Ctrl-C or SIGTERM goes once to the running trainings (which save
    their step) and then raises :class:`Stopped`, instead of killing the sweep and orphaning them."""
    children = Children()
    with forwarded_signals(children):
        rows = run_grid(runs, out, dataset, epochs, parallel, gpus, children=children, threads=threads)
    if children.stop_signal is not None:
        raise Stopped(children.stop_signal, out)
    return rows


def collect(runs: list[Run], out: Path, dataset: str) -> list[dict]:
    """The rows of ``runs`` as their folders in ``out`` stand now, training nothing (a long sweep's results so
    far, readable while it runs)."""
    return [row(run, dataset, state_now(SweepFolder(out).run_root(run.run_id))) for run in runs]


def state_now(run_root: Path) -> dict:
    """A run's newest summary, unless its newest ``last.ckpt`` has trained further (a run training now, a
    resumed one, or one killed before it could write a summary): then status ``unfinished`` and the
    epochs that checkpoint holds."""
    summary = latest_summary(run_root)
    if summary and summary.get("status") in FINISHED:
        return summary
    saved = saved_epochs(run_root)
    if saved is None or (summary and int(summary.get("epochs_done") or 0) >= saved):
        return summary or {"status": RowStatus.NOT_STARTED}
    return {"status": RowStatus.UNFINISHED, "epochs_done": saved}


def run_grid(runs: list[Run], out: Path, dataset: str, epochs: int, parallel: int = 1, gpus=None,
             python: str = sys.executable, echo=print, children: Children | None = None,
             threads: int | None = None) -> list[dict]:
    """Run (or skip) every run, ``parallel`` at a time, each with ``threads`` CPU threads (default its
    share of the cores, :func:`threads_per_run`); write and return ``<out>/results.csv`` rows.

    Everything that can be wrong is found first (the folder, an earlier CSV, runs with other
    settings); then the folder is locked for the sweep's whole length."""
    output_dir(out)
    with FolderLock(out, "--out"):
        csv_path = SweepFolder(out).results
        csv_path.with_suffix(".csv.tmp").unlink(missing_ok=True)  # what a killed write left
        earlier = read_csv(csv_path) if csv_path.is_file() else []
        check_identities(runs, out, dataset, epochs)
        threads, note = threads_per_run(parallel, threads)
        if note:
            echo(note)
        return _run_locked(runs, out, dataset, epochs, parallel, gpus, python, echo, children, earlier, threads)


def _run_locked(runs, out, dataset, epochs, parallel, gpus, python, echo, children, earlier, threads) -> list[dict]:
    gpus = list(gpus or [])
    free = list(gpus)
    lock = threading.Lock()
    rows = []
    # Rows that earlier sweeps with another grid wrote into this folder stay in the CSV.
    csv_path, ids = SweepFolder(out).results, {run.run_id for run in runs}
    earlier = [r for r in earlier if r["run_id"] not in ids]

    def task(run):
        gpu = None
        if gpus:
            with lock:
                gpu = free.pop(0)
        try:
            r = run_one(run, out, dataset, epochs, gpu, python, children, threads)
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


def csv_list(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m deepplain.sweep", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help=f"sweep folder ({SWEEP_RUNS}/ and {RESULTS_FILE} go there)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--models", type=csv_list(str), required=True, help="comma list, e.g. plain,van,resnet,highway")
    p.add_argument("--depths", type=csv_list(int), required=True, help="comma list, e.g. 1,2,4,8,16,30")
    p.add_argument("--seeds", type=csv_list(int), default=[0])
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--variant", action="append", default=[], help=f"NAME=FLAGS, repeatable (e.g. {EXAMPLE_VARIANT})")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time, each with its share of the CPU cores")
    p.add_argument("--threads-per-run", type=int, default=None, metavar="N",
                   help="CPU threads of each run (default: the cores / --parallel when --parallel > 1, unless "
                        "OMP_NUM_THREADS is set)")
    p.add_argument("--gpus", type=csv_list(str), default=None, help="one GPU per concurrent run, e.g. 0,1,2,3")
    return p


def split_at_double_dash(argv) -> tuple[list[str], list[str]]:
    """(own arguments, train.py flags after ``--``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def exit_status(command) -> int:
    """A tool's ``command()`` (which returns its exit status), with the tools' two ways out: bad input is one line
    and ``EXIT_BAD_INPUT``; Ctrl-C or SIGTERM, passed on to the trainings (which saved their step), says how to
    resume."""
    try:
        return command()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code


def main(argv=None) -> int:
    resolve_data_env()
    own, flags = split_at_double_dash(argv)
    args = build_parser().parse_args(own)

    def command() -> int:
        if args.epochs < 1 or any(d < 1 for d in args.depths) or args.parallel < 1 or (
                args.threads_per_run is not None and args.threads_per_run < 1):
            raise ConfigError("--epochs, --depths, --parallel and --threads-per-run must be positive")
        variants = [parse_variant(v) for v in args.variant]
        runs = grid(args.models, args.depths, args.seeds, variants, flags)
        rows = run_grid_stoppable(runs, Path(args.out), args.dataset, args.epochs, args.parallel, args.gpus,
                                  threads=args.threads_per_run)
        failed = [r for r in rows if r["status"] not in FINISHED]
        print(f"{len(rows)} runs, {len(failed)} not completed; results: {SweepFolder(args.out).results}")
        return 1 if failed else 0
    return exit_status(command)


class forwarded_signals:
    """Ctrl-C and SIGTERM, while the sweep runs, go to its trainings (once) instead of stopping the sweep."""

    def __init__(self, children: Children):
        self.children, self.saved = children, {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.saved[signum] = signal.signal(signum, self.children.forward)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        return False


if __name__ == "__main__":
    sys.exit(main())
