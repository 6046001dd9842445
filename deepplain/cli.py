"""``train.py`` / ``deepplain-train`` / ``python -m deepplain``: flags, config files and exit codes.

This module only parses and checks what the user asked for and maps the outcome to an exit
status; ``deepplain.training`` builds and runs the Trainer. Exit statuses:

==== =====================================================================================
0    the run completed
1    an unexpected error (a bug: the traceback is printed)
2    bad input: a flag, a config file, a dataset or a checkpoint; nothing was written
3    training diverged (non-finite loss or weights); the last good checkpoint is kept
4    the machine stopped the run: a full disk, a DDP peer that never connected; the previous
     checkpoint is kept
130  interrupted by Ctrl-C; checkpoints/last.ckpt holds the step it stopped at
143  preempted by SIGTERM (e.g. SLURM); checkpoints/last.ckpt holds the step it stopped at
==== =====================================================================================
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import ConfigError, DatasetError, DeepplainError, DivergenceError, RunFailure

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_IO = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_PREEMPTED = 130, 143
EXIT_BY_STATUS = {"completed": EXIT_OK, "interrupted": EXIT_INTERRUPTED, "preempted": EXIT_PREEMPTED,
                  "diverged": EXIT_DIVERGED}
INTERNAL_KEYS = ("run_dir", "data_root", "config", "print_config", "resume")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line on stderr (and exit status 2)."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _devices(value: str):
    if value == "auto" or "," in value:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a count or a comma list of device indices, got {value!r}") \
            from None


def _count_or_fraction(value: str):
    number = float(value)
    return int(number) if number.is_integer() and number >= 1 else number


def _numbers(value: str):
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from .datamodules import DATAMODULES
    from .family_modules import ALPHA_MODES
    from .layers import ACTIVATIONS, INITS, NORMS
    from .models.dirac import DIRAC_LAYOUTS
    from .models.plain import CONV_LAYOUTS
    from .models.resnet import BLOCKS
    from .optim import OPTIMIZERS, SCHEDULES
    from .presets import PRESETS, describe_presets
    from .registry import describe_models, model_names
    p = OneLineParser(
        prog="train.py", argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a very deep network with or without skip connections, with layer-by-layer diagnostics.",
        epilog="models:\n" + describe_models() + "\n\npresets (--preset NAME; explicit flags override them):\n"
               + describe_presets() + "\n\nexit status: 0 completed, 2 bad input, 3 diverged, 4 I/O failure, "
               "130 interrupted (Ctrl-C), 143 preempted (SIGTERM)\n"
               "example: python train.py --model van --depth 26   # VAN-26 on CIFAR-10, the paper's recipe")
    g = p.add_argument_group("configuration")
    g.add_argument("--config", metavar="FILE.yaml", help="flag values as YAML (keys as printed by --print-config); "
                                                        "flags on the command line win")
    g.add_argument("--print-config", action="store_true", help="print the merged configuration as YAML and exit")
    g.add_argument("--preset", choices=list(PRESETS), metavar="NAME", help="load a named recipe (listed below)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=model_names(), help="model family (default plain)")
    g.add_argument("--depth", type=int, help="depth; each family has its rule (van conv: 8n+2, dirac conv: 6n+4, ...)")
    g.add_argument("--width", type=int, help="MLP: units per layer; conv: widening factor k")
    g.add_argument("--arch", choices=["mlp", "conv"], help="default: conv for CIFAR/imagefolder, mlp otherwise")
    g.add_argument("--activation", choices=list(ACTIVATIONS), help="plain family only")
    g.add_argument("--negative-slope", type=float, help="LeakyReLU slope / PReLU initial slope (default 0.3)")
    g.add_argument("--norm", choices=list(NORMS))
    g.add_argument("--init", choices=list(INITS))
    g.add_argument("--layout", choices=sorted(set(CONV_LAYOUTS) | set(DIRAC_LAYOUTS)),
                   help=f"plain conv: {' | '.join(CONV_LAYOUTS)}; dirac conv: {' | '.join(DIRAC_LAYOUTS)}")
    g.add_argument("--block", choices=list(BLOCKS), help="resnet conv block (default: by depth, see README)")
    g.add_argument("--gate-bias", type=float, help="highway transform-gate bias init (default -2)")
    g.add_argument("--max-norm", type=float, help="add MaxNormConstraint with this bound (PlainNet: 3)")
    g.add_argument("--max-norm-classifier", action="store_true", help="constrain the classifier too (default: not)")
    g = p.add_argument_group("VAN")
    g.add_argument("--alpha-mode", choices=list(ALPHA_MODES), help="default lagrangian (calibrated eq. 7-8)")
    g.add_argument("--lambda-lr-ratio", type=float, help="eta'/eta (default 0.5 for MLPs, 0.1 for conv)")
    g.add_argument("--phase-out", "--phase-out-epochs", dest="phase_out", type=float,
                   help="when the skips must be gone: a share of training (< 1) or an epoch (default 120/165)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATAMODULES), help="default cifar10")
    g.add_argument("--data-dir", help="data root, searched alone (default: $DEEPPLAIN_DATA, then ./data)")
    g.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    g.add_argument("--val-split", type=float, help="share of the training split held out (0 = validate on test)")
    g.add_argument("--skip-checksums", dest="verify_checksums", action="store_false",
                   help="do not check files against published checksums and split sizes (re-packed or custom files)")
    g.add_argument("--image-size", type=int, help="COIL-20 / imagefolder image side (default 32 / 224)")
    g.add_argument("--num-workers", type=int, help="DataLoader workers (folder datasets only)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, help="not applied to biases, norms, alpha, Dirac a/b")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS))
    g.add_argument("--schedule", choices=list(SCHEDULES))
    g.add_argument("--milestones", type=_numbers, help="comma-separated; values < 1 are fractions of --epochs")
    g.add_argument("--gamma", type=float, help="multistep decay factor (default 0.1)")
    g.add_argument("--accumulate-grad-batches", type=int)
    g = p.add_argument_group("hardware (passed to Lightning, checked before anything runs)")
    g.add_argument("--precision", help="32-true | bf16-mixed | 16-mixed | 64-true | ...")
    g.add_argument("--accelerator", help="auto | cpu | gpu | ...")
    g.add_argument("--devices", type=_devices, help="auto | a count | a comma list of device indices")
    g.add_argument("--strategy", help="auto | ddp | ddp_spawn | fsdp | ...")
    g.add_argument("--num-nodes", type=int)
    g.add_argument("--dist-timeout", type=int, help="seconds a DDP collective or rendezvous may wait (default 1800)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--deterministic", action="store_true")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--logdir", help="default runs")
    g.add_argument("--name", help="default <model>-<arch>-<depth>-<dataset>")
    g.add_argument("--fast-dev-run", action="store_true", help="one batch of train/val/test, nothing logged")
    g.add_argument("--limit-train-batches", type=_count_or_fraction)
    g.add_argument("--limit-val-batches", type=_count_or_fraction)
    g.add_argument("--resume", help="<run>/checkpoints/last.ckpt: continue that run")
    g.add_argument("--diagnostics", help="all | none | comma list of saturation,condition,grad_flow (default all)")
    g.add_argument("--diag-every", type=int, help="sampling interval in steps for every diagnostic "
                                                  "(default: about 20 samples spread over the run)")
    g.add_argument("--per-layer-scalars", action="store_true",
                   help="also one TensorBoard scalar per layer and statistic (thousands of tags for a 100-layer "
                        "net; every value is in <run>/diagnostics.csv and the depth x time images anyway)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


# -- config files ------------------------------------------------------------------------------------
def _file_argv(parser: argparse.ArgumentParser, values: dict, source: str) -> list[str]:
    """Turn a config file's mapping into command-line flags, so that the same parser checks them."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    argv = []
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        action = actions.get(key)
        if action is None or key == "print_config":
            raise ConfigError(f"{source}: unknown key {raw_key!r}; valid keys: {', '.join(sorted(actions))}")
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {raw_key} must be true or false, got {value!r}")
            if value == isinstance(action, argparse._StoreTrueAction):
                argv.append(flag)  # the flag's own meaning (e.g. progress: false -> --no-progress)
            continue
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        argv += [flag, str(value)]
    return argv


