"""Claiming from queues on both backends: priority, FIFO within a priority, delays, limits
per queue and per key, no key starving the others; idempotency keys."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from engine.models import Lease, NewRun, QueueLimits, RunStatus, Transition
from engine.runner import new_run_id
from engine.store import SqlStore, open_store

NOW = 2_147_155_200.0  # 2038-01-15T08:00:00Z: ahead of the real clock (claims stamp the later)


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = open_store(db_url)
    s.save_definition("h", "wf", "1", {}, "")
    yield s
    s.close()


def lease(name: str) -> Lease:
    return Lease(name, "test-host", os.getpid())


def queue(
    store: SqlStore,
    run_id: str,
    *,
    q: str = "q",
    priority: int = 0,
    key: str | None = None,
    at: float = NOW,
    available_at: float | None = None,
) -> None:
    store.send(
        [
            NewRun(
                id=run_id,
                workflow_id="wf",
                version="1",
                definition_hash="h",
                payload={},
                first_step="s",
                queue=q,
                priority=priority,
                concurrency_key=key,
                available_at=available_at,
            )
        ],
        at,
    )


def claimed(store: SqlStore, n: int, now: float = NOW + 1) -> list[str]:
    out = []
    for i in range(n):
        run = store.claim_next_run(lease(f"w{i}"), now)
        if run is None:
            break
        out.append(run.id)
    return out


def test_priority_then_fifo(store: SqlStore) -> None:
    queue(store, "low-old", priority=0, at=NOW - 30)
    queue(store, "high-new", priority=5, at=NOW - 10)
    queue(store, "high-old", priority=5, at=NOW - 20)
    queue(store, "low-new", priority=0, at=NOW - 5)
    assert claimed(store, 5) == ["high-old", "high-new", "low-old", "low-new"]


def test_delayed_runs_wait_for_their_time(store: SqlStore) -> None:
    queue(store, "later", available_at=NOW + 60)
    assert claimed(store, 1, now=NOW + 1) == []
    assert claimed(store, 1, now=NOW + 61) == ["later"]


def test_queue_limit_and_key_limit(store: SqlStore) -> None:
    store.save_queue_limits([QueueLimits("q", concurrency=2), QueueLimits("k", concurrency=1)])
    for i in range(4):
        queue(store, f"q{i}", at=NOW + i * 0.01)
    assert claimed(store, 4) == ["q0", "q1"]
    # a busy key never starves the others: a's backlog is skipped, b and c run
    for i in range(20):
        queue(store, f"a{i:02d}", q="k", key="a", at=NOW + 1 + i * 0.01)
    queue(store, "b0", q="k", key="b", at=NOW + 2)
    queue(store, "c0", q="k", key="c", at=NOW + 3)
    got = []
    for i in range(5):
        run = store.claim_next_run(lease(f"k{i}"), NOW + 10, ["k"])
        if run:
            got.append(run.id)
    assert got == ["a00", "b0", "c0"]


def test_finished_runs_free_their_slot(store: SqlStore) -> None:
    store.save_queue_limits([QueueLimits("q", concurrency=1)])
    queue(store, "one", at=NOW)
    queue(store, "two", at=NOW + 0.1)
    (first,) = claimed(store, 2)
    store.commit_transition(first, lease("w0"), Transition(RunStatus.COMPLETED), NOW + 2)
    assert claimed(store, 1, now=NOW + 3) == ["two"]


def test_rate_limit_counts_starts_in_the_window(store: SqlStore) -> None:
    store.save_queue_limits([QueueLimits("r", rate_limit=2, rate_period=10)])
    for i in range(4):
        queue(store, f"r{i}", q="r", at=NOW + i * 0.01)
    assert claimed(store, 4, now=NOW + 1) == ["r0", "r1"]
    assert claimed(store, 4, now=NOW + 5) == []
    assert claimed(store, 4, now=NOW + 11.5) == ["r2", "r3"]


def test_idempotency_key_creates_one_set_of_runs_and_frees_after_failure(store: SqlStore) -> None:
    first = new_run_id()
    sent = store.send([_run(first)], NOW, idempotency_key="k")
    assert sent.run_ids == (first,) and not sent.duplicate
    again = store.send([_run(new_run_id())], NOW + 1, idempotency_key="k")
    assert again.duplicate and again.run_ids == (first,)
    assert len(store.list_runs()) == 1
    store.claim_run(first, lease("w"), NOW + 2)
    store.commit_transition(first, lease("w"), Transition(RunStatus.FAILED, error="boom"), NOW + 3)
    retry = store.send([_run("second")], NOW + 4, idempotency_key="k")
    assert retry.run_ids == ("second",) and not retry.duplicate
    expired = store.send([_run("third")], NOW + 31 * 86400, idempotency_key="k")
    assert expired.run_ids == ("third",)


def _run(run_id: str) -> NewRun:
    return NewRun(
        id=run_id,
        workflow_id="wf",
        version="1",
        definition_hash="h",
        payload={},
        first_step="s",
        queue="q",
    )


def test_a_full_key_never_blocks_recovering_its_own_expired_leases(store: SqlStore) -> None:
    """Runs of a dead worker hold their key's slots; queued runs of that key come first in
    order and are refused, yet the dead worker's runs must still be taken over."""
    store.save_queue_limits([QueueLimits("k", concurrency=2)])
    queue(store, "zombie1", q="k", key="a", at=NOW + 5)
    queue(store, "zombie2", q="k", key="a", at=NOW + 5.1)
    dead = Lease("dead-worker", "elsewhere", 1, seconds=5)
    assert store.claim_next_run(dead, NOW + 6) is not None
    assert store.claim_next_run(dead, NOW + 6) is not None
    for i in range(3):  # older than the zombies' lease expiry: first in claim order
        queue(store, f"queued{i}", q="k", key="a", at=NOW + i * 0.01)
    taken = [store.claim_next_run(lease(f"w{i}"), NOW + 100) for i in range(3)]
    assert sorted(r.id for r in taken if r) == ["zombie1", "zombie2"]


