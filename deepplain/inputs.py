"""Reading what a user hands the entry points (train.py, sweep, plots, curves, experiments), one way.

Every fault is a :class:`~deepplain.errors.ConfigError` with one line naming the file and what is
wrong with it: a file that is not text, a YAML file with aliases or of a size beyond reason, a
results CSV with a malformed row, an output path that is a file or cannot be written. The entry
points print it and exit 2 before anything is trained or written.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import io
import os
from pathlib import Path
from typing import Optional

import yaml

from .errors import ConfigError, one_line
from .exits import EXIT_BAD_INPUT
from .rundir import LOCK_FILE

MAX_TEXT_BYTES = 1 << 20  # a configuration or results file larger than 1 MiB is not one a person wrote


def read_text(path, what: str, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``; one-line errors for a missing, unreadable, binary or oversized file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ConfigError(f"{what} {path} is not a file")
        if size > max_bytes:
            raise ConfigError(f"{what} {path} is {size:,} bytes; at most {max_bytes:,} are read "
                              "(is it the right file?)")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if b"\0" in data:
        raise ConfigError(f"{what} {path} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})") \
            from None


def load_yaml(path, what: str = "--config"):
    """A YAML file of plain values: aliases and anchors are refused (a few bytes of them can expand to
    gigabytes), as is anything that is not valid YAML."""
    text = read_text(path, what)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(f"{what} {path} uses YAML anchors/aliases (&name, *name); write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML ({one_line(exc)})") from None


def output_dir(path, what: str = "--out") -> Path:
    """``path`` as a folder that exists (created) and can be written; one-line errors otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be created ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable")
    return path


def output_file(path, suffix: str, what: str = "--out") -> Path:
    """``path`` as a file to write: a folder or a name without ``suffix`` is refused (so the path printed
    is the path written); its folder is created."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() != suffix:
        raise ConfigError(f"{what} {path} must be a {suffix} file name (e.g. {Path(path.name or 'out').stem}{suffix})")
    output_dir(path.parent if str(path.parent) else Path("."), f"the folder of {what}")
    return path


def read_results_csv(path, required=("run_id", "model", "depth", "seed", "status")) -> list[dict]:
    """The rows of a sweep's results.csv, checked: the header has ``required``, every row has as many
    fields as the header, and depth and seed are integers."""
    text = read_text(path, "results CSV", max_bytes=64 * MAX_TEXT_BYTES).removeprefix("\ufeff")  # Excel's BOM
    reader = csv.reader(io.StringIO(text, newline=""))  # the csv module, not splitlines, decides where rows end
    header = next(reader, None)
    missing = [c for c in required if c not in (header or [])]
    if missing:
        raise ConfigError(f"results CSV {path} has no {', '.join(missing)} column (not a deepplain sweep's CSV?)")
    rows = []
    for line, fields in enumerate(reader, start=2):
        if not fields:
            continue
        if len(fields) != len(header):
            raise ConfigError(f"results CSV {path}, line {line}: {len(fields)} fields, the header has {len(header)}")
        row = dict(zip(header, fields))
        where = f"results CSV {path}, line {line}"
        for key, low in (("depth", 1), ("seed", 0)):
            try:
                value = int(row[key])
            except ValueError:
                raise ConfigError(f"{where}: {key} {row[key]!r} is not an integer") from None
            if value < low:
                raise ConfigError(f"{where}: {key} {value} is below {low}")
        for key in ("train_acc", "val_acc", "test_acc"):  # a share in [0, 1], or empty (not measured)
            if row.get(key, "") == "":
                continue
            try:
                value = float(row[key])
            except ValueError:
                raise ConfigError(f"{where}: {key} {row[key]!r} is not a number") from None
            if not 0.0 <= value <= 1.0:  # NaN fails this too
                raise ConfigError(f"{where}: {key} {row[key]} is not an accuracy in [0, 1]")
        rows.append(row)
    return rows


class FolderLock:
    """An exclusive lock on a folder, held while one process writes into it (``with FolderLock(dir, what):``).

    An OS file lock (flock) on ``<dir>/.lock``: a process that dies, however it dies, releases it, so it is
    never left stuck. A second process gets one line naming the holder's pid."""

    def __init__(self, folder, what: str):
        self.path, self.what, self._fh = Path(folder) / LOCK_FILE, what, None

    def __enter__(self) -> "FolderLock":
        self._fh = open(self.path, "a+")
        holder = _lock_or_holder(self._fh)
        if holder is not None:
            self._fh.close()
            self._fh = None
            raise ConfigError(f"{self.what} {self.path.parent} is in use by another process (pid {holder}); wait for "
                              "it to finish or stop it") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(str(os.getpid()))
        self._fh.flush()
        return self

    def __exit__(self, *exc) -> bool:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        return False

    @staticmethod
    def holder(folder) -> Optional[str]:
        """The pid of the live process that holds ``folder``'s lock, or None when nobody does (tried, not taken)."""
        path = Path(folder) / LOCK_FILE
        if not path.is_file():
            return None
        with open(path, "a+") as fh:
            holder = _lock_or_holder(fh)
            if holder is None:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return holder


def _lock_or_holder(fh) -> Optional[str]:
    """Take the exclusive lock on the open lock file ``fh`` without waiting: None when taken, else the pid that the
    process holding it wrote there ("?" when it wrote none yet)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        return fh.read().strip() or "?"
    return None


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a single line on stderr and exit status 2 (bad input), as in
    every deepplain entry point."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")
