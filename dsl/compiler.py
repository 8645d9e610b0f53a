"""From a schema-valid YAML document to a `Machine`, checking what a schema cannot.

The checks: one kind per step, unique step ids, known `call` names (when a registry is given),
templates that compile and only read names in scope, `steps.X` references to earlier steps,
durations, cron expressions and timezones. Every problem is collected; none stops the others.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from functools import cached_property
from typing import Any

import jsonschema

from schemas import workflow_schema

from . import blocks
from .cron import CronError, check_cron, check_timezone
from .durations import DurationError, InstantError, parse_duration, parse_instant
from .errors import Problem, TemplateError
from .fanout import compile_for_each_children, compile_wait_for_any
from .loader import Path, Positions, field_name
from .model import COMPLETED, FAILED, STEP_KINDS, Machine, QueueSpec, RetryPolicy, State, Trigger
from .schema_check import closest
from .templates import compile_expression, is_template, references, when_expression

__all__ = ["compile_document"]

_SCOPE = frozenset({"payload", "steps", "run", "trigger", "env"})
_JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop"})
_DEFAULT_RETRY = RetryPolicy()
_JSON_SCHEMA_TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
_STEP_KEYS = frozenset(workflow_schema()["$defs"]["step"]["properties"])
_TRIGGER_KEYS = frozenset(workflow_schema()["properties"]["trigger"]["properties"])


class _Checker:
    def __init__(self, data: dict[str, Any], positions: Positions, path: str) -> None:
        self.data = data
        self.positions = positions
        self.path = path
        self.problems: list[Problem] = []
        self.env = tuple(v for v in _list(data.get("env")) if isinstance(v, str))
        self.registered: Collection[str] | None = None
        self.seen: dict[str, Path] = {}  # step id -> where it is first defined, whole file
        self.default_retry = _DEFAULT_RETRY

    def compile_step(
        self, where: Path, raw: dict[str, Any], earlier: Collection[str], handler: bool
    ) -> list[State]:
        """The raw step's own state, then the states nested in it (dsl/blocks.py)."""
        own = _step(self, where, raw, self.default_retry, earlier, handler)
        if own is None:
            return []
        return blocks.compile_nested(self, where, raw, own, earlier, handler)

    def problem(self, where: Path, message: str, key: bool = False) -> None:
        line, col = self.positions.of_key(where) if key else self.positions.of_value(where)
        self.problems.append(Problem(self.path, line, col, field_name(where), message))

    def duration(self, where: Path, value: Any) -> float | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except DurationError as exc:
            self.problem(where, str(exc))
            return None

    def template(
        self, where: Path, value: Any, earlier: Collection[str], extra: Collection[str] = ()
    ) -> None:
        """Check every template string in `value`: syntax, names in scope, step references."""
        if isinstance(value, dict):
            for k, v in value.items():
                self.template((*where, k), v, earlier, extra)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                self.template((*where, i), v, earlier, extra)
        elif isinstance(value, str) and is_template(value):
            try:
                expression = compile_expression(value, field_name(where))
            except TemplateError as exc:
                self.problem(where, exc.message)
                return
            if self.scope(where, value, earlier, extra):
                return
            try:  # reads nothing: evaluate it now, in the bounded sandbox
                expression.evaluate({}, field_name(where))
            except TemplateError as exc:
                self.problem(where, exc.message)

    def scope(
        self, where: Path, text: str, earlier: Collection[str], extra: Collection[str]
    ) -> bool:
        """Check the names a template reads; True if it reads any (scope, steps, env)."""
        refs = references(text)
        allowed = _SCOPE | set(extra)
        for name in sorted(refs.names - allowed - _JINJA_GLOBALS):
            self.problem(where, f"unknown name `{name}`{closest(name, allowed)}")
        for step_id in sorted(s for s in refs.steps if s not in earlier):
            if step_id in self.all_step_ids:
                self.problem(where, blocks.unreadable_reason(self.data, step_id, where))
            else:
                self.problem(
                    where, f"unknown step `steps.{step_id}`{closest(step_id, self.all_step_ids)}"
                )
        for name in sorted(refs.env - set(self.env)):
            self.problem(where, f"`env.{name}` is not listed in `env:`; add it there to read it")
        return bool(refs.names - _JINJA_GLOBALS)

    @cached_property
    def all_step_ids(self) -> frozenset[str]:
        return frozenset(
            s["id"]
            for section in ("steps", "on_failure")
            for s in blocks.all_raw_steps(self.data.get(section))
            if isinstance(s.get("id"), str)
        )

    def retry(self, where: Path, value: Any, default: RetryPolicy) -> RetryPolicy:
        if not isinstance(value, dict):
            return default
        min_delay = self.duration((*where, "min_delay"), value.get("min_delay"))
        max_delay = self.duration((*where, "max_delay"), value.get("max_delay"))
        policy = RetryPolicy(
            max_attempts=_int(value.get("max_attempts"), default.max_attempts),
            factor=float(_num(value.get("factor"), default.factor)),
            min_delay=default.min_delay if min_delay is None else min_delay,
            max_delay=default.max_delay if max_delay is None else max_delay,
            jitter=bool(value.get("jitter", default.jitter)),
            on=tuple(str(v) for v in _list(value.get("on"))) or default.on,
        )
        if policy.min_delay > policy.max_delay:
            self.problem(where, "min_delay is longer than max_delay")
        return policy


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _num(value: Any, default: float) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else default


