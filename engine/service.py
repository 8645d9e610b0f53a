"""The engine as one object: settings, store, workflows and registry together.

The CLI, the `Client` and the HTTP server are thin layers over this.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import referencing.exceptions

from dsl import (
    Catalog,
    Machine,
    TemplateError,
    WorkflowInvalid,
    check_file,
    check_paths,
    render_value,
)
from dsl.limits import (
    CONCURRENCY_KEY_MAX,
    EVENT_NAME_MAX,
    IDEMPOTENCY_KEY_MAX,
    RUN_NESTING_MAX,
    TOKEN_MAX,
    WORKFLOW_ID_MAX,
)

from . import tracing
from .blocks import resume_point
from .errors import ConfigError, EngineError, NestedTooDeep, NotFound, PayloadInvalid
from .inputs import InputInvalid, TooLong, check_json, check_text
from .models import Emission, Lease, NewEvent, NewRun, QueueLimits, Run, RunStatus, Sent
from .operations import Operations, check_tags, check_ttl
from .pauses import pause_point
from .registry import import_modules, registered_names
from .runner import Reporter, Runner, new_run_id
from .settings import Settings, resolve_settings
from .store import SqlStore, open_store

__all__ = ["Engine", "validate_payload"]

RESAVE_SECONDS = 3600.0  # a definition in use is saved again this often (retention keeps it)


def first_wait_event(machine: Machine) -> str | tuple[str, ...] | None:
    """The event(s) a run of `machine` waits for at its first step, if it does."""
    return machine.state(machine.start).listens_for


def validate_payload(machine: Machine, payload: Any) -> None:
    """PayloadInvalid naming the field if `payload` breaks the workflow's schema."""
    if machine.schema is None:
        return
    validator = jsonschema.Draft202012Validator(machine.schema)
    try:
        errors = sorted(
            validator.iter_errors(payload), key=lambda e: list(map(str, e.absolute_path))
        )
    except (jsonschema.exceptions.SchemaError, referencing.exceptions.Unresolvable) as exc:
        raise PayloadInvalid(
            machine.workflow_id, "schema", f"the workflow's schema cannot be used: {exc}"
        ) from None
    if not errors:
        return
    best = jsonschema.exceptions.best_match(errors)
    field = "payload" + "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" for p in best.absolute_path
    )
    raise PayloadInvalid(machine.workflow_id, field, best.message)


def _mtime(path: Path) -> float:
    """When a file last changed; -1 for one that cannot be read (a dangling symlink): the
    catalog then reports it as a problem instead of failing."""
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