def test_expired_idempotency_keys_are_purged(store: SqlStore) -> None:
    store.send([_run("old")], NOW, idempotency_key="old-key")
    store.send([_run("new")], NOW + 20 * 86400, idempotency_key="new-key")
    assert store.purge_idempotency_keys(NOW + 31 * 86400) == 1
    assert store.send([_run("again")], NOW + 31 * 86400, idempotency_key="new-key").duplicate


def test_a_full_key_in_one_queue_leaves_that_key_in_another_queue_alone(store: SqlStore) -> None:
    """Issue #10 cause 6: concurrency keys are scoped per queue."""
    store.save_queue_limits([QueueLimits("qa", concurrency=1), QueueLimits("qb", concurrency=1)])
    queue(store, "qa-held", q="qa", key="u1", at=NOW)
    queue(store, "qa-next", q="qa", key="u1", at=NOW + 0.1)
    queue(store, "qb-first", q="qb", key="u1", at=NOW + 0.2)
    assert claimed(store, 3) == ["qa-held", "qb-first"]


def test_no_number_of_full_keys_hides_a_claimable_run(store: SqlStore) -> None:
    """Issue #10 cause 6: 600 full keys, each with a queued run older than the one run
    that may start, and the claim still finds it (the old search gave up after ~170)."""
    store.save_queue_limits([QueueLimits("k", concurrency=1)])
    holder = Lease("holder", "elsewhere", 1, seconds=3600)
    for i in range(600):
        queue(store, f"run{i:03d}", q="k", key=f"u{i}", at=NOW + i * 0.001)
    for i in range(600):  # one run of each key is executing: every key is full
        assert store.claim_run(f"run{i:03d}", holder, NOW + 1).status == RunStatus.RUNNING
    for i in range(600):
        queue(store, f"next{i:03d}", q="k", key=f"u{i}", at=NOW + 2 + i * 0.001)
    queue(store, "free", q="k", key="fresh", at=NOW + 5)
    assert claimed(store, 2, now=NOW + 10) == ["free"]