def compile_document(
    data: Any,
    positions: Positions,
    path: str,
    registered: Collection[str] | None = None,
    build: bool = True,
) -> tuple[Machine | None, list[Problem]]:
    """Check the meaning of a document and compile it.

    `registered`, when given, is the set of `@step` names; unknown `call` names are problems.
    `build=False` only checks (the document broke the schema, so it cannot be compiled).
    Returns the machine, or None and the problems.
    """
    if not isinstance(data, dict):
        return None, []  # the schema check says it must be a mapping
    c = _Checker(data, positions, path)
    c.registered = registered
    trigger = _trigger(c, data.get("trigger"))
    workflow_retry = c.retry(("retry",), data.get("retry"), _DEFAULT_RETRY)
    run_timeout = c.duration(("timeout",), data.get("timeout"))
    queue = _queue(c, data.get("queue"), str(data.get("id", "")))
    if isinstance(data.get("schema"), dict):
        _payload_schema(c, data["schema"])
        _pattern_problems(c, data["schema"])
    if isinstance(data.get("concurrency_key"), str):
        c.template(("concurrency_key",), data["concurrency_key"], earlier=())

    c.default_retry = workflow_retry
    raw_handlers = [s for s in _list(data.get("on_failure")) if isinstance(s, dict)]
    failure_start = raw_handlers[0].get("id") if raw_handlers else None
    main = blocks.compile_steps(
        c,
        data.get("steps"),
        ("steps",),
        parent=None,
        branch=None,
        continue_to=COMPLETED,
        on_error=failure_start if isinstance(failure_start, str) else FAILED,
        earlier=(),
        handler=False,
    )
    main_ids = [s.id for s in main]
    handlers = blocks.compile_steps(
        c,
        data.get("on_failure"),
        ("on_failure",),
        parent=None,
        branch=None,
        continue_to=FAILED,
        on_error=None,
        earlier=main_ids,
        handler=True,
    )
    output = data.get("output")
    if "output" in data:
        c.template(("output",), output, earlier=main_ids)
    if c.problems or not build:
        return None, c.problems

    failure_start = handlers[0].id if handlers else None
    states = main + handlers
    machine = Machine(
        workflow_id=data["id"],
        version=data["version"],
        name=str(data.get("name") or data["id"]),
        description=str(data.get("description") or ""),
        trigger=trigger or Trigger("manual"),
        schema=data.get("schema"),
        queue=queue,
        concurrency_key=data.get("concurrency_key"),
        priority=_int(data.get("priority"), 0),
        timeout=run_timeout,
        env=c.env,
        start=states[0].id,
        failure_start=failure_start,
        states=tuple(states),
        output=output,
        output_is_default="output" not in data,
        source_path=path,
    )
    return machine, []


