"""Retry decisions and back-off delays: pure functions of the policy, the attempt, the error."""

from __future__ import annotations

import random
from collections.abc import Callable

from dsl import RetryPolicy

from .errors import NonRetryableError

__all__ = ["backoff_delay", "is_retryable"]


def backoff_delay(
    policy: RetryPolicy, attempt: int, rand: Callable[[], float] = random.random
) -> float:
    """Delay after failed attempt `attempt` (1-based): min(max, min * factor^(attempt-1)),
    and with jitter a uniform pick between half of it and all of it."""
    delay: float = min(policy.max_delay, policy.min_delay * policy.factor ** (attempt - 1))
    if policy.jitter:
        delay = delay * (0.5 + rand() / 2)
    return delay


def is_retryable(policy: RetryPolicy, error: BaseException) -> bool:
    """False for NonRetryableError; with `on:`, only the named classes (or subclasses)."""
    if isinstance(error, NonRetryableError):
        return False
    if not policy.on:
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & set(policy.on))
