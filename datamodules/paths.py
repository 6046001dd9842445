"""Where datasets are looked for: ``--data-dir``, then ``$DEEPPLAIN_DATA``, then ``./data``."""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "DEEPPLAIN_DATA"


def candidate_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The data folders to search, in order, without duplicates."""
    roots = []
    for root in (data_dir, os.environ.get(ENV_VAR) or None, "data"):
        if root is None:
            continue
        path = Path(root).expanduser()
        if path.resolve() not in [r.resolve() for r in roots]:
            roots.append(path)
    return roots


def first_existing(root: Path, alternatives: list[str]) -> Path | None:
    """The first of ``alternatives`` (paths relative to ``root``) that exists under ``root``."""
    for rel in alternatives:
        path = root / rel
        if path.is_file():
            return path
    return None
