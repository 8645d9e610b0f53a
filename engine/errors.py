"""Errors of the engine. Each carries what a user needs to act: the run, the step, the field.

`exit_code` is what the CLI exits with (SPEC §3): 1 failed/invalid, 2 usage or bad payload.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseError",
    "EngineError",
    "LeaseLost",
    "NestedTooDeep",
    "NonRetryableError",
    "NotFound",
    "PayloadInvalid",
    "RunBusy",
    "TokenError",
    "UnknownStep",
    "ValueNotStorable",
    "copy_error",
]


class EngineError(Exception):
    """Base class of the engine's errors; `str(err)` is a complete message for a user."""

    exit_code = 1


class NonRetryableError(Exception):
    """Raise from a step to fail it at once, without retries."""


class ConfigError(EngineError):
    """A setting, module or workflow reference is wrong."""

    exit_code = 2


class NotFound(EngineError):
    """No run, workflow or token has that id."""

    exit_code = 2


class PayloadInvalid(EngineError):
    """A payload does not satisfy a workflow's schema; nothing was stored."""

    exit_code = 2

    def __init__(self, workflow_id: str, field: str, message: str, subject: str = "") -> None:
        self.workflow_id = workflow_id
        self.field = field
        self.message = message
        where = f" at `{field}`" if field else ""
        subject = subject or f"workflow `{workflow_id}`"
        super().__init__(f"payload for {subject} is invalid{where}: {message}")


class UnknownStep(EngineError):
    """A `call` names a function no module registered."""

    def __init__(self, name: str, hint: str = "") -> None:
        self.name = name
        super().__init__(f"no step is registered as `{name}`{hint}")


class NestedTooDeep(EngineError):
    """A `run_workflow` would start a child deeper than the nesting limit (a cycle that
    `validate` could not see, e.g. through a definition changed since)."""


class RunBusy(EngineError):
    """Another live process holds the run's lease."""


class LeaseLost(EngineError):
    """This process no longer holds the run's lease; its late result is discarded."""


class DatabaseError(EngineError):
    """The database cannot be reached or is in a state this version cannot use."""


class TokenError(EngineError):
    """A token is unknown or was completed already."""


class ValueNotStorable(DatabaseError):
    """The database refused a value (e.g. PostgreSQL and the NUL character): the step that
    produced it fails; it is never executed again for it."""


def copy_error(exc: Exception) -> Exception:
    """A copy of `exc` for another thread to raise (one exception object raised by two
    threads would share, and mix, its traceback); a DatabaseError if it cannot be made."""
    try:
        return type(exc)(*exc.args)
    except Exception:
        return DatabaseError(str(exc))
