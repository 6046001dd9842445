"""User-facing errors: each one carries a single line that says what was wrong and what is valid.

The CLI prints ``error: <message>`` for these and exits non-zero without a traceback.
"""


def one_line(exc, limit: int = 200) -> str:
    """An exception's message on one line (white space folded), at most ``limit`` characters: for
    quoting a library's error inside ours."""
    return " ".join(str(exc).split())[:limit]


class DeepplainError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(DeepplainError, ValueError):
    """An invalid model, depth, width, option or flag combination."""


class DatasetError(DeepplainError, RuntimeError):
    """A dataset that is missing, truncated or corrupt."""


class DivergenceError(DeepplainError, RuntimeError):
    """Training produced a non-finite loss or activation."""


class RunFailure(DeepplainError, RuntimeError):
    """The machine stopped the run: a full disk, an unwritable folder, a DDP peer that never came."""
