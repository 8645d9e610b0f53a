"""`wait_for_any`: several alternatives, one answer.

A waiting `wait_for_any` step stores one wait, `{"kind": "any", "alternatives": [...]}`, each
alternative an event (`event`, `match`), a token (`token`) or a timer (`at`). Everything
that can end it writes the inbox row of the step's attempt, exactly as for a single wait
(store/waits.py): the first writer wins, atomically, and every later one learns it lost -
that is the whole of "the others are withdrawn". What is particular to `wait_for_any`:

- each event alternative is indexed by a row of its own in `dy_steps`, keyed
  `<step>@<alternative>` (`alternative_key`), whose `wait_event` is the alternative's
  event name, so an event finds the waits for it by the same index as `wait_for_event`'s;
  such rows answer the step's attempt, never themselves, and are deleted when the wait ends;
- an event's answer carries the name of the alternative it matched
  (`{"winner": name, "data": payload}`); a token's and a timeout's winner follow from the
  wait (one token alternative at most; the earliest timer).

Pure functions: the store and the runner call them.
"""

from __future__ import annotations

import secrets
from typing import Any

from .models import Answer


def new_token() -> str:
    """A token for `complete`: URL-safe and never starting with `-`, which a command line
    would read as an option (`durable-yaml complete -aK...` was "No such option")."""
    while True:
        token = secrets.token_urlsafe(18)
        if not token.startswith("-"):
            return token


__all__ = [
    "ANY",
    "SEPARATOR",
    "alternative_key",
    "alternative_rows",
    "any_wait",
    "decided",
    "new_token",
    "wait_names",
    "waiting_alternatives",
    "wake_at",
]

ANY = "any"
SEPARATOR = "@"  # never in a step id (^[a-z][a-z0-9_]*$), nor in a for_each item key


def any_wait(alternatives: list[dict[str, Any]], now: float, match: list[Any]) -> dict[str, Any]:
    """The wait a `wait_for_any` step parks with, begun at `now`; `match` holds each event
    alternative's rendered `match` values, in order. Its wake time is `wake_at(wait)`."""
    out: list[dict[str, Any]] = []
    matches = iter(match)
    for alt in alternatives:
        entry: dict[str, Any] = {"name": alt["name"], "kind": alt["kind"]}
        if alt["kind"] == "event":
            entry |= {"event": alt["event"], "match": next(matches)}
        elif alt["kind"] == "token":
            entry["token"] = new_token()
        else:
            entry["at"] = now + float(alt["seconds"])
        out.append(entry)
    return {"kind": ANY, "alternatives": out}


def wake_at(wait: dict[str, Any]) -> float | None:
    """When the earliest timer alternative wins, if nothing else has by then."""
    return min((a["at"] for a in _alternatives(wait) if a["kind"] == "timer"), default=None)


def wait_names(wait: dict[str, Any] | None) -> tuple[str, ...]:
    """The event names a wait listens for (the names a commit parking it must lock)."""
    wait = wait or {}
    if wait.get("kind") == "event" and wait.get("event"):
        return (str(wait["event"]),)
    if wait.get("kind") == ANY:
        return tuple(sorted({str(a["event"]) for a in _alternatives(wait) if a["kind"] == "event"}))
    return ()


def alternative_key(step_key: str, name: str) -> str:
    return f"{step_key}{SEPARATOR}{name}"


def alternative_rows(step_key: str, attempt: int, wait: dict[str, Any]) -> list[dict[str, Any]]:
    """The index rows (`dy_steps` values) of a parked wait's event alternatives."""
    rows = []
    for index, alt in enumerate(_alternatives(wait)):
        if alt["kind"] != "event":
            continue
        rows.append(
            {
                "step_key": alternative_key(step_key, alt["name"]),
                "attempts": attempt,
                "wait": {
                    "kind": "event",
                    "event": alt["event"],
                    "match": alt["match"],
                    "answers": step_key,  # the step whose attempt this row answers
                    "alternative": alt["name"],
                    "index": index,
                },
                "wait_event": alt["event"],
            }
        )
    return rows


def decided(wait: dict[str, Any], answer: Answer) -> tuple[str | None, Any]:
    """(winner, data) of an answered `wait_for_any`; winner None for a cancel."""
    alternatives = _alternatives(wait)
    if answer.kind == "event" and isinstance(answer.data, dict) and "winner" in answer.data:
        return str(answer.data["winner"]), answer.data.get("data")
    if answer.kind == "token":
        token = next((a for a in alternatives if a["kind"] == "token"), None)
        return (str(token["name"]) if token else None), answer.data
    if answer.kind == "timeout":
        timers = [a for a in alternatives if a["kind"] == "timer"]
        first = min(timers, key=lambda a: a["at"], default=None)  # min keeps document order
        return (str(first["name"]) if first else None), None
    return None, None


def waiting_alternatives(wait: dict[str, Any]) -> list[dict[str, Any]]:
    """What each alternative of a waiting `wait_for_any` waits for, for `runs show`/API."""
    out = []
    for alt in _alternatives(wait):
        view: dict[str, Any] = {"name": alt["name"], "kind": alt["kind"]}
        if alt["kind"] == "event":
            view |= {"event": alt["event"], "match": alt["match"]}
        elif alt["kind"] == "token":
            view["token"] = alt["token"]
        else:
            view["at"] = alt["at"]
        out.append(view)
    return out


def _alternatives(wait: dict[str, Any]) -> list[dict[str, Any]]:
    alternatives = wait.get("alternatives")
    return alternatives if isinstance(alternatives, list) else []
