"""Operating many runs through the engine, on both backends: tags, priority and TTL from
trigger/send_event, ctx.metadata stored with the step, search, bulk cancel and replay, and
retention that leaves nothing orphaned in any table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.errors import PayloadInvalid
from engine.models import NewRun, RunFilter, RunStatus
from engine.registry import import_modules
from engine.service import Engine
from engine.settings import resolve_settings
from engine.store import schema as t

OPS = Path(__file__).parent / "ops"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    import_modules(["opssteps"], str(OPS))
    e = Engine(resolve_settings(db=db_url, workflows=str(OPS)), import_steps=False)
    yield e
    e.close()


def test_trigger_and_send_take_tags_priority_and_ttl(engine: Engine) -> None:
    sent = engine.trigger(
        "marked", {"n": 1}, tags=["tenant:acme", "plan:pro"], priority=7, ttl=60, delay=30
    )
    run = engine.store.get_run(sent.run_ids[0])
    assert run.tags == ("tenant:acme", "plan:pro") and run.priority == 7
    assert run.expires_at == pytest.approx(run.created_at + 60)
    assert run.not_before == pytest.approx(run.created_at + 30)
    by_event = engine.send_event("job.created", {"n": 2}, tags=["tenant:acme"])
    assert engine.store.get_run(by_event.run_ids[0]).priority == 0  # the workflow's default
    acme = engine.list_runs(RunFilter(tags=("tenant:acme",)), 10)
    assert [r.id for r in acme] == [by_event.run_ids[0], run.id]
    assert engine.count_runs(RunFilter(tags=("tenant:acme", "plan:pro"))) == 1
    for bad, field in (
        ({"tags": ["nocolon"]}, "tags[0]"),
        ({"tags": "tenant:a"}, "tags"),
        ({"tags": [":v"]}, "tags[0]"),
        ({"priority": True}, "priority"),
        ({"ttl": -1}, "ttl"),
    ):
        with pytest.raises(PayloadInvalid) as err:
            engine.trigger("marked", {"n": 1}, **bad)  # type: ignore[arg-type]
        assert err.value.field == field
    assert engine.count_runs(RunFilter()) == 2, "nothing half-written"


def test_step_metadata_is_stored_with_the_result(engine: Engine) -> None:
    done = engine.run(engine.workflow("marked"), {"n": 3}, tags=["batch:7"])
    assert done.status == RunStatus.COMPLETED
    stored = engine.store.get_run(done.id)
    assert stored.metadata == {"n": 3, "stage": "marked"} and stored.tags == ("batch:7",)
    failed = engine.run(engine.workflow("marked"), {"n": -1})
    assert failed.status == RunStatus.FAILED
    assert engine.store.get_run(failed.id).metadata == {"n": -1, "stage": "marked"}
    bad = engine.run(engine.workflow("badmeta"), {})
    assert bad.status == RunStatus.FAILED and "metadata" in (bad.error or "")
    assert engine.store.get_run(bad.id).metadata == {}


def test_bulk_cancel_and_replay_by_filter(engine: Engine) -> None:
    for i in range(7):
        engine.trigger("marked", {"n": i}, tags=["wave:1"] if i < 5 else ["wave:2"])
    seen: list[tuple[int, int]] = []
    wave1 = RunFilter(tags=("wave:1",))
    assert engine.count_cancellable(wave1) == 5
    assert engine.cancel_runs(wave1, lambda done, total: seen.append((done, total))) == 5
    assert seen[-1] == (5, 5)
    assert engine.cancel_runs(wave1) == 0  # none twice
    assert engine.count_runs(RunFilter(statuses=(RunStatus.CANCELLED,))) == 5
    assert engine.cancel_runs(RunFilter(tags=("wave:1",), statuses=(RunStatus.COMPLETED,))) == 0
    replays = engine.replay_runs(RunFilter(tags=("wave:1",), statuses=(RunStatus.CANCELLED,)))
    assert len(replays) == 5
    again = [engine.store.get_run(r) for r in replays]
    assert all(r.status == RunStatus.QUEUED and r.tags == ("wave:1",) for r in again)
    assert {r.trigger["replay_of"] for r in again} <= {
        r.id for r in engine.list_runs(RunFilter(statuses=(RunStatus.CANCELLED,)), 10)
    }


def _dependents(engine: Engine) -> dict[str, int]:
    """Rows of every dy_* table that point at a run that does not exist (or, for
    definitions, that no run uses)."""
    runs = sa.select(t.runs.c.id)
    checks = {
        "steps": sa.select(sa.func.count()).where(t.steps.c.run_id.not_in(runs)),
        "attempts": sa.select(sa.func.count()).where(t.attempts.c.run_id.not_in(runs)),
        "logs": sa.select(sa.func.count()).where(t.logs.c.run_id.not_in(runs)),
        "run_tags": sa.select(sa.func.count()).where(t.run_tags.c.run_id.not_in(runs)),
        "inbox": sa.select(sa.func.count()).where(t.inbox.c.run_id.not_in(runs)),
        "tokens": sa.select(sa.func.count()).where(t.tokens.c.run_id.not_in(runs)),
        "events": sa.select(sa.func.count()).where(
            t.events.c.source_run_id.isnot(None), t.events.c.source_run_id.not_in(runs)
        ),
        "cron_fires": sa.select(sa.func.count()).where(
            t.cron_fires.c.run_id.isnot(None), t.cron_fires.c.run_id.not_in(runs)
        ),
        "parents": sa.select(sa.func.count()).where(
            t.runs.c.parent_run_id.isnot(None), t.runs.c.parent_run_id.not_in(runs)
        ),
        "definitions": sa.select(sa.func.count()).where(
            t.runs.c.definition_hash.not_in(sa.select(t.definitions.c.hash))
        ),
    }
    with engine.store.engine.connect() as c:
        out = {name: int(c.execute(q).scalar_one()) for name, q in checks.items()}
        keys = c.execute(sa.select(t.idempotency_keys.c.run_ids)).scalars().all()
        ids = set(c.execute(runs).scalars())
    out["idempotency_keys"] = sum(1 for k in keys if not set(k) & ids)
    return out


def _count(engine: Engine, table: sa.Table) -> int:
    with engine.store.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_purge_removes_every_dependent_row_and_leaves_nothing_orphaned(engine: Engine) -> None:
    # a run with everything hanging off it: an event it consumed, a token, an event it
    # sent, a child run, logs, tags, an idempotency key
    engine.send_event("doc.published", {"doc": "a"})
    waiter = engine.run(engine.workflow("waiter"), {})
    assert waiter.status == RunStatus.WAITING
    token = next(
        s.wait["token"]
        for s in engine.store.get_steps(waiter.id)
        if s.wait and s.wait.get("kind") == "token"
    )
    engine.complete_token(token, {"by": "ann"})
    resumed = engine.resume(waiter.id)
    # the child is queued: drive it here, then the parent
    kid = engine.store.list_runs(parent_run_id=waiter.id)[0]
    engine.resume(kid.id)
    assert engine.resume(resumed.id).status == RunStatus.COMPLETED
    keyed = engine.trigger("marked", {"n": 1}, idempotency_key="k1", tags=["a:b"])
    engine.resume(keyed.run_ids[0])
    # cron fires: two of one schedule, both runs finished
    store = engine.store
    machine = engine.workflow("marked")
    for i, at in enumerate((100.0, 200.0)):
        new = engine.new_run(machine, {"n": i}, {"kind": "cron"})
        assert store.fire_cron("marked", at, new, store.now(), skip_if_active=False)
        engine.resume(new.id)
    # an active parent with a finished child: neither may go
    active_parent = engine.trigger("marked", {"n": 5}).run_ids[0]
    child = NewRun(
        id="child-of-active",
        workflow_id="marked",
        version="1",
        definition_hash=machine.content_hash,
        payload={"n": 6},
        first_step="mark",
        queue="jobs",
        parent_run_id=active_parent,
        parent_step="mark",
    )
    store.send([child], store.now())
    engine.resume("child-of-active")
    finished = engine.count_runs(RunFilter(statuses=(RunStatus.COMPLETED,)))
    assert finished >= 6
    assert engine.count_purgeable(0.0) == finished - 1  # the active parent's child stays
    progress: list[int] = []
    purged = engine.purge(0.0, progress=lambda done, total: progress.append(done))
    assert purged == finished - 1 and progress[-1] == purged
    left = {r.id for r in engine.list_runs(RunFilter(), 100)}
    assert left == {active_parent, "child-of-active"}
    assert _dependents(engine) == dict.fromkeys(
        [
            "steps",
            "attempts",
            "logs",
            "run_tags",
            "inbox",
            "tokens",
            "events",
            "cron_fires",
            "parents",
            "definitions",
            "idempotency_keys",
        ],
        0,
    )
    assert _count(engine, t.tokens) == 0
    with store.engine.connect() as c:  # only the answer the kept child gave its parent
        assert c.execute(sa.select(t.inbox.c.run_id)).scalars().all() == [active_parent]
    assert _count(engine, t.events) == 0  # consumed, sent, and triggering events: all gone
    with store.engine.connect() as c:
        fires = c.execute(sa.select(t.cron_fires.c.fire_at, t.cron_fires.c.run_id)).all()
    assert [tuple(f) for f in fires] == [(200.0, None)]  # the newest keeps the timetable
    assert _count(engine, t.idempotency_keys) == 0
    # the key may be used again: its run is gone
    assert not engine.trigger("marked", {"n": 1}, idempotency_key="k1").duplicate


def test_workers_purge_by_the_retention_setting(tmp_path: Path, db_url: str) -> None:
    from engine.errors import ConfigError
    from engine.worker import Worker

    (tmp_path / "pyproject.toml").write_text(
        '[tool.durable-yaml]\nretention = {completed = "1s", failed = "1h"}\n'
    )
    settings = resolve_settings(db=db_url, workflows=str(OPS), cwd=str(tmp_path))
    assert dict(settings.retention) == {
        "completed": 1.0,
        "failed": 3600.0,
        "cancelled": 90 * 86400.0,
        "expired": 90 * 86400.0,
    }
    import_modules(["opssteps"], str(OPS))
    engine = Engine(settings, import_steps=False)
    done = engine.run(engine.workflow("marked"), {"n": 1})
    failed = engine.run(engine.workflow("marked"), {"n": -1})
    worker = Worker(engine)
    assert worker.apply_retention() == 0  # finished less than a second ago
    with engine.store.engine.begin() as c:  # as if they had finished a minute ago
        c.execute(sa.update(t.runs).values(finished_at=t.runs.c.finished_at - 60))
        c.execute(sa.update(t.runs).values(created_at=t.runs.c.created_at - 60))
    assert worker.apply_retention() == 1
    assert {r.id for r in engine.list_runs(RunFilter(), 10)} == {failed.id}
    assert done.id not in {r.id for r in engine.list_runs(RunFilter(), 10)}
    engine.close()
    for bad, message in (
        ('retention = {done = "1d"}', "retention.done: not a finished status"),
        ('retention = {failed = "soon"}', "retention.failed"),
        ('retention = "30d"', "retention must be a table"),
    ):
        (tmp_path / "pyproject.toml").write_text(f"[tool.durable-yaml]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            resolve_settings(db=db_url, cwd=str(tmp_path))


def test_a_token_completed_while_its_run_is_purged_answers_nothing(engine: Engine) -> None:
    """`complete` has found the token of a cancelled run when a purge deletes the run, its
    inbox (the cancel that won the wait) and its tokens: the answer must lose, as it would
    have against the cancel, not win an inbox row of a run that no longer exists."""
    import threading
    import time

    from engine.errors import EngineError
    from engine.pauses import pause_at

    engine.send_event("doc.published", {"doc": "a"})
    waiter = engine.run(engine.workflow("waiter"), {})
    token = next(
        s.wait["token"]
        for s in engine.store.get_steps(waiter.id)
        if s.wait and s.wait.get("kind") == "token"
    )
    engine.store.request_cancel(waiter.id, engine.store.now())
    purged: list[int] = []

    def purge_now() -> None:
        purger = threading.Thread(target=lambda: purged.append(engine.purge(0.0)))
        purger.start()
        purger.join(1.0)  # PostgreSQL: done; SQLite: waits for complete's write lock

    with pause_at("store.token.found", purge_now), pytest.raises(EngineError) as refused:
        engine.complete_token(token, {"by": "ann"})
    deadline = time.monotonic() + 30
    while not purged and time.monotonic() < deadline:
        time.sleep(0.02)
    assert purged == [1]
    assert "cancelled" in str(refused.value) or "no run is waiting" in str(refused.value)
    with engine.store.engine.connect() as c:
        orphans = c.execute(
            sa.select(t.inbox.c.run_id).where(~sa.exists().where(t.runs.c.id == t.inbox.c.run_id))
        ).all()
    assert orphans == []


def test_a_key_reused_while_its_run_is_purged_maps_to_one_live_run(engine: Engine) -> None:
    """A trigger with the idempotency key of a run a purge has chosen (paused before its
    DELETE): on PostgreSQL it sees the run and is its duplicate; on SQLite it waits for the
    purge and starts a new run. Either way, afterwards the key names exactly one run that
    exists, and using it again is that run's duplicate."""
    import threading

    from engine.models import Sent
    from engine.pauses import pause_at

    first = engine.trigger("marked", {"n": 1}, idempotency_key="k1").run_ids[0]
    engine.resume(first)
    during: list[Sent] = []
    threads: list[threading.Thread] = []

    def reuse_the_key() -> None:
        if threads:
            return
        again = threading.Thread(
            target=lambda: during.append(engine.trigger("marked", {"n": 2}, idempotency_key="k1"))
        )
        threads.append(again)
        again.start()
        again.join(1.0)  # PostgreSQL: done; SQLite: waits for the purge's write lock

    with pause_at("store.purge.selected", reuse_the_key):
        assert engine.purge(0.0) == 1
    threads[0].join(30)
    (sent,) = during
    live = [r.id for r in engine.list_runs(RunFilter(), 10)]
    with engine.store.engine.connect() as c:
        keys = c.execute(sa.select(t.idempotency_keys.c.run_ids)).scalars().all()
    if sent.duplicate:
        assert list(sent.run_ids) == [first] and live == [] and keys == []
    else:
        assert live == list(sent.run_ids) and keys == [live]
    after = engine.trigger("marked", {"n": 3}, idempotency_key="k1")
    assert after.duplicate == bool(live)
    assert engine.count_runs(RunFilter()) == 1