def parse_args(argv=None) -> dict:
    """Explicit values: a ``--config`` file's, then the command line's on top."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = vars(parser.parse_args(argv))
    path = explicit.pop("config", None)
    if path is None:
        return explicit
    from .inputs import load_yaml
    values = load_yaml(path, "--config")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values, got {type(values).__name__}")
    from_file = vars(parser.parse_args(_file_argv(parser, values, f"--config {path}")))
    return {**from_file, **explicit}


def print_config(config: dict) -> None:
    """The merged configuration as YAML that ``--config`` reads back (keys that do not apply left out)."""
    import yaml

    from .config import VAN_ONLY
    skip = set(INTERNAL_KEYS) | (set(VAN_ONLY) if config.get("model") != "van" else set())
    shown = {k: v for k, v in config.items() if k not in skip and not k.startswith("_")}
    sys.stdout.write(yaml.safe_dump(shown, sort_keys=False, default_flow_style=None))


# -- start-up --------------------------------------------------------------------------------------
class CurrentStderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a message comes: while rich's live progress bar draws it
    replaces ``sys.stderr`` and prints what it gets above the bar (a handler that kept the stream it
    was made with wrote into the middle of the bar)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler sets it; the current sys.stderr is always used
        pass


def _setup_logging() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    ours = logging.getLogger("deepplain")
    if not any(getattr(h, "_deepplain", False) for h in ours.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._deepplain = True
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def prepare(explicit: dict) -> tuple[dict, object, str]:
    """The checked configuration, its datamodule (not yet read) and the strategy Lightning will use.

    Everything that can be wrong with the input is found here: nothing has been read or written.
    """
    from . import preflight
    from .checkpoints import check_checkpoint, completed_epochs
    from .config import load_resume_config, merge
    from .training import make_datamodule
    if explicit.get("resume"):
        config = load_resume_config(explicit)
    else:
        config = merge(explicit)
        resumable = _requeued_job_checkpoint(config)
        if resumable is not None:  # a requeued SLURM job continues in its own folder
            config = load_resume_config({**explicit, "resume": str(resumable)})
    if config.get("resume"):
        checkpoint = check_checkpoint(config["resume"])
        done = completed_epochs(checkpoint)
        if done >= config["epochs"]:
            raise ConfigError(f"the run in {config['run_dir']} already finished {done} epoch(s); pass --epochs N with "
                              f"N > {done} to train longer")
        del checkpoint
    requested = str(config["precision"])
    config["precision"], strategy_class, processes = preflight.check_trainer_flags(config)
    aliases = {"16": "16-mixed", "32": "32-true", "64": "64-true", "bf16": "bf16-mixed"}  # Lightning's short forms
    if config["precision"] != aliases.get(requested, requested):
        print(f"note: --precision {requested} runs as {config['precision']} here (recorded in config.json)",
              file=sys.stderr)
    datamodule = make_datamodule(config)
    preflight.check_model_memory(config, datamodule.info(), processes)  # depth, width, options; memory
    preflight.check_batch_limits(config, datamodule.info(), getattr(datamodule, "eval_batch_size", None))
    preflight.check_logdir(config if not config.get("resume") else {**config, "logdir": config["run_dir"], "name": ""})
    if config["dataset"] != "fake":
        datamodule.find_root()  # the files are there (nothing is read yet)
    return config, datamodule, strategy_class


def _resume_lock(config: dict):
    """One process at a time continues a run folder: two resumes of one last.ckpt would train twice into it.
    Held by the launching process only (DDP ranks share the folder by design)."""
    from .inputs import FolderLock
    from .rundir import launcher_rank
    if not config.get("resume") or launcher_rank() != 0 or os.environ.get("LOCAL_RANK", "0") != "0":
        return contextlib.nullcontext()
    return FolderLock(config["run_dir"], "--resume: the run folder")


def _requeued_job_checkpoint(config: dict):
    """Inside a SLURM batch job whose folder already holds a run: its newest checkpoint."""
    from .config import default_name
    from .rundir import slurm_job_folder
    job = slurm_job_folder()
    if job is None:
        return None
    run_dir = Path(config["logdir"]) / default_name(config) / job
    candidates = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name == "last.ckpt"] + list(
        run_dir.glob("hpc_ckpt_*.ckpt"))
    if not (run_dir / "config.json").is_file() or not candidates:
        return None
    return max(candidates, key=lambda p: p.stat().st_mtime)


def main(argv=None) -> int:
    from .datamodules.paths import resolve_data_env
    resolve_data_env()
    _setup_logging()
    try:
        explicit = parse_args(argv)
        show = explicit.pop("print_config", False)
        if show:
            from .config import load_resume_config, merge
            print_config(load_resume_config(explicit) if explicit.get("resume") else merge(explicit))
            return EXIT_OK
        config, datamodule, strategy_class = prepare(explicit)
        from .training import run
        with _resume_lock(config):
            summary = run(config, datamodule, strategy_class)
    except DivergenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except RunFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_IO
    except (ConfigError, DatasetError, DeepplainError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # raised while training: a full disk, a vanished folder
        print(f"error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    status = summary["status"]
    if status in ("interrupted", "preempted"):
        saved = summary["interrupt_checkpoint"]
        where = f"saved {saved}" if saved else "no checkpoint of this step (a second Ctrl-C)"
        resume = summary.get("resume_from")
        print(f"{status}: {where}" + (f"; continue with --resume {resume}" if resume else ""), file=sys.stderr)
    return EXIT_BY_STATUS.get(status, EXIT_BUG)


if __name__ == "__main__":
    sys.exit(main())
