"""The compiled workflow: an immutable state machine, JSON-serialisable, with a content hash.

Every step becomes a `State` with explicit transitions: `next` on success or skip, `on_error`
once the step has failed for good (retries are the state's own `retry` policy). Main states
fail into the first `on_failure` handler (or straight to `$failed`); handlers run in order and
end in `$failed`. The machine carries everything a runner needs, so a run pinned to its hash
never has to read the YAML again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

__all__ = [
    "BLOCK_KINDS",
    "COMPLETED",
    "FAILED",
    "STEP_KINDS",
    "WAIT_KINDS",
    "Machine",
    "QueueSpec",
    "RetryPolicy",
    "State",
    "Trigger",
]

COMPLETED = "$completed"
FAILED = "$failed"
FORMAT = 1
STEP_KINDS = (
    "log",
    "call",
    "wait",
    "wait_until",
    "wait_for_event",
    "wait_for_token",
    "wait_for_any",
    "send_event",
    "run_workflow",
    "for_each",
    "parallel",
    "switch",
    "repeat",
)
BLOCK_KINDS = ("switch", "repeat")  # steps whose own state opens nested lists (dsl/blocks.py)
WAIT_KINDS = (
    "wait",
    "wait_until",
    "wait_for_event",
    "wait_for_token",
    "wait_for_any",
    "run_workflow",
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    factor: float = 2.0
    min_delay: float = 1.0
    max_delay: float = 60.0
    jitter: bool = True
    on: tuple[str, ...] = ()


@dataclass(frozen=True)
class Trigger:
    kind: str  # event | cron | manual
    event: str | None = None
    cron: str | None = None
    timezone: str = "UTC"
    missed: str = "once"
    overlap: str = "allow"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    concurrency: int | None = None
    rate_limit: int | None = None
    rate_period: float | None = None


@dataclass(frozen=True)
class State:
    """One step of the machine. `config` holds the kind's settings; strings in it are templates."""

    id: str
    kind: str
    config: dict[str, Any]
    next: str
    on_error: str
    when: str | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None
    handler: bool = False  # part of on_failure
    line: int = 0
    # nesting (dsl/blocks.py): the block step directly enclosing this one, and which of its
    # lists it is in (a switch case "0", "1"... or "default"; "catch"; "body"; a branch name)
    parent: str | None = None
    branch: str | None = None
    # `catch:` on this step: the first step of its handler list, and the exception class
    # names it takes (empty: any)
    catch: str | None = None
    catch_on: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        detail = {
            "call": self.config.get("function"),
            "for_each": self.config.get("function")
            or (f"run_workflow {self.config['workflow']}" if "workflow" in self.config else None),
            "wait_for_event": self.config.get("event"),
            "send_event": self.config.get("event"),
            "run_workflow": self.config.get("workflow"),
            "wait_for_any": " | ".join(a["name"] for a in self.config.get("alternatives", [])),
        }.get(self.kind)
        return f"{self.kind} {detail}" if detail else self.kind

    @property
    def starts_workflow(self) -> str | None:
        """The workflow this step starts child runs of (run_workflow, or for_each with it)."""
        if self.kind in ("run_workflow", "for_each"):
            target = self.config.get("workflow")
            return target if isinstance(target, str) else None
        return None

    @property
    def listens_for(self) -> str | tuple[str, ...] | None:
        """The event name(s) this step waits for: a `wait_for_event`'s, or those of a
        `wait_for_any`'s event alternatives (sorted); None for any other step."""
        if self.kind == "wait_for_event":
            return str(self.config["event"])
        if self.kind == "wait_for_any":
            names = {a["event"] for a in self.config["alternatives"] if a["kind"] == "event"}
            return tuple(sorted(names)) or None
        return None


# State fields added with nesting: left out of the hash when empty, so a definition without
# blocks keeps the hash it had before they existed
_NESTING = frozenset({"parent", "branch", "catch", "catch_on"})


@dataclass(frozen=True)
class Machine:
    workflow_id: str
    version: str
    name: str
    description: str
    trigger: Trigger
    schema: dict[str, Any] | None
    queue: QueueSpec
    concurrency_key: str | None
    priority: int
    timeout: float | None
    env: tuple[str, ...]
    start: str
    failure_start: str | None
    states: tuple[State, ...]
    output: Any
    output_is_default: bool
    source_path: str = field(default="", compare=False)
    _index: dict[str, State] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update({s.id: s for s in self.states})

    def state(self, state_id: str) -> State:
        return self._index[state_id]

    def main_states(self) -> list[State]:
        return [s for s in self.states if not s.handler]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data; `Machine.from_json(m.to_json()) == m`."""
        data = asdict(self)
        data.pop("_index")
        data.pop("source_path")
        data["format"] = FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source_path: str = "") -> Machine:
        data = dict(data)
        data.pop("format", None)
        states = tuple(
            State(
                **{
                    **s,
                    "retry": RetryPolicy(**{**s["retry"], "on": tuple(s["retry"]["on"])})
                    if s.get("retry")
                    else None,
                    "catch_on": tuple(s.get("catch_on", ())),
                }
            )
            for s in data.pop("states")
        )
        return cls(
            **{
                **data,
                "trigger": Trigger(**data["trigger"]),
                "queue": QueueSpec(**data["queue"]),
                "env": tuple(data["env"]),
                "states": states,
                "source_path": source_path,
            }
        )

    @cached_property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON, source positions left out: the identity a run is
        pinned to. Comments and layout do not change it; any change of meaning does."""
        data = self.to_json()
        data["states"] = [
            {k: v for k, v in s.items() if k != "line" and not (k in _NESTING and not v)}
            for s in data["states"]
        ]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
