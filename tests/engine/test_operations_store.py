"""Operating many runs, at the store, on both backends: search by tags and time, TTL expiry
and its race with a claim, bulk cancel and its race with a claim, queue pause and its race
with a claim, and every `blocked_by` reason from a real state."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from engine.errors import NotFound
from engine.models import Lease, NewRun, QueueLimits, RunFilter, RunStatus, WorkerInfo
from engine.pauses import pause_at
from engine.store import SqlStore, open_store

NOW = 2_147_155_200.0  # 2038-01-15T08:00:00Z: ahead of the real clock (claims stamp the later)


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = open_store(db_url)
    s.save_definition("h", "wf", "1", {}, "")
    s.save_queue_limits([QueueLimits("q")])
    yield s
    s.close()


def lease(name: str) -> Lease:
    return Lease(name, "test-host", os.getpid())


def new(run_id: str, **kw: object) -> NewRun:
    values: dict[str, object] = {
        "id": run_id,
        "workflow_id": "wf",
        "version": "1",
        "definition_hash": "h",
        "payload": {},
        "first_step": "s",
        "queue": "q",
    }
    values.update(kw)
    return NewRun(**values)  # type: ignore[arg-type]


def queue(store: SqlStore, run_id: str, at: float = NOW, **kw: object) -> None:
    store.send([new(run_id, **kw)], at)


# search ---------------------------------------------------------------------------------------
def test_tag_search_is_newest_first_and_combines_filters(store: SqlStore) -> None:
    for i in range(6):
        tags = ("tenant:a",) if i % 2 == 0 else ("tenant:b",)
        if i in (2, 4):
            tags += ("plan:pro",)
        queue(store, f"r{i}", at=NOW + i, tags=tags)
    found = store.search_runs(RunFilter(tags=("tenant:a",)), 10)
    assert [r.id for r in found] == ["r4", "r2", "r0"]
    assert found[0].tags == ("tenant:a", "plan:pro")
    both = RunFilter(tags=("tenant:a", "plan:pro"))
    assert [r.id for r in store.search_runs(both, 10)] == ["r4", "r2"]
    assert store.count_runs(both) == 2
    # the keyset cursor pages through a tag's rows
    page = store.search_runs(RunFilter(tags=("tenant:a",)), 1, before=(NOW + 4, "r4"))
    assert [r.id for r in page] == ["r2"]
    window = RunFilter(tags=("tenant:b",), since=NOW + 1, until=NOW + 5)
    assert [r.id for r in store.search_runs(window, 10)] == ["r3", "r1"]
    assert store.search_runs(RunFilter(tags=("tenant:a",), workflow_id="other"), 10) == []
    assert store.count_runs(RunFilter(statuses=(RunStatus.QUEUED,), ids=("r1", "r5"))) == 2
    batches = list(store.run_id_batches(RunFilter(), 4))
    assert batches == [["r5", "r4", "r3", "r2"], ["r1", "r0"]]


# TTL ------------------------------------------------------------------------------------------
def test_a_queued_run_past_its_ttl_expires_and_never_starts(store: SqlStore) -> None:
    queue(store, "short", ttl=10.0)
    queue(store, "long", ttl=1000.0, at=NOW + 1)
    run = store.get_run("short")
    assert run.expires_at == NOW + 10
    assert store.expire_runs(NOW + 5) == []
    # a claim meets the expired run first (FIFO): it expires it and takes the next one
    taken = store.claim_next_run(lease("w"), NOW + 11)
    assert taken is not None and taken.id == "long"
    short = store.get_run("short")
    assert short.status == RunStatus.EXPIRED and short.started_at is None
    assert short.finished_at is not None and short.lease_owner is None
    queue(store, "swept", ttl=1.0, at=NOW + 2)
    assert store.expire_runs(NOW + 10) == ["swept"]
    assert store.get_run("swept").status == RunStatus.EXPIRED


def test_expiry_never_ends_a_run_a_claim_started_in_between(store: SqlStore) -> None:
    """The sweep selected the run; a claim starts it before the sweep's UPDATE: the UPDATE is
    conditional on status 'queued', so the run keeps running (PostgreSQL: the claim skips the
    row the sweep holds, so the sweep wins instead; both orders are consistent)."""
    queue(store, "r", ttl=5.0)
    claims: list[object] = []
    threads: list[threading.Thread] = []

    def claim_in_between() -> None:
        # another connection claims while the sweep is between its SELECT and its UPDATE
        t = threading.Thread(
            target=lambda: claims.append(store.claim_next_run(lease("w"), NOW + 4))
        )
        threads.append(t)
        t.start()
        t.join(1.0)  # SQLite: blocked behind the sweep's write lock until it commits

    with pause_at("store.expire.selected", claim_in_between):
        expired = store.expire_runs(NOW + 6)
    for t in threads:
        t.join(10)
    run = store.get_run("r")
    if expired:
        assert run.status == RunStatus.EXPIRED and run.started_at is None
        assert claims in ([None], [])
    else:
        assert run.status == RunStatus.RUNNING
    assert not (run.status == RunStatus.EXPIRED and run.lease_owner)


def test_a_claim_that_started_a_run_wins_over_the_sweep(store: SqlStore) -> None:
    queue(store, "r", ttl=5.0)
    assert store.claim_next_run(lease("w"), NOW + 4) is not None
    assert store.expire_runs(NOW + 6) == []
    assert store.get_run("r").status == RunStatus.RUNNING


# bulk cancel ----------------------------------------------------------------------------------
def test_bulk_cancel_counts_each_run_once_and_flags_one_claimed_in_between(
    store: SqlStore,
) -> None:
    for i in range(5):
        queue(store, f"r{i}", at=NOW + i)
    ids = next(store.run_id_batches(RunFilter(statuses=(RunStatus.QUEUED,)), 500))
    # a worker claims one after the ids were read, before the cancel writes
    started = store.claim_next_run(lease("w"), NOW + 10)
    assert started is not None
    assert store.cancel_runs_batch(ids, NOW + 11) == 5
    statuses = {i: store.get_run(i) for i in ids}
    assert statuses[started.id].status == RunStatus.RUNNING
    assert statuses[started.id].cancel_requested  # its holder stops at the next step
    assert sum(r.status == RunStatus.CANCELLED for r in statuses.values()) == 4
    # again: nothing is cancelled twice
    assert store.cancel_runs_batch(ids, NOW + 12) == 0


def test_two_concurrent_bulk_cancels_cancel_each_run_once(store: SqlStore) -> None:
    store.send([new(f"r{i:03}") for i in range(200)], NOW)
    ids = [f"r{i:03}" for i in range(200)]
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda: counts.append(store.cancel_runs_batch(ids, NOW + 1)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counts) == [0, 200]
    assert store.count_runs(RunFilter(statuses=(RunStatus.CANCELLED,))) == 200


# pause ----------------------------------------------------------------------------------------
def test_a_paused_queue_starts_nothing_until_resumed(store: SqlStore) -> None:
    queue(store, "r")
    store.set_queue_paused("q", True, NOW)
    assert store.claim_next_run(lease("w"), NOW + 1) is None
    assert store.claim_run("r", lease("w"), NOW + 1, within_limits=True).status == RunStatus.QUEUED
    assert next(s for s in store.queue_stats() if s["name"] == "q")["paused"] is True
    store.set_queue_paused("q", False, NOW + 2)
    taken = store.claim_next_run(lease("w"), NOW + 3)
    assert taken is not None and taken.id == "r"
    with pytest.raises(NotFound, match="no queue named 'nope'"):
        store.set_queue_paused("nope", True, NOW)


def test_pause_waits_for_a_claim_holding_the_queue_and_later_claims_see_it(
    store: SqlStore,
) -> None:
    """A claim has read `paused` under the queue row's lock; a pause issued then returns
    only after that claim committed, and no claim after the pause starts anything. (On
    PostgreSQL, the full look's: the one-statement claim holds its locks inside one
    statement, see test_hot_path's pause held open.)"""
    store.queues._fresh_off_until = float("inf")
    queue(store, "first")
    queue(store, "second", at=NOW + 1)
    order: list[str] = []
    in_claim, release = threading.Event(), threading.Event()

    def hold() -> None:
        if threading.current_thread().name == "claimer":
            in_claim.set()
            release.wait(10)

    def claim() -> None:
        store.claim_next_run(lease("a"), NOW + 2)
        order.append("claim committed")

    def pause() -> None:
        store.set_queue_paused("q", True, NOW + 2)
        order.append("pause returned")

    with pause_at("store.claim.queues_locked", hold):
        claimer = threading.Thread(target=claim, name="claimer")
        claimer.start()
        assert in_claim.wait(10)
        pauser = threading.Thread(target=pause, name="pauser")
        pauser.start()
        pauser.join(0.5)
        assert order == []  # the pause waits for the claim's lock
        release.set()
        claimer.join(10)
        pauser.join(10)
    assert order == ["claim committed", "pause returned"]
    assert store.get_run("first").status == RunStatus.RUNNING
    assert store.claim_next_run(lease("b"), NOW + 3) is None
    assert store.get_run("second").status == RunStatus.QUEUED


# blocked_by -----------------------------------------------------------------------------------
def worker(store: SqlStore, wid: str = "wk", queues: tuple[str, ...] = (), n: int = 4) -> None:
    store.register_worker(
        WorkerInfo(wid, "test-host", os.getpid(), queues, n, lease_seconds=1e9), NOW
    )


def test_blocked_by_names_each_reason_from_the_real_state(store: SqlStore) -> None:
    def why(run_id: str, at: float = NOW + 1) -> str | None:
        found = store.blocked_by(store.get_run(run_id), at)
        return None if found is None else f"{found['reason']}: {found['detail']}"

    queue(store, "r")
    assert why("r") == "no_worker: no live worker serves queue q"
    worker(store, "other", queues=("elsewhere",))
    assert why("r") == "no_worker: no live worker serves queue q"
    worker(store)
    assert why("r") is None
    store.set_queue_paused("q", True, NOW)
    assert why("r") == "queue_paused: queue q is paused"
    store.set_queue_paused("q", False, NOW)
    queue(store, "later", available_at=NOW + 3600)
    assert why("later") == "delayed: delayed until 2038-01-15T09:00:00+00:00"
    assert store.get_run("later").not_before == NOW + 3600
    # concurrency 1: one running fills the queue
    store.save_queue_limits([QueueLimits("one", concurrency=1)])
    queue(store, "a1", queue="one")
    queue(store, "a2", queue="one", at=NOW + 0.5)
    assert store.claim_next_run(Lease("wk/0", "h", os.getpid()), NOW + 1) is not None
    assert why("a2") == "queue_full: queue one is full (1/1 running)"
    # per key: u1 is full, u2 is not
    store.save_queue_limits([QueueLimits("keyed", concurrency=1)])
    queue(store, "k1", queue="keyed", concurrency_key="u1", priority=9)
    queue(store, "k2", queue="keyed", concurrency_key="u1", at=NOW + 0.5)
    queue(store, "k3", queue="keyed", concurrency_key="u2", at=NOW + 0.6)
    assert store.claim_next_run(Lease("wk/1", "h", os.getpid()), NOW + 1, ["keyed"]) is not None
    assert why("k2") == "key_full: concurrency key 'u1' of queue keyed is full (1/1 running)"
    assert why("k3") is None
    # rate: 1 start per minute
    store.save_queue_limits([QueueLimits("rated", rate_limit=1, rate_period=60.0)])
    queue(store, "s1", queue="rated")
    queue(store, "s2", queue="rated", at=NOW + 0.5)
    assert store.claim_next_run(Lease("wk/2", "h", os.getpid()), NOW + 1, ["rated"]) is not None
    found = store.blocked_by(store.get_run("s2"), NOW + 2)
    assert found is not None and found["reason"] == "rate_limited"
    assert found["until"] == "2038-01-15T08:01:01+00:00"
    # every executor slot of the only worker serving the queue is busy
    store.deregister_worker("wk")
    store.save_queue_limits([QueueLimits("solo")])
    worker(store, "solo-w", queues=("solo",), n=1)
    queue(store, "b1", queue="solo")
    queue(store, "b2", queue="solo", at=NOW + 0.5)
    assert store.claim_next_run(Lease("solo-w/0", "h", os.getpid()), NOW + 1, ["solo"])
    assert why("b2", NOW + 2) == (
        "workers_busy: all 1 executor slot(s) of the workers serving solo are busy"
    )
    assert store.blocked_by(store.get_run("b1"), NOW + 2) is None  # running: not blocked


# retention ------------------------------------------------------------------------------------
def test_a_purge_whose_batch_another_purge_took_goes_on(store: SqlStore) -> None:
    """Two purges at once (a worker's and `runs purge`): the other deletes the batch this
    one chose, so this one's DELETE finds nothing. It must go on with the rest, not stop as
    if nothing were left (on PostgreSQL it stopped with runs still to purge)."""
    for i in range(4):
        queue(store, f"r{i}")
        store.request_cancel(f"r{i}", NOW + 1)
    before = NOW + 10
    others: list[int] = []
    threads: list[threading.Thread] = []

    def other_purge() -> None:
        if threads:
            return
        batches = store.purge_runs(before, [RunStatus.CANCELLED], batch=2)
        threads.append(threading.Thread(target=lambda: others.append(next(batches, 0))))
        threads[0].start()
        threads[0].join(1.0)  # PostgreSQL: done; SQLite: waits for this purge's write lock

    with pause_at("store.purge.selected", other_purge):
        mine = list(store.purge_runs(before, [RunStatus.CANCELLED], batch=2))
    threads[0].join(30)
    assert sum(mine) + sum(others) == 4
    assert store.count_runs(RunFilter()) == 0
