"""Run folders that are never overwritten, and files written atomically."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

RUN_DIR_ENV = "DEEPPLAIN_RUN_DIR"  # set by rank zero so DDP worker processes log into the same run


def reserve_run_dir(logdir: str | os.PathLike, name: str) -> Path:
    """Create and return ``<logdir>/<name>/version_N`` for the first N not taken (atomic mkdir)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(inherited)
    base = Path(logdir) / name
    base.mkdir(parents=True, exist_ok=True)
    external_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if os.environ.get("WORLD_SIZE", "1") != "1" and external_id and external_id != "none" and not inherited:
        # torchrun / SLURM start every rank independently: name the run after the job so they agree.
        run = base / f"job_{external_id}"
        run.mkdir(exist_ok=True)
        return run
    while True:
        taken = [int(m.group(1)) for p in base.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
        run = base / f"version_{max(taken, default=-1) + 1}"
        try:
            run.mkdir()
        except FileExistsError:  # another process took it first
            continue
        os.environ[RUN_DIR_ENV] = str(run)
        return run


def atomic_write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True, default=_jsonable)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)
