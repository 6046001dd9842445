"""``train.py`` / ``deepplain-train`` / ``python -m deepplain``: flags, config files and exit codes.

This module parses the flags (derived from ``deepplain.schema``) and config files and maps the
outcome to an exit status; ``deepplain.plan`` checks the run and ``deepplain.training`` carries it
out. Exit statuses:

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
import logging
import sys
import warnings

import yaml

from .callbacks import DIAGNOSTICS
from .callbacks.messages import format_line
from .datamodules.paths import resolve_data_env
from .exits import (EXIT_BAD_INPUT, EXIT_BUG, EXIT_BY_STATUS, EXIT_DIVERGED, EXIT_INTERRUPTED, EXIT_IO, EXIT_OK,
                    describe_exits)
from .errors import ConfigError, DatasetError, DeepplainError, DivergenceError, RunFailure
from .inputs import OneLineParser, load_yaml
from .plan import make_plan, resolve_config
from .presets import describe_presets
from .registry import describe_models
from .resume import resume_lock
from .schema import OPTIONS, RunConfig, add_arguments, argument_groups, to_argv
from .training import run



def build_parser() -> argparse.ArgumentParser:
    """The flags of ``deepplain.schema.RunConfig``, plus ``--config`` and ``--print-config``."""
    p = OneLineParser(
        prog="train.py", argument_default=argparse.SUPPRESS, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a very deep network with or without skip connections, with layer-by-layer diagnostics.",
        epilog="models:\n" + describe_models() + "\n\npresets (--preset NAME; explicit flags override them):\n"
               + describe_presets() + f"\n\nexit status: {describe_exits()}\n"
               "example: python train.py --model van --depth 26   # VAN-26 on CIFAR-10, the paper's recipe")
    groups = argument_groups(p)
    groups["configuration"].add_argument("--config", metavar="FILE.yaml", help="flag values as YAML (keys as printed "
                                         "by --print-config); flags on the command line win")
    groups["configuration"].add_argument("--print-config", action="store_true",
                                         help="print the merged configuration as YAML and exit")
    add_arguments(groups)
    return p


# -- config files ------------------------------------------------------------------------------------
def _file_argv(values: dict, source: str) -> list[str]:
    """Turn a config file's mapping into command-line flags (``schema.to_argv``), so that the same parser
    checks them."""
    keys = sorted(name for name, o in OPTIONS.items() if o.on_command_line)
    named = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in keys:
            raise ConfigError(f"{source}: unknown key {raw_key!r}; valid keys: {', '.join(keys)}")
        if OPTIONS[key].switch and not isinstance(value, bool):
            raise ConfigError(f"{source}: {raw_key} must be true or false, got {value!r}")
        named[key] = value
    return to_argv(named)


def parse_options(argv: list[str], where: str) -> dict:
    """The option values that train.py flags give (name -> value, only those given), read by train.py's own
    parser; a flag it does not know or a bad value is a ConfigError that says ``where`` the flags came from."""
    parser = build_parser()

    def refuse(message):
        raise ConfigError(f"{where}: {message}")
    parser.error = refuse
    return vars(parser.parse_args(list(argv)))


def parse_args(argv=None) -> dict:
    """Explicit values: a ``--config`` file's, then the command line's on top."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = vars(parser.parse_args(argv))
    path = explicit.pop("config", None)
    if path is None:
        return explicit
    values = load_yaml(path, "--config")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path} must be a mapping of flag names to values, got {type(values).__name__}")
    from_file = vars(parser.parse_args(_file_argv(values, f"--config {path}")))
    return {**from_file, **explicit}


def print_config(config: RunConfig) -> None:
    """The merged configuration as YAML that ``--config`` reads back: the options that apply to the
    run's family and have a value (the run's own place and ``--resume`` left out)."""
    shown = {k: v for k, v in config.to_dict().items()
             if OPTIONS[k].on_command_line and k != "resume" and v is not None and config.applies(k)}
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


class OursOnly(logging.Filter):
    """Lightning's rank-zero INFO lines in a train.py run: the diagnostics' own (the probe batch, what the
    condition probe measures), not Lightning's hardware and tips chatter; warnings and errors all pass."""

    PREFIXES = ("deepplain", *(cls.__name__ for cls in DIAGNOSTICS.values()))

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(record.msg).startswith(self.PREFIXES)


def _setup_logging() -> None:
    warnings.formatwarning = format_line  # every warning, in train.py: what happened, not the code that said it
    for chatty in ("mlflow.store.db.utils", "alembic"):  # --logger mlflow: the store's migrations, once per logdir
        logging.getLogger(chatty).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.setLevel(logging.INFO)
    if not any(isinstance(f, OursOnly) for f in rank_zero.filters):
        rank_zero.addFilter(OursOnly())
    ours = logging.getLogger("deepplain")
    if not any(isinstance(h, CurrentStderrHandler) for h in ours.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def main(argv=None) -> int:
    resolve_data_env()
    _setup_logging()
    try:
        explicit = parse_args(argv)
        if explicit.pop("print_config", False):
            print_config(resolve_config(explicit))
            return EXIT_OK
        plan = make_plan(explicit)
        with resume_lock(plan.config):
            summary = run(plan)
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
    if summary.status.resumable:
        saved = summary.interrupt_checkpoint
        where = f"saved {saved}" if saved else "no checkpoint of this step (a second Ctrl-C)"
        resume = summary.resume_from
        print(f"{summary.status}: {where}" + (f"; continue with --resume {resume}" if resume else ""), file=sys.stderr)
    return EXIT_BY_STATUS.get(summary.status, EXIT_BUG)


if __name__ == "__main__":
    sys.exit(main())
