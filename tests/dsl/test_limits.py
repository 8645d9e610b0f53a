"""The limits of `dsl/limits.py` agree with the database columns and the JSON Schema, and the
pure computations they bound never overflow."""

from __future__ import annotations

import math

import pytest

from dsl import RetryPolicy
from dsl import limits as L
from engine.retry import backoff_delay
from engine.store import schema as db
from schemas import workflow_schema


def _length(table: str, column: str) -> int:
    length = db.metadata.tables[table].c[column].type.length
    assert isinstance(length, int)
    return length


def test_limits_fit_the_columns() -> None:
    assert _length("dy_runs", "workflow_id") >= L.WORKFLOW_ID_MAX
    assert _length("dy_runs", "id") >= L.RUN_ID_MAX
    assert _length("dy_runs", "version") >= L.VERSION_MAX
    assert _length("dy_events", "name") >= L.EVENT_NAME_MAX
    assert _length("dy_steps", "wait_event") >= L.EVENT_NAME_MAX
    assert _length("dy_runs", "queue") >= L.QUEUE_NAME_MAX
    assert _length("dy_runs", "current_step") >= L.STEP_ID_MAX
    assert _length("dy_runs", "idempotency_key") >= L.IDEMPOTENCY_KEY_MAX
    assert _length("dy_events", "idempotency_key") >= L.IDEMPOTENCY_KEY_MAX
    assert _length("dy_runs", "concurrency_key") >= L.CONCURRENCY_KEY_MAX


def test_the_schema_repeats_the_limits() -> None:
    schema = workflow_schema()
    top, step = schema["properties"], schema["$defs"]["step"]["properties"]
    retry = schema["$defs"]["retry"]["properties"]
    assert top["id"]["maxLength"] == L.WORKFLOW_ID_MAX
    assert top["version"]["maxLength"] == L.VERSION_MAX
    assert top["trigger"]["properties"]["event"]["maxLength"] == L.EVENT_NAME_MAX
    assert top["queue"]["maxLength"] == top["queue"]["properties"]["name"]["maxLength"]
    assert top["queue"]["maxLength"] == L.QUEUE_NAME_MAX
    assert step["id"]["maxLength"] == L.STEP_ID_MAX
    assert step["send_event"]["maxLength"] == step["wait_for_event"]["maxLength"]
    assert step["send_event"]["maxLength"] == L.EVENT_NAME_MAX
    assert step["run_workflow"]["maxLength"] == L.WORKFLOW_ID_MAX
    assert step["concurrency"]["maximum"] == L.FOR_EACH_CONCURRENCY_MAX
    assert retry["max_attempts"]["maximum"] == L.MAX_ATTEMPTS_MAX
    assert retry["factor"]["maximum"] == L.RETRY_FACTOR_MAX


@pytest.mark.parametrize(
    ("policy", "attempt", "expected"),
    [
        (RetryPolicy(), 1, 1.0),
        (RetryPolicy(), 3, 4.0),
        (RetryPolicy(), 30, 60.0),
        (RetryPolicy(factor=1e300), 1025, 60.0),
        (RetryPolicy(max_attempts=10**9), 10**9, 60.0),
        (RetryPolicy(factor=2, max_delay=float(L.SECONDS_MAX)), 10**6, float(L.SECONDS_MAX)),
        (RetryPolicy(min_delay=math.inf, max_delay=math.inf), 3, float(L.SECONDS_MAX)),
        (RetryPolicy(min_delay=math.nan, max_delay=60), 3, 60.0),
        (RetryPolicy(min_delay=5, max_delay=1), 3, 1.0),
    ],
)
def test_backoff_never_overflows(policy: RetryPolicy, attempt: int, expected: float) -> None:
    assert backoff_delay(policy, attempt, rand=lambda: 1.0) == expected
