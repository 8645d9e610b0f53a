"""`*.test.yaml`: workflow tests written as data, run by `durable-yaml test` on the virtual
clock of `engine.testing`.

    workflow: hourly-report
    payload: {timestamp: "2026-01-01T00:30:00Z"}
    stubs:
      analytics.fetch: [{raise: ConnectionError}, {return: {rows: 3}}]
    events:
      - {at: 10m, send: review.completed, payload: {ok: true}}
      - {at: 1h, complete_token: approve, data: {ok: true}}
    expect:
      status: completed
      output: {rows: 3}
      steps: {fetch_analytics: {attempts: 2, status: completed}}
      logs_contain: ["report generated"]
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsl import DurationError, Machine, Problem, parse_duration
from dsl.catalog import find_test_files  # listing needs no engine: validate imports only it
from dsl.limits import YAML_BYTES_MAX
from dsl.loader import Loaded, _field, load_yaml
from dsl.schema_check import closest

from .errors import EngineError
from .inputs import InputInvalid, check_json
from .models import RunStatus, StepStatus

__all__ = ["TestResult", "check_test_file", "find_test_files", "run_test_file"]

_KEYS = {"workflow", "payload", "stubs", "events", "expect", "name"}
_EXPECT_KEYS = {"status", "output", "error_contains", "steps", "logs_contain"}
_RUN_STATUSES = [s.value for s in RunStatus]
_STEP_STATUSES = [s.value for s in StepStatus]


@dataclass
class TestResult:
    path: str
    passed: bool
    seconds: float
    problems: list[str] = field(default_factory=list)


class TestFileError(Exception):
    """A malformed test file; `where` is the path of keys to the offending value."""

    def __init__(self, message: str, where: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.where = where


def _read(path: Path) -> tuple[Loaded | None, list[Problem]]:
    """The test file by the workflow loader (bounded: size, depth, aliases, no tags)."""
    try:
        text = path.read_bytes()[: YAML_BYTES_MAX + 1].decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(str(path), 1, 1, "", f"cannot read the file: {exc}")]
    loaded, problems = load_yaml(text, str(path))
    if loaded is None and not problems:
        problems = [Problem(str(path), 1, 1, "", "not valid YAML")]
    return loaded, problems


def _load(path: Path) -> dict[str, Any]:
    """The test file, read and checked for shape, so a malformed test is a message, never
    a traceback."""
    loaded, problems = _read(path)
    if loaded is None or problems:
        raise TestFileError("; ".join(str(p) for p in problems[:3]) or "not valid YAML")
    return _shape(loaded.data)


def _shape(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TestFileError("a test file is a mapping with `workflow` and `expect`")
    unknown = set(data) - _KEYS
    if unknown:
        raise TestFileError(
            f"unknown key(s) {sorted(map(str, unknown))}; a test has {sorted(_KEYS)}",
            (sorted(map(str, unknown))[0],),
        )
    if not isinstance(data.get("workflow"), str):
        raise TestFileError("`workflow` must name the workflow under test (its id)", ("workflow",))
    try:
        check_json(data.get("payload"), "payload")
    except InputInvalid as exc:
        raise TestFileError(str(exc), ("payload",)) from None
    stubs = data.get("stubs") or {}
    if not isinstance(stubs, dict):
        raise TestFileError(
            "`stubs` maps step names to lists of {return: VALUE} or {raise: Name}", ("stubs",)
        )
    events = data.get("events") or []
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise TestFileError(
            "`events` is a list of {at, send, payload} or {at, complete_token, data}", ("events",)
        )
    expect = data.get("expect") or {}
    if not isinstance(expect, dict) or set(expect) - _EXPECT_KEYS:
        raise TestFileError(f"`expect` may hold {sorted(_EXPECT_KEYS)}", ("expect",))
    steps = expect.get("steps") or {}
    if not isinstance(steps, dict) or not all(isinstance(v, dict | None) for v in steps.values()):
        raise TestFileError(
            "`expect.steps` maps step ids to {status, attempts, output}", ("expect", "steps")
        )
    if "status" in expect and expect["status"] not in _RUN_STATUSES:
        raise TestFileError(
            f"{expect['status']!r} is not a run status ({', '.join(_RUN_STATUSES)})",
            ("expect", "status"),
        )
    for step_id, want in steps.items():
        unknown_keys = set(want or {}) - {"status", "attempts", "output"}
        if unknown_keys:
            raise TestFileError(
                f"unknown key(s) {sorted(map(str, unknown_keys))}; a step may expect "
                "status, attempts and output",
                ("expect", "steps", step_id),
            )
        if "status" in (want or {}) and want["status"] not in _STEP_STATUSES:
            raise TestFileError(
                f"{want['status']!r} is not a step status ({', '.join(_STEP_STATUSES)})",
                ("expect", "steps", step_id, "status"),
            )
    if not isinstance(expect.get("logs_contain") or [], list):
        raise TestFileError("`expect.logs_contain` is a list of texts", ("expect", "logs_contain"))
    return data


def check_test_file(path: Path, workflows: Mapping[str, Machine]) -> list[Problem]:
    """What `validate` says of a test file, each problem at `path:line:col`: its shape, its
    stubs and events, that its workflow is one of `workflows` and its expected steps exist."""
    loaded, problems = _read(path)
    if loaded is None or problems:
        return problems
    at = loaded.positions

    def problem(where: tuple[str | int, ...], message: str, value: bool = False) -> Problem:
        line, col = at.of_value(where) if value else at.of_key(where)
        return Problem(str(path), line, col, _field(where), message)

    try:
        data = _shape(loaded.data)
        for name, outcomes in (data.get("stubs") or {}).items():
            plan = outcomes if isinstance(outcomes, list) else [outcomes]
            for i, o in enumerate(plan):
                try:
                    _outcome(name, o, i)
                except TestFileError as exc:
                    raise TestFileError(str(exc), ("stubs", name)) from None
        for i, event in enumerate(data.get("events") or []):
            _seconds(event.get("at", 0), f"events[{i}].at", ("events", i, "at"))
            if "send" not in event and "complete_token" not in event:
                raise TestFileError("needs `send: EVENT` or `complete_token: STEP`", ("events", i))
    except TestFileError as exc:
        return [problem(exc.where, str(exc))]
    machine = workflows.get(data["workflow"])
    if machine is None:
        known = ", ".join(sorted(workflows)) or "none"
        return [
            problem(
                ("workflow",),
                f"no workflow has id `{data['workflow']}`{closest(data['workflow'], workflows)}"
                f" (known: {known})",
                value=True,
            )
        ]
    ids = {s.id for s in machine.states}
    return [
        problem(
            ("expect", "steps", step_id),
            f"workflow {machine.workflow_id} has no step `{step_id}`{closest(str(step_id), ids)}",
        )
        for step_id in (data.get("expect") or {}).get("steps") or {}
        if step_id not in ids
    ]


def exception_named(name: str, message: str = "") -> BaseException:
    """An exception of class `name`: a builtin one, or a new class of that name (the engine
    matches `retry.on` and `catch.on` by class name)."""
    text = message or f"{name} (stubbed)"
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            made: BaseException = cls(text)
            return made
        except TypeError:  # a builtin that needs other arguments (UnicodeDecodeError...)
            pass
    error: BaseException = type(name, (Exception,), {})(text)
    return error


def _outcome(name: str, spec: Any, i: int) -> Any:
    if isinstance(spec, dict) and set(spec) <= {"raise", "message"} and "raise" in spec:
        return exception_named(str(spec["raise"]), str(spec.get("message", "")))
    if isinstance(spec, dict) and set(spec) == {"return"}:
        return spec["return"]
    raise TestFileError(
        f"stubs.{name}[{i}]: each outcome is {{return: VALUE}} or {{raise: ClassName}}"
    )


def _seconds(value: Any, where: str, at: tuple[str | int, ...] = ()) -> float:
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise TestFileError(str(exc) if at else f"{where}: {exc}", at) from None


def run_test_file(
    path: Path, workflows: str, modules: Sequence[str], project_dir: str
) -> TestResult:
    from .testing import Env

    started = time.perf_counter()
    problems: list[str] = []
    try:
        spec = _load(path)
        with Env(workflows, modules, project_dir=project_dir) as env:
            for name, outcomes in (spec.get("stubs") or {}).items():
                plan = outcomes if isinstance(outcomes, list) else [outcomes]
                env.stub(str(name), [_outcome(name, o, i) for i, o in enumerate(plan)])
            origin = env.now()
            run = env.start(spec["workflow"], spec.get("payload"))
            events = spec.get("events") or []
            if not isinstance(events, list):
                raise TestFileError(
                    "`events` is a list of {at, send, payload} or {at, complete_token, data}"
                )
            timed = sorted(
                ((_seconds(e.get("at", 0), f"events[{i}].at"), i, e) for i, e in enumerate(events)),
                key=lambda x: (x[0], x[1]),
            )
            for at, i, event in timed:
                env.advance(max(0.0, origin + at - env.now()))
                if "send" in event:
                    env.send_event(str(event["send"]), event.get("payload"))
                elif "complete_token" in event:
                    env.complete_token(run.token(str(event["complete_token"])), event.get("data"))
                else:
                    raise TestFileError(
                        f"events[{i}] needs `send: EVENT` or `complete_token: STEP`"
                    )
            env.run_until_idle()
            problems = _compare(spec.get("expect") or {}, run)
    except TestFileError as exc:
        problems = [str(exc)]
    except (EngineError, LookupError) as exc:
        problems = [f"{type(exc).__name__}: {exc}"]
    except Exception as exc:  # a test file is user input: it fails, it never crashes the run
        problems = [f"the test could not run: {type(exc).__name__}: {exc}"]
    return TestResult(str(path), not problems, time.perf_counter() - started, problems)


def _compare(expect: dict[str, Any], run: Any) -> list[str]:
    problems = []
    if "status" in expect and run.status != expect["status"]:
        detail = f" ({run.error})" if run.error else ""
        problems.append(f"status: expected {expect['status']}, got {run.status}{detail}")
    if "output" in expect and run.output != expect["output"]:
        problems.append(f"output: expected {expect['output']!r}, got {run.output!r}")
    if "error_contains" in expect and str(expect["error_contains"]) not in (run.error or ""):
        problems.append(
            f"error: expected to contain {expect['error_contains']!r}, got {run.error!r}"
        )
    steps = run.steps
    for step_id, want in (expect.get("steps") or {}).items():
        got = steps.get(step_id)
        if got is None:
            problems.append(f"steps.{step_id}: never ran")
            continue
        for key, value in (want or {}).items():
            actual: Any = getattr(got, key, None)
            actual = getattr(actual, "value", actual)
            if actual != value:
                problems.append(f"steps.{step_id}.{key}: expected {value!r}, got {actual!r}")
    messages = [log.message for log in run.logs]
    for text in expect.get("logs_contain") or []:
        if not any(str(text) in m for m in messages):
            problems.append(f"logs: no line contains {text!r}")
    return problems
