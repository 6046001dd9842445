"""Where datasets are looked for: ``--data-dir`` alone when given, else ``$DEEPPLAIN_DATA``, then ``./data``."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "DEEPPLAIN_DATA"


def resolve_data_env() -> None:
    """Make ``$DEEPPLAIN_DATA`` absolute, against the directory the program was started from.

    Called once at start-up by every entry point, so that processes started later in another
    directory (DDP workers, sweep runs) find the same folder.
    """
    value = os.environ.get(ENV_VAR)
    if value:
        os.environ[ENV_VAR] = str(Path(value).expanduser().absolute())


def candidate_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The data folders to search, in order, without duplicates.

    An explicit ``data_dir`` is authoritative: it is the only folder searched. Without one,
    ``$DEEPPLAIN_DATA`` and then ``./data``.
    """
    if data_dir is not None and str(data_dir) != "":
        return [Path(data_dir).expanduser()]
    roots = []
    for root in (os.environ.get(ENV_VAR) or None, "data"):
        if root is None:
            continue
        path = Path(root).expanduser()
        if path.resolve() not in [r.resolve() for r in roots]:
            roots.append(path)
    return roots


def describe_roots(data_dir: str | os.PathLike | None = None) -> str:
    """Where :func:`candidate_roots` took its folders from, for messages: ``--data-dir``, or ``$DEEPPLAIN_DATA``
    and ``./data``, or ``./data`` alone when ``$DEEPPLAIN_DATA`` is not set."""
    if data_dir is not None and str(data_dir) != "":
        return "--data-dir"
    return f"${ENV_VAR}, then ./data" if os.environ.get(ENV_VAR) else f"./data; ${ENV_VAR} is not set"


def first_existing(root: Path, alternatives: list[str]) -> Path | None:
    """The first of ``alternatives`` (paths relative to ``root``) that exists under ``root``."""
    for rel in alternatives:
        path = root / rel
        if path.is_file():
            return path
    return None
