"""Retry decisions and back-off delays: pure functions of the policy, the attempt, the error."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from dsl import RetryPolicy
from dsl.limits import SECONDS_MAX

from .errors import NonRetryableError

__all__ = ["backoff_delay", "is_retryable"]


def backoff_delay(
    policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Delay after failed attempt `attempt` (1-based): min(max, min * factor^(attempt-1)),
    and with jitter a uniform pick between half of it and all of it."""
    delay = _grown(policy, attempt)
    if policy.jitter:
        delay = delay * (0.5 + rand() / 2)
    return delay


def _grown(policy: RetryPolicy, attempt: int) -> float:
    """min(max_delay, min_delay * factor^(attempt-1)) in floats that never overflow:
    the exponent is compared in logarithms before anything is raised to it."""
    ceiling = min(float(policy.max_delay), SECONDS_MAX)
    floor = float(policy.min_delay)
    factor = float(policy.factor)
    if not (math.isfinite(ceiling) and math.isfinite(floor) and math.isfinite(factor)):
        return max(0.0, ceiling) if math.isfinite(ceiling) else float(SECONDS_MAX)
    if floor <= 0 or attempt <= 1 or factor <= 1:
        return max(0.0, min(ceiling, floor * factor ** max(0, attempt - 1)))
    if ceiling <= floor or (attempt - 1) * math.log(factor) >= math.log(ceiling / floor):
        return max(0.0, ceiling)
    return floor * factor ** (attempt - 1)


def is_retryable(policy: RetryPolicy, error: BaseException) -> bool:
    """False for NonRetryableError; with `on:`, only the named classes (or subclasses)."""
    if isinstance(error, NonRetryableError):
        return False
    if not policy.on:
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & set(policy.on))
