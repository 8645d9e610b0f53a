"""A database written by version 1 of durable-yaml is upgraded in place and keeps its runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from engine.models import RunStatus
from engine.store import open_store
from engine.store import schema as t
from tests.conftest import ROOT, cli

FIXTURE = Path(__file__).parent / "fixtures" / "v1-state.db"


def test_v1_database_is_upgraded_and_keeps_its_runs(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    shutil.copy(FIXTURE, db)
    url = f"sqlite:///{db}"
    store = open_store(url)
    with store.engine.connect() as c:
        assert c.execute(sa.select(t.meta.c.value)).scalar_one() == str(t.SCHEMA_VERSION)
        indexes = {i["name"] for i in sa.inspect(c).get_indexes("dy_runs")}
        step_columns = {col["name"] for col in sa.inspect(c).get_columns("dy_steps")}
        tables = set(sa.inspect(c).get_table_names())
    assert {"dy_runs_claim", "dy_runs_claim_queue", "dy_runs_queue_started"} <= indexes
    assert "resume_data" not in step_columns and "dy_inbox" in tables  # v3: answers in the inbox
    runs = {r.status: r for r in store.list_runs()}
    assert set(runs) == {RunStatus.COMPLETED, RunStatus.FAILED}
    done = runs[RunStatus.COMPLETED]
    assert done.output == {"processed_url": "https://cdn.example.com/f408a30e0ad1.webp"}
    assert {s.step_key for s in store.get_steps(done.id)} == {
        "start",
        "pause",
        "call_image_api",
        "done",
    }
    # the old failed run can still be replayed on its pinned definition
    from dsl import Machine

    machine = Machine.from_json(store.load_definition(runs[RunStatus.FAILED].definition_hash))
    assert machine.workflow_id == "process-image"
    shown = cli("runs", "show", done.id, "--json", "--db", url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    store.migrate()  # idempotent
    store.close()
    assert ROOT.exists()


def test_v4_database_gains_tags_metadata_ttl_and_pause(db_url: str) -> None:
    """v5: a version-4 database (made here by taking v5's additions away) is upgraded in
    place: run tags and their search table, metadata, not_before, expires_at, paused."""
    store = open_store(db_url)
    with store.engine.begin() as c:
        c.execute(sa.text("DROP TABLE dy_run_tags"))
        for index in ("dy_runs_expiry", "dy_inbox_event_id", "dy_tokens_run", "dy_cron_fires_run"):
            c.execute(sa.text(f"DROP INDEX {index}"))
        for table, column in (
            ("dy_runs", "tags"),
            ("dy_runs", "metadata"),
            ("dy_runs", "not_before"),
            ("dy_runs", "expires_at"),
            ("dy_queues", "paused"),
        ):
            c.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        c.execute(sa.update(t.meta).values(value="4"))
    store.migrate()
    with store.engine.connect() as c:
        assert c.execute(sa.select(t.meta.c.value)).scalar_one() == str(t.SCHEMA_VERSION)
        insp = sa.inspect(c)
        columns = {col["name"] for col in insp.get_columns("dy_runs")}
        assert {"tags", "metadata", "not_before", "expires_at"} <= columns
        assert "paused" in {col["name"] for col in insp.get_columns("dy_queues")}
        assert "dy_runs_expiry" in {i["name"] for i in insp.get_indexes("dy_runs")}
        assert "dy_tokens_run" in {i["name"] for i in insp.get_indexes("dy_tokens")}
        assert "dy_run_tags" in insp.get_table_names()
    from engine.models import NewRun, RunFilter

    store.save_definition("h", "wf", "1", {}, "")
    new = NewRun("r1", "wf", "1", "h", {}, "s", "q", tags=("a:b",), ttl=5.0)
    store.send([new], 1000.0)
    assert [r.id for r in store.search_runs(RunFilter(tags=("a:b",)))] == ["r1"]
    run = store.get_run("r1")
    assert run.expires_at == run.created_at + 5.0
    store.close()


def test_v5_database_gets_the_metrics_index(db_url: str) -> None:
    store = open_store(db_url)
    with store.engine.begin() as c:
        c.execute(sa.text("DROP INDEX dy_runs_workflow_status"))
        c.execute(sa.update(t.meta).where(t.meta.c.key == "schema_version").values(value="5"))
    store.close()
    store = open_store(db_url)
    with store.engine.connect() as c:
        assert c.execute(sa.select(t.meta.c.value)).scalar_one() == str(t.SCHEMA_VERSION)
        indexes = {i["name"] for i in sa.inspect(c).get_indexes("dy_runs")}
    assert "dy_runs_workflow_status" in indexes
    store.migrate()  # idempotent
    store.close()


def test_log_ids_are_64_bits_and_a_32_bit_column_is_still_read(db_url: str) -> None:
    """A new database's log ids go past 2**31 - 1 (where a PostgreSQL SERIAL stopped every
    log write) and are read back in order after such an id. A PostgreSQL database made
    before keeps its 32-bit column (widening it is the README's manual step): `after`
    beyond 32 bits reads no line and raises nothing there."""
    from engine.models import Lease, NewLog, NewRun, Transition

    store = open_store(db_url)
    postgres = store.dialect == "postgresql"
    with store.engine.begin() as c:
        if postgres:
            kind = c.execute(
                sa.text(
                    "SELECT data_type FROM information_schema.columns "
                    "WHERE table_name = 'dy_logs' AND column_name = 'id'"
                )
            ).scalar_one()
            assert kind == "bigint"
            c.execute(sa.text("SELECT setval('dy_logs_id_seq', 2147483646)"))
        else:
            seed = {"id": 2147483646, "run_id": "x", "level": "info", "message": "seed"}
            c.execute(sa.insert(t.logs).values(**seed, created_at=0.0))
    lease = Lease(owner="m/0", host="here", pid=1, seconds=30.0)
    store.create_run(NewRun("r1", "wf", "1", "h", {}, "a", "q"), store.now())
    assert store.claim_next_run(lease, store.now()) is not None
    logs = tuple(NewLog("info", f"line {i}", "a", 1) for i in range(3))
    store.commit_transition("r1", lease, Transition(RunStatus.RUNNING, logs=logs), store.now())
    ids = [e.id for e in store.get_logs("r1")]
    assert ids == [2147483647, 2147483648, 2147483649]
    assert [e.message for e in store.get_logs("r1", after_id=2147483647)] == ["line 1", "line 2"]
    assert store.get_logs("r1", after_id=2**63 - 1) == []
    if postgres:  # a database made before: its 32-bit column
        with store.engine.begin() as c:
            c.execute(sa.text("DELETE FROM dy_logs"))
            c.execute(sa.text("ALTER TABLE dy_logs ALTER COLUMN id TYPE INTEGER"))
            c.execute(sa.text("ALTER SEQUENCE dy_logs_id_seq AS INTEGER RESTART 1"))
        store.commit_transition("r1", lease, Transition(RunStatus.RUNNING, logs=logs), store.now())
        assert [e.message for e in store.get_logs("r1", after_id=1)] == ["line 1", "line 2"]
        assert store.get_logs("r1", after_id=2**40) == []
        assert store.get_logs("r1", after_id=2**63 - 1) == []
    store.close()


def test_a_32_bit_log_id_near_its_end_is_warned_of(caplog: Any) -> None:
    """PostgreSQL: a database made before keeps 32-bit log ids; from three quarters of them
    used, opening the store warns, naming the database and the ALTER that widens them. A
    64-bit column, or a 32-bit one with room, says nothing."""
    import logging

    from tests.conftest import PG_REASON, PG_URL, _reset_postgres

    if not PG_URL:
        pytest.skip(PG_REASON)
    from engine.store.sql import normalise_url

    _reset_postgres(PG_URL)
    caplog.set_level(logging.WARNING, logger="engine.store.sql")
    open_store(PG_URL).close()  # a new database: 64-bit
    engine = sa.create_engine(normalise_url(PG_URL))
    with engine.begin() as c:
        c.execute(sa.text("ALTER TABLE dy_logs ALTER COLUMN id TYPE INTEGER"))
        c.execute(sa.text("ALTER SEQUENCE dy_logs_id_seq AS INTEGER"))
        c.execute(sa.text("SELECT setval('dy_logs_id_seq', 1000)"))
    open_store(PG_URL).close()  # 32-bit, with room
    assert "32-bit" not in caplog.text
    with engine.begin() as c:
        c.execute(sa.text("SELECT setval('dy_logs_id_seq', 1800000000)"))
    open_store(PG_URL).close()
    engine.dispose()
    assert "dy_logs.id is a 32-bit integer and 1,800,000,000 of its 2,147,483,647" in caplog.text
    assert "ALTER TABLE dy_logs ALTER COLUMN id TYPE BIGINT" in caplog.text
