"""The engine as one object: settings, store, workflows and registry together.

The CLI, the `Client` and the HTTP server are thin layers over this.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema

from dsl import Catalog, Machine, WorkflowInvalid, check_file, check_paths

from .errors import ConfigError, NotFound, PayloadInvalid
from .models import Run
from .registry import import_modules, registered_names
from .runner import Reporter, Runner
from .settings import Settings, resolve_settings
from .store import SqlStore, open_store

__all__ = ["Engine", "validate_payload"]


def validate_payload(machine: Machine, payload: Any) -> None:
    """PayloadInvalid naming the field if `payload` breaks the workflow's schema."""
    if machine.schema is None:
        return
    validator = jsonschema.Draft202012Validator(machine.schema)
    errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    best = jsonschema.exceptions.best_match(errors)
    field = "payload" + "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" for p in best.absolute_path
    )
    raise PayloadInvalid(machine.workflow_id, field, best.message)


class Engine:
    def __init__(self, settings: Settings | None = None, *, import_steps: bool = True) -> None:
        self.settings = settings or resolve_settings()
        self.steps_imported = import_steps and bool(self.settings.modules)
        if self.steps_imported:
            import_modules(self.settings.modules, self.settings.project_dir)
        self._store: SqlStore | None = None
        self._catalog: Catalog | None = None

    @property
    def store(self) -> SqlStore:
        if self._store is None:
            self._store = open_store(self.settings.db_url)
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

    # runs ---------------------------------------------------------------------------------
    def initial_payload(
        self, machine: Machine, payload: Any, now: float
    ) -> tuple[Any, dict[str, Any]]:
        """The payload and trigger of a run started by hand; a cron run gets a cron payload."""
        if machine.trigger.kind == "cron":
            stamp = datetime.fromtimestamp(now, tz=timezone.utc).isoformat()
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

    def run(self, machine: Machine, payload: Any, reporter: Reporter | None = None) -> Run:
        """Validate the payload, then create and drive a run in this process."""
        now = time.time()
        payload, trigger = self.initial_payload(machine, payload, now)
        validate_payload(machine, payload)
        runner = Runner(self.store, foreground=True, reporter=reporter)
        return runner.start(machine, payload, trigger)

    def resume(self, run_id: str, reporter: Reporter | None = None) -> Run:
        return Runner(self.store, foreground=True, reporter=reporter).drive(run_id)

    def replay(self, run_id: str, reporter: Reporter | None = None) -> Run:
        """A new run with the same payload, on the workflow's current definition if it is in
        the workflows folder, else on the definition the original was pinned to."""
        original = self.store.get_run(run_id)
        machine = self.catalog.get(original.workflow_id)
        if machine is None:
            machine = Machine.from_json(self.store.load_definition(original.definition_hash))
        validate_payload(machine, original.payload)
        runner = Runner(self.store, foreground=True, reporter=reporter)
        return runner.start(machine, original.payload, {**original.trigger, "replay_of": run_id})

    def check_modules(self) -> None:
        if not self.settings.modules:
            raise ConfigError(
                "no step modules: pass -m MODULE, set DURABLE_YAML_MODULES or "
                "`modules` in [tool.durable-yaml]"
            )
