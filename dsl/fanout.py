"""Compiling the steps that wait for, or start, several things at once: `wait_for_any`,
`parallel` and `for_each` with `run_workflow`.

Each function checks one step's settings (every mistake placed at its line and column) and
returns the state's `config`; `compiler._step` calls them by kind.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import blocks
from .loader import Path
from .model import State

if TYPE_CHECKING:
    from .compiler import _Checker

__all__ = [
    "ALTERNATIVE_KINDS",
    "check_name",
    "compile_for_each_children",
    "compile_parallel",
    "compile_wait_for_any",
]

# the key that tells an alternative's kind -> the kind stored in the machine
ALTERNATIVE_KINDS = {"event": "event", "token": "token", "wait": "timer"}
_ALTERNATIVE_KEYS = frozenset({"event", "match", "token", "wait"})
NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # an alternative's or a branch's name


def check_name(c: _Checker, where: Path, name: Any, what: str) -> bool:
    """A branch or alternative name: a lowercase word (`steps.<id>.output.<name>` reads it).
    YAML reads an unquoted yes/no/on/off/true/false as a boolean: say so."""
    if isinstance(name, str) and NAME.match(name) and len(name) <= 100:
        return True
    if isinstance(name, bool):
        message = (
            f"this {what} name was read by YAML as {str(name).lower()} (yes, no, on and off "
            "are booleans in YAML): choose another word, or quote it"
        )
    else:
        message = (
            f"{what} name `{name}` is not valid here: use lowercase letters, digits and _, "
            "starting with a letter"
        )
    c.problem(where, message, key=True)
    return False


def compile_wait_for_any(
    c: _Checker, where: Path, raw: dict[str, Any], earlier: Collection[str]
) -> dict[str, Any]:
    """`wait_for_any: {name: {event, match} | {token: true} | {wait: duration}}`: the
    alternatives in document order (a list: JSONB would not keep a mapping's order)."""
    spec = raw.get("wait_for_any")
    at: Path = (*where, "wait_for_any")
    if not isinstance(spec, dict):
        return {"alternatives": []}  # the schema reports its type
    if len(spec) < 2:
        c.problem(
            at,
            "a `wait_for_any` needs at least two alternatives; to wait for one thing use "
            "`wait_for_event`, `wait_for_token` or `wait`",
        )
    alternatives: list[dict[str, Any]] = []
    token_seen: str | None = None
    for name, alt in spec.items():
        here: Path = (*at, name)
        if not check_name(c, here, name, "alternative") or not isinstance(alt, dict):
            continue  # (the schema reports a type that is not a mapping)
        kinds = [k for k in ALTERNATIVE_KINDS if k in alt]
        if not kinds and any(k not in _ALTERNATIVE_KEYS for k in alt):
            continue  # the schema reports the unknown key, with the closest valid one
        if len(kinds) != 1:
            found = ", ".join(f"`{k}`" for k in kinds) or "none"
            c.problem(
                here,
                f"an alternative has exactly one of `event`, `token`, `wait` (found {found})",
            )
            continue
        kind = kinds[0]
        if "match" in alt and kind != "event":
            c.problem((*here, "match"), "`match` belongs to an `event` alternative", key=True)
        entry: dict[str, Any] = {"name": str(name), "kind": ALTERNATIVE_KINDS[kind]}
        if kind == "event":
            event = alt["event"]
            if isinstance(event, str) and event and not event.strip():
                c.problem((*here, "event"), "an event name must not be blank (only whitespace)")
            c.template((*here, "match"), alt.get("match"), earlier)
            entry |= {"event": event, "match": alt.get("match") or {}}
        elif kind == "token":
            if alt["token"] is not True:
                c.problem((*here, "token"), "write `token: true` to wait for a token")
            if token_seen is not None:
                c.problem(
                    here,
                    f"only one `token` alternative (`{token_seen}` is one): the data given to "
                    "`complete` can tell answers apart",
                )
            token_seen = token_seen or str(name)
        else:
            entry["seconds"] = c.duration((*here, "wait"), alt["wait"])
        alternatives.append(entry)
    return {"alternatives": alternatives}


def compile_for_each_children(
    c: _Checker,
    where: Path,
    raw: dict[str, Any],
    earlier: Collection[str],
    config: dict[str, Any],
) -> dict[str, Any]:
    """`for_each` with `run_workflow`: one child run per element, `payload` a template
    that sees the element (its `as` name); `with` belongs to `call`."""
    if raw["run_workflow"] == c.data.get("id"):
        c.problem(
            (*where, "run_workflow"),
            f"`{raw['run_workflow']}` runs itself: a workflow cannot start itself",
        )
    if "with" in raw:
        c.problem((*where, "with"), "`with` belongs to `call`; a child run takes `payload`", True)
    c.template((*where, "payload"), raw.get("payload"), earlier, (config["as"],))
    config = {k: v for k, v in config.items() if k not in ("function", "with")}
    return config | {"workflow": raw["run_workflow"], "payload": raw.get("payload") or {}}


def _parallel_lists(raw: dict[str, Any]) -> list[tuple[Path, str, Any]]:
    spec = raw.get("parallel")
    if not isinstance(spec, dict):
        return []
    return [(("parallel", name), str(name), steps) for name, steps in spec.items()]


def compile_parallel(
    c: _Checker,
    where: Path,
    raw: dict[str, Any],
    own: State,
    earlier: Collection[str],
    handler: bool,
) -> tuple[State, list[State]]:
    """`parallel: {branch: [steps]}` - each branch runs as a child run of this definition
    from its first state to its last (engine/fanout.py); a branch's steps see the steps
    before the parallel step, not another branch's. The config lists the branches in
    document order with their first and last states."""
    spec = raw.get("parallel")
    at: Path = (*where, "parallel")
    states: list[State] = []
    branches: list[dict[str, Any]] = []
    for name, steps in spec.items() if isinstance(spec, dict) else ():
        if not check_name(c, (*at, name), name, "branch"):
            continue
        listed = blocks.compile_steps(
            c,
            steps,
            (*at, name),
            parent=own.id,
            branch=str(name),
            continue_to=own.id,
            on_error=blocks.error_of(own.id),
            earlier=earlier,
            handler=handler,
        )
        inside = [s for s in listed if s.parent == own.id]
        if inside:
            branches.append({"name": str(name), "first": inside[0].id, "last": inside[-1].id})
        states.extend(listed)
    return replace(own, config={"branches": branches}), states


blocks.NESTED_LISTS["parallel"] = _parallel_lists
blocks.NESTED_KEYS.add("parallel")
blocks.NESTED_COMPILERS["parallel"] = compile_parallel
