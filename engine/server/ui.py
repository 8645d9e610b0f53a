"""What the dashboard's pages show, as pure functions: relative times, what a run waits for,
a step's status as a person reads it, and the trigger form generated from a payload schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

from ..errors import PayloadInvalid
from ..inputs import InputInvalid, parse_json

__all__ = [
    "FINISHED",
    "form_fields",
    "payload_from_form",
    "relative",
    "step_status",
    "time_tag",
    "waiting_for",
]

FINISHED = ("completed", "failed", "cancelled", "expired")


def _ts(value: str | float | None) -> float | None:
    if value is None or value in ("+inf", "-inf"):
        return None
    if isinstance(value, int | float):
        return float(value)
    return datetime.fromisoformat(value).timestamp()


def relative(ts: float, now: float) -> str:
    """`3 min ago` / `in 5 min`: the largest whole unit (s, min, h, d); the same rule as the
    page's script, which keeps the text current."""
    delta = now - ts
    if abs(delta) < 5:
        return "just now"
    seconds = abs(delta)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    return f"{amount} ago" if delta > 0 else f"in {amount}"


def time_tag(value: str | float | None, now: float) -> Markup:
    """A `<time>` with the relative text and the absolute UTC time as its tooltip; `-` if none."""
    ts = _ts(value)
    if ts is None:
        return Markup("-") if value is None else Markup(escape(str(value)))
    stamp = datetime.fromtimestamp(ts, tz=UTC)
    absolute = stamp.strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        stamp.isoformat(), absolute, relative(ts, now)
    )


def step_status(run_status: str, status: str) -> str:
    """A step no one started on a run that has ended was `not reached`, not pending."""
    if status == "pending" and run_status in FINISHED:
        return "not reached"
    return status


def waiting_for(wait: dict[str, Any] | None, wake_at: str | None, step: str) -> dict[str, Any]:
    """What the step `step` of a waiting run waits for: {text, code, until} for the page."""
    wait = wait or {}
    kind = wait.get("kind")
    if kind == "event":
        match = wait.get("match") or {}
        where = " ".join(f"{k}={json.dumps(v)}" for k, v in match.items())
        text = f"event {wait.get('event')}" + (f" where {where}" if where else "")
        return {"text": text, "step": step, "until": wake_at, "until_word": "timeout"}
    if kind == "token":
        return {
            "text": "a person (token)",
            "step": step,
            "code": f"durable-yaml complete {wait.get('token')} --data JSON",
            "until": wake_at,
            "until_word": "timeout",
        }
    if kind == "children":  # a for_each's child runs, a parallel's branch runs
        return {
            "text": f"its child runs ({wait.get('answered')} of {wait.get('items')} ended)",
            "step": step,
            "until": wake_at,
            "until_word": "timeout",
        }
    if kind == "any":  # wait_for_any: the first of its alternatives
        names = []
        for alt in wait.get("alternatives") or []:
            what = {"event": f"event {alt.get('event')}", "token": "a token", "timer": "a timer"}
            names.append(f"{alt['name']} ({what.get(alt['kind'], alt['kind'])})")
        return {
            "text": "the first of " + ", ".join(names),
            "step": step,
            "until": wake_at,
            "until_word": "the timer wins",
        }
    if kind == "child":
        return {
            "text": f"child run of {wait.get('workflow')}",
            "step": step,
            "child": wait.get("run_id"),
        }
    if kind == "timer" or wake_at:
        return {"text": "a timer", "step": step, "until": wake_at, "until_word": "wakes"}
    return {"text": "its next step", "step": step}


# the trigger form -------------------------------------------------------------------------
SIMPLE = ("string", "number", "integer", "boolean")


def form_fields(schema: dict[str, Any] | None) -> tuple[list[dict[str, Any]], bool]:
    """Inputs for a payload schema's top-level string/number/integer/boolean/enum properties,
    and whether a JSON textarea is needed for the rest (other properties, or no properties)."""
    if not isinstance(schema, dict):
        return [], True
    props = schema.get("properties")
    if schema.get("type", "object") != "object" or not isinstance(props, dict) or not props:
        return [], True
    required = set(schema.get("required") or [])
    fields, rest = [], False
    for name, prop in props.items():
        if not isinstance(prop, dict):
            rest = True
            continue
        kind = prop.get("type")
        enum = prop.get("enum")
        if isinstance(enum, list) and enum:
            kind = "enum"
        elif kind not in SIMPLE:
            rest = True
            continue
        fields.append(
            {
                "name": name,
                "kind": kind,
                "required": name in required,
                "description": prop.get("description") or prop.get("title") or "",
                "default": prop.get("default"),
                "options": [{"value": json.dumps(v), "label": str(v)} for v in (enum or [])],
                "min": prop.get("minimum"),
                "max": prop.get("maximum"),
            }
        )
    if schema.get("additionalProperties", True) is not False:
        rest = True
    return fields, rest


def payload_from_form(
    workflow_id: str, fields: list[dict[str, Any]], form: dict[str, str], extra_json: str | None
) -> Any:
    """The payload from the form's values: each input parsed by its schema type, an empty
    optional one left out, merged over the JSON textarea's object. PayloadInvalid (naming the
    field) if a value is not of its type."""
    base: Any = {}
    if extra_json is not None and extra_json.strip():
        try:  # the input boundary's parser: too deep, NaN or too large is a message
            base = parse_json(extra_json, "")
        except InputInvalid as exc:
            raise PayloadInvalid(workflow_id, "payload JSON", exc.message) from None
    if not fields:
        return base
    if not isinstance(base, dict):
        raise PayloadInvalid(
            workflow_id, "payload JSON", "must be an object ({...}) beside the fields"
        )
    payload = dict(base)
    for f in fields:
        raw = form.get(f"f.{f['name']}", "")
        if raw == "":
            continue
        kind = f["kind"]
        try:
            value: Any
            if kind == "enum" or kind == "boolean":
                value = parse_json(raw, "")
            elif kind == "integer":
                value = int(raw)
            elif kind == "number":
                value = float(raw)
                value = int(value) if value.is_integer() and "." not in raw else value
            else:
                value = raw
        except (ValueError, InputInvalid):
            article = "an" if kind in ("integer", "enum") else "a"
            raise PayloadInvalid(
                workflow_id, f"payload.{f['name']}", f"{raw!r} is not {article} {kind}"
            ) from None
        payload[f["name"]] = value
    return payload