def _payload_schema(c: _Checker, schema: dict[str, Any]) -> None:
    """The payload `schema:` must itself be a valid JSON Schema (2020-12): each mistake is
    placed where it stands, so `type: strin` is caught now, not when a run starts."""
    meta = jsonschema.Draft202012Validator(jsonschema.Draft202012Validator.META_SCHEMA)
    seen: set[Path] = set()
    for error in sorted(meta.iter_errors(schema), key=lambda e: list(map(str, e.absolute_path))):
        where: Path = ("schema", *error.absolute_path)
        if where in seen:
            continue
        seen.add(where)
        if where[-1] == "type" or (len(where) > 2 and where[-2] == "type"):
            types = ", ".join(_JSON_SCHEMA_TYPES)
            message = f"{error.instance!r} is not a JSON Schema type; use one of {types}"
            message += closest(str(error.instance), _JSON_SCHEMA_TYPES)
        else:
            message = f"not a valid JSON Schema: {_short(error.message)}"
        c.problem(where, message)


def _pattern_problems(c: _Checker, schema: dict[str, Any]) -> None:
    """Regular expressions of the payload schema: valid, and without a repeated group of
    repeats (`(a+)+`), which can take exponential time on a short string (ReDoS)."""
    stack: list[tuple[Path, Any]] = [(("schema",), schema)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, list):
            stack.extend(((*where, i), v) for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        patterns: list[tuple[Path, Any]] = [((*where, "pattern"), node.get("pattern"))]
        if isinstance(node.get("patternProperties"), dict):
            patterns += [((*where, "patternProperties"), k) for k in node["patternProperties"]]
        for at, pattern in patterns:
            if not isinstance(pattern, str):
                continue
            try:
                re.compile(pattern)
            except re.error as exc:
                c.problem(at, f"{pattern!r} is not a regular expression: {exc}")
                continue
            if _nested_repeat(pattern):
                c.problem(
                    at,
                    f"{pattern!r} repeats a group that itself repeats, which can take "
                    "exponential time on a short string; write it without nested repetition",
                )
        stack.extend(((*where, k), v) for k, v in node.items())


_ATOM_REPEATED = re.compile(r"(?:\\.|\[(?:\\.|[^\]])*\]|[^\\()\[\]|])(?:[+*]|\{\d*,\d*\})\??")
_QUANTIFIER = re.compile(r"[+*]|\{\d*,\d*\}")


def _nested_repeat(pattern: str) -> bool:
    """True if a group that is only one repeated atom is itself repeated: `(a+)+`,
    `(\\d*)*`, `((x+)){2,}` - the classic exponential backtracking. A heuristic: it does not
    see every ambiguous pattern (`(a|aa)+`), and `(\\.[a-z]+)*` is not flagged."""
    opened: list[int] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            i = _end_of_class(pattern, i)
            continue
        if ch == "(":
            opened.append(i)
        elif ch == ")" and opened:
            body = _strip_group(pattern[opened.pop() : i + 1])
            if _QUANTIFIER.match(pattern, i + 1) and _ATOM_REPEATED.fullmatch(body):
                return True
        i += 1
    return False


def _end_of_class(pattern: str, start: int) -> int:
    """The index just after the character class `[...]` starting at `start`."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


def _strip_group(group: str) -> str:
    """`((?:a+))` -> `a+`: the body of a group, without redundant parentheses."""
    while group.startswith("(") and group.endswith(")"):
        group = group[1:-1].removeprefix("?:")
    return group


def _short(message: str) -> str:
    return message if len(message) <= 200 else message[:197] + "..."


def _check_event_name(c: _Checker, where: Path, name: Any) -> None:
    """An event name of only whitespace could never be sent: send and the API refuse it."""
    if isinstance(name, str) and name and not name.strip():
        c.problem(where, "an event name must not be blank (only whitespace)")


def _trigger(c: _Checker, value: Any) -> Trigger | None:
    if not isinstance(value, dict):
        return None
    kinds = [k for k in ("event", "cron", "manual") if k in value]
    if not kinds and any(k not in _TRIGGER_KEYS for k in value):
        return None  # the schema reports the unknown key, with the closest valid one
    if len(kinds) != 1:
        found = ", ".join(f"`{k}`" for k in kinds) or "none"
        c.problem(
            ("trigger",), f"a trigger has exactly one of `event`, `cron`, `manual` (found {found})"
        )
        return None
    kind = kinds[0]
    if kind != "cron":
        for extra in ("timezone", "missed", "overlap"):
            if extra in value:
                c.problem(
                    ("trigger", extra), f"`{extra}` applies to a `cron` trigger only", key=True
                )
    if kind == "event":
        _check_event_name(c, ("trigger", "event"), value["event"])
    tz = str(value.get("timezone", "UTC"))
    if kind == "cron" and isinstance(value.get("cron"), str):
        try:
            check_cron(value["cron"])
        except CronError as exc:
            c.problem(("trigger", "cron"), str(exc))
        if isinstance(value.get("timezone", "UTC"), str):  # else the schema reports its type
            try:
                check_timezone(tz)
            except CronError as exc:
                c.problem(("trigger", "timezone"), str(exc))
    return Trigger(
        kind=kind,
        event=value.get("event") if kind == "event" else None,
        cron=value.get("cron") if kind == "cron" else None,
        timezone=tz,
        missed=str(value.get("missed", "once")),
        overlap=str(value.get("overlap", "allow")),
    )


def _queue(c: _Checker, value: Any, workflow_id: str) -> QueueSpec:
    if isinstance(value, str):
        return QueueSpec(value)
    if not isinstance(value, dict):
        return QueueSpec(f"workflow:{workflow_id}")
    rate: dict[str, Any] = value["rate_limit"] if isinstance(value.get("rate_limit"), dict) else {}
    period = c.duration(("queue", "rate_limit", "period"), rate.get("period"))
    if period == 0:
        c.problem(("queue", "rate_limit", "period"), "the rate-limit period must be longer than 0")
    return QueueSpec(
        name=str(value.get("name", f"workflow:{workflow_id}")),
        concurrency=value.get("concurrency") if isinstance(value.get("concurrency"), int) else None,
        rate_limit=rate.get("limit") if isinstance(rate.get("limit"), int) else None,
        rate_period=period,
    )


def _step(
    c: _Checker,
    where: Path,
    raw: dict[str, Any],
    default_retry: RetryPolicy,
    earlier: Collection[str],
    handler: bool,
) -> State | None:
    kinds = [k for k in STEP_KINDS if k in raw]
    if "for_each" in kinds and "call" in kinds:
        kinds.remove("call")
    if "for_each" in kinds and "run_workflow" in kinds:
        kinds.remove("run_workflow")
    if len(kinds) != 1:
        if kinds:
            listed = ", ".join(f"`{k}`" for k in kinds)
            c.problem(where, f"a step has exactly one kind; this one has {listed}")
        elif all(k in _STEP_KEYS for k in raw):  # else the unknown key is the mistake
            c.problem(
                where, "a step needs a kind: one of " + ", ".join(f"`{k}`" for k in STEP_KINDS)
            )
        return None
    kind = kinds[0]
    step_id = raw["id"] if isinstance(raw.get("id"), str) else f"step{where[1]}"
    timeout = c.duration((*where, "timeout"), raw.get("timeout"))
    when = None
    if "when" in raw and isinstance(raw["when"], str | bool):
        try:
            when = when_expression(raw["when"], field_name((*where, "when"))).expression
        except TemplateError as exc:
            c.problem((*where, "when"), exc.message)
        else:
            if isinstance(raw["when"], str):
                c.scope((*where, "when"), when or "", earlier, ())
    config: dict[str, Any] = {}
    retry: RetryPolicy | None = None
    if kind in ("call", "for_each", "wait_for_event", "wait_for_token", "run_workflow"):
        retry = c.retry((*where, "retry"), raw.get("retry"), default_retry)
        if kind != "call" and "retry" not in raw:
            retry = RetryPolicy(max_attempts=1)  # a wait or child fails once unless told otherwise

    function = raw.get("call")
    if c.registered is not None and isinstance(function, str) and function not in c.registered:
        c.problem(
            (*where, "call"),
            f"no step is registered as `{function}`{closest(function, c.registered)}",
        )

    def tmpl(key: str, extra: Collection[str] = ()) -> Any:
        c.template((*where, key), raw.get(key), earlier, extra)
        return raw.get(key)

    if kind == "log":
        config = {"message": tmpl("log"), "level": raw.get("level", "info")}
    elif kind == "call":
        config = {"function": raw["call"], "with": tmpl("with") or {}}
    elif kind == "wait":
        config = {"seconds": c.duration((*where, "wait"), raw["wait"])}
    elif kind == "wait_until":
        at = tmpl("wait_until")
        if isinstance(at, str) and not is_template(at):
            try:
                parse_instant(at)
            except InstantError as exc:
                c.problem((*where, "wait_until"), str(exc))
        config = {"at": at}
    elif kind == "wait_for_event":
        _check_event_name(c, (*where, "wait_for_event"), raw["wait_for_event"])
        config = {"event": raw["wait_for_event"], "match": tmpl("match") or {}}
        if "lookback" in raw:
            config["lookback"] = c.duration((*where, "lookback"), raw["lookback"])
    elif kind == "wait_for_token":
        spec = raw.get("wait_for_token")
        token_timeout = spec.get("timeout") if isinstance(spec, dict) else None
        timeout = c.duration((*where, "wait_for_token", "timeout"), token_timeout)
        config = {}
    elif kind == "send_event":
        _check_event_name(c, (*where, "send_event"), raw["send_event"])
        config = {"event": raw["send_event"], "payload": tmpl("payload") or {}}
    elif kind == "run_workflow":
        if raw["run_workflow"] == c.data.get("id"):
            c.problem(
                (*where, "run_workflow"),
                f"`{raw['run_workflow']}` runs itself: a workflow cannot start itself",
            )
        config = {"workflow": raw["run_workflow"], "payload": tmpl("payload") or {}}
    elif kind == "wait_for_any":
        config = compile_wait_for_any(c, where, raw, earlier)
    elif kind == "parallel":
        config = {"branches": []}  # compile_parallel fills it in (dsl/blocks.py)
    elif kind == "for_each":
        name = raw.get("as", "item")
        if not isinstance(name, str):  # the schema reports it; keep compiling the rest
            name = "item"
        if name in _SCOPE:
            c.problem((*where, "as"), f"`{name}` is already a name in templates; choose another")
        if "call" in raw and "run_workflow" in raw:
            c.problem(
                where,
                "a `for_each` step has either `call` (a function per element) or "
                "`run_workflow` (a child run per element), not both",
            )
        elif "call" not in raw and "run_workflow" not in raw:
            c.problem(
                where,
                "a `for_each` step needs `call` (the function run for each element) or "
                "`run_workflow` (the workflow started for each element)",
            )
        items = raw["for_each"]
        if isinstance(items, str):
            if not is_template(items):
                c.problem(
                    (*where, "for_each"),
                    'must be a template giving a list, e.g. "{{ payload.urls }}"',
                )
            tmpl("for_each")
        config = {
            "items": items,
            "as": name,
            "function": raw.get("call"),
            "with": raw.get("with") or {},
            "concurrency": raw.get("concurrency", 1),
        }
        c.template((*where, "with"), raw.get("with"), earlier, (name,))
        if "run_workflow" in raw and "call" not in raw:
            config = compile_for_each_children(c, where, raw, earlier, config)
    return State(
        id=step_id,
        kind=kind,
        config=config,
        next="",
        on_error="",
        when=when,
        retry=retry,
        timeout=timeout,
        handler=handler,
        line=c.positions.of_value(where)[0],
    )
