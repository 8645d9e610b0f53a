"""The runner's one hook for observers: each executed attempt is timed into the metrics,
traced (with `DURABLE_YAML_OTEL=1`) and named for log records while it runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dsl import State

from . import tracing
from .metrics import observe_step
from .models import Run
from .transitions import Done, Failed, Outcome, Skipped, Suspended

__all__ = ["observed_attempt", "outcome_name"]


def outcome_name(outcome: Outcome) -> str:
    if isinstance(outcome, Done):
        return "completed"
    if isinstance(outcome, Failed):
        return "failed"
    if isinstance(outcome, Skipped):
        return "skipped"
    if isinstance(outcome, Suspended):
        return "waiting"
    return type(outcome).__name__.lower()


@contextmanager
def observed_attempt(
    run: Run, state: State, attempt: int
) -> Iterator[Callable[[Outcome, float], None]]:
    """Around one attempt's execution; call the function it gives with the outcome and the
    attempt's seconds once it has ended."""
    with tracing.attempt_context(
        run.id, run.workflow_id, run.trigger, state.id, state.kind, attempt
    ) as span:

        def ended(outcome: Outcome, seconds: float) -> None:
            name = outcome_name(outcome)
            observe_step(run.workflow_id, state.id, name, seconds)
            failed = outcome if isinstance(outcome, Failed) else None
            span.ended(
                name,
                failed.error_type if failed else None,
                failed.message if failed else None,
            )

        yield ended