class Engine(Operations):
    def __init__(self, settings: Settings | None = None, *, import_steps: bool = True) -> None:
        self.settings = settings or resolve_settings()
        self.steps_imported = import_steps and bool(self.settings.modules)
        if self.steps_imported:
            import_modules(self.settings.modules, self.settings.project_dir)
        self._store: SqlStore | None = None
        self._catalog: Catalog | None = None
        self._saved: dict[str, float] = {}  # hash -> when saved (monotonic)

    @property
    def store(self) -> SqlStore:
        if self._store is None:
            try:
                self._store = open_store(self.settings.db_url)
            except OSError as exc:  # the SQLite folder cannot be created
                where = exc.filename or self.settings.db_url
                raise ConfigError(
                    f"cannot create the database at {where}: {exc.strerror or exc}"
                ) from None
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # workflows ------------------------------------------------------------------------------
    def registered(self) -> set[str] | None:
        """The registered step names, when step modules were imported (else: not checked)."""
        return registered_names() if self.steps_imported else None

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            folder = Path(self.settings.workflows)
            self._catalog = (
                check_paths([folder], self.registered()) if folder.is_dir() else Catalog()
            )
        return self._catalog

    def _folder_signature(self) -> tuple[tuple[str, float], ...]:
        folder = Path(self.settings.workflows)
        if not folder.is_dir():
            return ()
        return tuple(
            sorted((str(p), _mtime(p)) for p in folder.rglob("*") if p.suffix in (".yaml", ".yml"))
        )

    def refresh_catalog(self) -> bool:
        """Re-read the workflows folder if a file was added, changed or removed."""
        signature = self._folder_signature()
        if signature == getattr(self, "_signature", None):
            return False
        self._signature = signature
        self._catalog = None
        return True

    def save_all_definitions(self) -> None:
        for machine in self.catalog.workflows.values():
            self._save(machine)

    def workflow(self, ref: str) -> Machine:
        """A workflow by file path or by id in the workflows folder; invalid -> WorkflowInvalid."""
        path = Path(ref)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise NotFound(f"no workflow file {ref}")
            machine, problems = check_file(path, self.registered())
            if machine is None:
                raise WorkflowInvalid(problems)
            return machine
        machine = self.catalog.get(ref)
        if machine is None:
            bad = [p for p in self.catalog.problems]
            hint = (
                f" ({len(bad)} problem(s) in {self.settings.workflows}: run `durable-yaml validate`)"
                if bad
                else ""
            )
            known = ", ".join(sorted(self.catalog.workflows)) or "none"
            raise NotFound(
                f"no workflow has id `{ref}` in {self.settings.workflows} (known: {known}){hint}"
            )
        return machine

    def event_workflows(self, name: str) -> list[Machine]:
        """Workflows of the folder triggered by event `name`."""
        return [
            m
            for m in self.catalog.workflows.values()
            if m.trigger.kind == "event" and m.trigger.event == name
        ]

    def _save(self, machine: Machine) -> None:
        """Store the definition and its queue's limits once per process."""
        saved = self._saved.get(machine.content_hash)
        if saved is not None and time.monotonic() - saved < RESAVE_SECONDS:
            return
        self.store.save_definition(
            machine.content_hash,
            machine.workflow_id,
            machine.version,
            machine.to_json(),
            machine.source_path,
        )
        q = machine.queue
        self.store.save_queue_limits(
            [QueueLimits(q.name, q.concurrency, q.rate_limit, q.rate_period)]
        )
        self._saved[machine.content_hash] = time.monotonic()

    def new_run(
        self,
        machine: Machine,
        payload: Any,
        trigger: dict[str, Any],
        *,
        idempotency_key: str | None = None,
        delay: float | None = None,
        parent: tuple[str, str] | None = None,
        run_id: str | None = None,
        now: float | None = None,
        tags: tuple[str, ...] = (),
        priority: int | None = None,
        ttl: float | None = None,
    ) -> NewRun:
        """A run ready to store: payload checked, concurrency key rendered, definition saved."""
        now = self.store.now() if now is None else now
        check_json(payload, "payload")
        check_text(idempotency_key, "idempotency_key", IDEMPOTENCY_KEY_MAX, required=False)
        validate_payload(machine, payload)
        key = None
        if machine.concurrency_key is not None:
            try:
                rendered = render_value(
                    machine.concurrency_key,
                    {"payload": payload, "trigger": trigger},
                    "concurrency_key",
                )
            except TemplateError as exc:
                raise PayloadInvalid(machine.workflow_id, "concurrency_key", exc.message) from None
            key = None if rendered is None else str(rendered)
            check_text(key, "concurrency_key", CONCURRENCY_KEY_MAX, required=False)
        self._save(machine)
        run_id = run_id or new_run_id()
        trigger = tracing.run_created(trigger, run_id, machine.workflow_id)
        return NewRun(
            id=run_id,
            workflow_id=machine.workflow_id,
            version=machine.version,
            definition_hash=machine.content_hash,
            payload=payload,
            first_step=machine.start,
            queue=machine.queue.name,
            concurrency_key=key,
            priority=machine.priority if priority is None else priority,
            trigger=trigger,
            parent_run_id=parent[0] if parent else None,
            parent_step=parent[1] if parent else None,
            idempotency_key=idempotency_key,
            available_at=now + delay if delay else None,
            first_wait_event=first_wait_event(machine),
            tags=tags,
            ttl=ttl,
        )

    def prepare_event(
        self,
        name: str,
        payload: Any,
        source: tuple[str, str] | None = None,
        idempotency_key: str | None = None,
        now: float | None = None,
        tags: tuple[str, ...] = (),
        priority: int | None = None,
        ttl: float | None = None,
    ) -> Emission:
        """An event and the runs it triggers, every payload checked: all or nothing."""
        now = self.store.now() if now is None else now
        check_text(name, "name", EVENT_NAME_MAX)
        if not name.strip():
            raise TooLong("name", "must not be blank (only whitespace)")
        check_text(idempotency_key, "idempotency_key", IDEMPOTENCY_KEY_MAX, required=False)
        check_json(payload, "payload")
        event = NewEvent(
            new_run_id(),
            name,
            payload,
            idempotency_key,
            source[0] if source else None,
            source[1] if source else None,
        )
        trigger = {"kind": "event", "event": name, "event_id": event.id}
        runs = tuple(
            self.new_run(
                m,
                payload,
                trigger,
                idempotency_key=idempotency_key,
                now=now,
                tags=tags,
                priority=priority,
                ttl=ttl,
            )
            for m in self.event_workflows(name)
        )
        return Emission(event, runs)

    def send_event(
        self,
        name: str,
        payload: Any,
        idempotency_key: str | None = None,
        *,
        tags: Any = None,
        priority: int | None = None,
        ttl: float | None = None,
    ) -> Sent:
        """Queue a run of every workflow `name` triggers and answer every matching parked
        wait. Every payload is checked first: all or nothing. `tags`, `priority` and `ttl`
        apply to the runs it starts."""
        tags, ttl, priority = check_tags(tags), check_ttl(ttl), _check_priority(priority)
        now = self.store.now()
        emission = self.prepare_event(
            name,
            payload,
            idempotency_key=idempotency_key,
            now=now,
            tags=tags,
            priority=priority,
            ttl=ttl,
        )
        return self.store.send(
            emission.runs, now, event=emission.event, idempotency_key=idempotency_key
        )

    def trigger(
        self,
        workflow_id: str,
        payload: Any,
        idempotency_key: str | None = None,
        delay: float | None = None,
        *,
        tags: Any = None,
        priority: int | None = None,
        ttl: float | None = None,
    ) -> Sent:
        """Queue one run of a workflow (for workers to execute)."""
        tags, ttl, priority = check_tags(tags), check_ttl(ttl), _check_priority(priority)
        check_text(workflow_id, "workflow", WORKFLOW_ID_MAX)
        check_json(payload, "payload")
        machine = self.workflow(workflow_id)
        now = self.store.now()
        payload, trigger = self.initial_payload(machine, payload, now)
        new = self.new_run(
            machine,
            payload,
            trigger,
            idempotency_key=idempotency_key,
            delay=delay,
            now=now,
            tags=tags,
            priority=priority,
            ttl=ttl,
        )
        return self.store.send([new], now, idempotency_key=idempotency_key)

    def complete_token(self, token: str, data: Any) -> str:
        check_text(token, "token", TOKEN_MAX)
        check_json(data, "data")
        return self.store.complete_token(token, data, self.store.now())

    # Host: what steps may ask of the engine -------------------------------------------------
    def prepare_child(
        self, workflow_id: str, payload: Any, parent: tuple[str, str, int], child_id: str
    ) -> NewRun:
        """The child run `child_id` of a run_workflow step, stored when its parent parks."""
        machine = self.catalog.get(workflow_id)
        if machine is None:
            raise NotFound(f"no workflow has id `{workflow_id}` in {self.settings.workflows}")
        depth = int(self.store.get_run(parent[0]).trigger.get("depth", 0)) + 1
        if depth > RUN_NESTING_MAX:
            raise NestedTooDeep(
                f"`{workflow_id}` would be a child run {depth} levels deep; at most "
                f"{RUN_NESTING_MAX} (does a workflow start itself through others?)"
            )
        trigger = {"kind": "parent", "run_id": parent[0], "step": parent[1], "depth": depth}
        new = self.new_run(machine, payload, trigger, parent=parent[:2], run_id=child_id)
        return replace(new, parent_attempt=parent[2])

    # runs ---------------------------------------------------------------------------------
    def initial_payload(
        self, machine: Machine, payload: Any, now: float
    ) -> tuple[Any, dict[str, Any]]:
        """The payload and trigger of a run started by hand; a cron run gets a cron payload."""
        if machine.trigger.kind == "cron":
            stamp = datetime.fromtimestamp(now, tz=UTC).isoformat()
            cron_payload = {
                "timestamp": stamp,
                "last_timestamp": None,
                "timezone": machine.trigger.timezone,
                "schedule": machine.trigger.cron,
            }
            if payload is None:
                payload = cron_payload
            return payload, {"kind": "cron", **cron_payload, "manual": True}
        if payload is None:
            payload = {}
        return payload, {"kind": "manual"}

    def run(
        self,
        machine: Machine,
        payload: Any,
        reporter: Reporter | None = None,
        *,
        tags: Any = None,
    ) -> Run:
        """Validate the payload, then create and drive a run in this process."""
        tags = check_tags(tags)
        now = self.store.now()
        payload, trigger = self.initial_payload(machine, payload, now)
        new = self.new_run(machine, payload, trigger, now=now, tags=tags)
        return self.runner(reporter).start(machine, payload, new=new)

    def runner(self, reporter: Reporter | None = None) -> Runner:
        return Runner(self.store, foreground=True, host=self, reporter=reporter)

    def resume(self, run_id: str, reporter: Reporter | None = None) -> Run:
        """Continue a run from its stored state; a failed run gets one more attempt of the
        step that failed (after its cause was fixed)."""
        runner = self.runner(reporter)
        run = self.store.get_run(run_id)
        if run.status == RunStatus.FAILED:
            point = self.resume_point_of(run)
            if point is None:
                raise EngineError(
                    f"run {run_id} failed outside its steps ({run.error}); "
                    f"start it again with `durable-yaml runs replay {run_id}`"
                )
            step, reopen = point
            pause_point("service.resume.checked")
            self.store.reopen_failed_run(run_id, step, runner.lease, self.store.now(), reopen)
        return runner.drive(run_id)

    def resume_point_of(self, run: Run) -> tuple[str, dict[str, dict[str, Any]]] | None:
        """The step whose failure failed the run, and the blocks it reopens (engine/blocks.py).
        Read outside the run's lock: the store reopens the run only while it, and the step
        read here, are still failed (another resume in between makes this one change
        nothing)."""
        machine = Machine.from_json(self.store.load_definition(run.definition_hash))
        steps = {s.step_key: s for s in self.store.get_steps(run.id)}
        return resume_point(machine, steps, self.store.now())

    def queue_resume(self, run_id: str) -> Run:
        """Resume a failed run for workers (the dashboard's button): its failed step becomes a
        due retry under a lease that has already expired, so the next worker to claim takes
        it. The store reopens it only if it is still failed (under the run's lock): a second
        click, or a resume in a terminal in between, finds it reopened and changes nothing."""
        run = self.store.get_run(run_id)
        if run.status != RunStatus.FAILED:
            raise EngineError(f"run {run_id} is {run.status.value}; only a failed run resumes")
        point = self.resume_point_of(run)
        if point is None:
            raise EngineError(
                f"run {run_id} failed outside its steps ({run.error}); replay it instead"
            )
        pause_point("service.resume.checked")
        lease = Lease(owner="dashboard-resume", host="", pid=0, seconds=0.0)
        step, reopen = point
        return self.store.reopen_failed_run(run_id, step, lease, self.store.now(), reopen)

    def _replay(self, run_id: str) -> tuple[Machine, NewRun]:
        """A new run with the same payload, on the workflow's current definition if it is in
        the workflows folder, else on the definition the original was pinned to."""
        original = self.store.get_run(run_id)
        machine = self.catalog.get(original.workflow_id)
        if machine is None:
            machine = Machine.from_json(self.store.load_definition(original.definition_hash))
        trigger = {**original.trigger, "replay_of": run_id}
        return machine, self.new_run(
            machine, original.payload, trigger, tags=original.tags, priority=original.priority
        )

    def replay(self, run_id: str, reporter: Reporter | None = None) -> Run:
        """Replay in this process (the `runs replay` command)."""
        machine, new = self._replay(run_id)
        return self.runner(reporter).start(machine, new.payload, new=new)

    def queue_replay(self, run_id: str) -> str:
        """Replay queued for workers (the API and the dashboard); the new run's id."""
        _, new = self._replay(run_id)
        pause_point("service.replay.prepared")
        self.store.send([new], self.store.now())
        return new.id

    def queue_replays(self, run_ids: Sequence[str]) -> list[str]:
        """Replays of many runs queued in one transaction; the new runs' ids."""
        news = [self._replay(run_id)[1] for run_id in run_ids]
        pause_point("service.replay.prepared")
        if news:
            self.store.send(news, self.store.now())
        return [n.id for n in news]

    def _current_hashes(self) -> set[str]:
        """Definitions of the workflow files as they are now: retention keeps them."""
        return {m.content_hash for m in self.catalog.workflows.values()}


def _check_priority(priority: Any) -> int | None:
    if priority is None:
        return None
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 1_000_000:
        raise InputInvalid("priority", "must be a whole number between -1000000 and 1000000")
    return priority
