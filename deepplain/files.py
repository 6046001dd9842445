"""Writing a file atomically: the one way deepplain replaces config.json, summary.json, a sweep's
results.csv and checkpoints, so that a crash or a full disk leaves the old file or the new one,
never half of one."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", suffix: str = ".tmp", **open_kwargs):
    """A file opened beside ``path``; when the block ends it is flushed, synced and renamed over
    ``path`` (readable by all, 0644); when the block raises it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_file(path) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=_jsonable)
        fh.write("\n")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
