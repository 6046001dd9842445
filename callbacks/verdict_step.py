"""When the early verdict is given, and the samples every sampling diagnostic takes up to it.

One rule, read by the sampling schedule (which takes the samples) and by the verdict (which reads them):
the verdict step is 2% of the planned optimizer steps, at least step 50 and at most step 300 (the last
step of a shorter run; step 300 when the run's length is unknown). By then each sampling diagnostic has
taken a sample at step 0, v/4, v/2 and v, whatever its time budget (four points show a trend; they cost
three samples more than the run's spread would take).
"""
from __future__ import annotations

import math
from typing import Optional

from .arguments import check_int

VERDICT_SHARE = 0.02   # of the planned steps: early enough to save most of a doomed run
VERDICT_MIN_STEP = 50  # the signals need some steps to separate (RESULTS section 12)
VERDICT_MAX_STEP = 300  # a long run still hears within minutes
EARLY_FRACTIONS = (0.0, 0.25, 0.5, 1.0)  # of the verdict step: the samples it reads


def verdict_step(total_steps: Optional[int], at_step: Optional[int] = None) -> int:
    """The verdict's optimizer step for a run of ``total_steps`` (None: unknown); ``at_step`` overrides the rule
    (still the last step of a shorter run)."""
    if at_step is not None:
        step = at_step
    elif total_steps is None:
        return VERDICT_MAX_STEP
    else:
        step = min(VERDICT_MAX_STEP, max(VERDICT_MIN_STEP, math.ceil(VERDICT_SHARE * total_steps)))
    return step if total_steps is None else max(0, min(step, total_steps - 1))


def early_steps(step: int) -> list[int]:
    """The steps sampled by every sampling diagnostic up to the verdict at ``step`` (0, v/4, v/2, v)."""
    return sorted({int(round(f * step)) for f in EARLY_FRACTIONS})


def check_step(at_step) -> Optional[int]:
    """A verdict step given by the user: None (the rule) or an integer >= 1."""
    return check_int("verdict step", at_step, allow_none=True,
                     what=f"a positive integer or None ({VERDICT_SHARE:.0%} of the planned steps, {VERDICT_MIN_STEP} "
                          f"to {VERDICT_MAX_STEP})")