def test_a_worker_asked_to_stop_starts_no_further_purge_batch(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the retention thread works through a backlog: shutdown waited for the
    whole purge (up to the grace period, 30 s), though no step was in flight. Now no batch
    starts after the stop; the rest waits for the next purge."""
    import time

    import engine.worker as worker_module
    from engine.pauses import pause_at
    from engine.worker import Worker

    (tmp_path / "pyproject.toml").write_text(
        '[tool.durable-yaml]\nretention = {completed = "1s"}\n'
    )
    import_modules(["opssteps"], str(OPS))
    e = Engine(resolve_settings(db=db_url, workflows=str(OPS), cwd=str(tmp_path)))
    e.save_all_definitions()
    machine = e.workflow("marked")
    now = e.store.now()
    e.store.send([e.new_run(machine, {"n": i}, {"kind": "manual"}) for i in range(3000)], now)
    with e.store.engine.begin() as c:  # finished a minute ago
        c.execute(sa.update(t.runs).values(status="completed", finished_at=now - 60))
        c.execute(sa.update(t.runs).values(created_at=now - 60))
    monkeypatch.setattr(worker_module, "RETENTION_EVERY", 0.01)
    w = Worker(e, concurrency=1, poll_interval=0.05, grace=30, schedules=False)
    with pause_at("store.purge.selected", lambda: time.sleep(0.2)):  # ~0.4 s a batch
        w.start()
        deadline = time.monotonic() + 30
        while e.count_runs(RunFilter()) == 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        w.stop()
        w.shutdown()
        took = time.monotonic() - started
    left = e.count_runs(RunFilter())
    e.close()
    assert 0 < left < 3000, left  # interrupted: the rest waits for the next purge
    assert took < 2.0, f"shutdown took {took:.1f}s"


def test_a_replay_of_a_run_purged_meanwhile_keeps_its_definition(
    tmp_path: Path, db_url: str
) -> None:
    """Replaying a run of a workflow whose file is gone uses the run's stored definition,
    last saved over a day ago. A purge between preparing the replay and storing it deletes
    the original, the definition's last run, but not the definition: preparing the replay
    saved it again (`new_run`), and retention keeps what was saved within a day."""
    import shutil
    import threading

    from engine.pauses import pause_at

    flows = tmp_path / "workflows"
    flows.mkdir()
    shutil.copy(OPS / "quick.yaml", flows / "quick.yaml")
    import_modules(["opssteps"], str(OPS))
    e = Engine(resolve_settings(db=db_url, workflows=str(flows)), import_steps=False)
    original = e.run(e.workflow("quick"), {"n": 1})
    (flows / "quick.yaml").unlink()
    assert e.refresh_catalog() and e.catalog.get("quick") is None
    now = e.store.now()
    with e.store.engine.begin() as c:  # all of it old: the run, its definition's last save
        c.execute(sa.update(t.runs).values(created_at=now - 60, finished_at=now - 60))
        c.execute(sa.update(t.definitions).values(created_at=now - 2 * 86400))
    e._saved.clear()  # a fresh process: it has saved nothing yet
    purged: list[int] = []

    def purge_now() -> None:
        purger = threading.Thread(target=lambda: purged.append(e.purge(0.0)))
        purger.start()
        purger.join(30)

    with pause_at("service.replay.prepared", purge_now):
        replay_id = e.queue_replay(original.id)
    assert purged == [1]
    replay = e.store.get_run(replay_id)
    assert e.store.load_definition(replay.definition_hash)  # it can start
    e.close()
