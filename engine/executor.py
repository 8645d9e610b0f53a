"""Executing one attempt of a step, by kind: from a rendered step to an `Outcome`.

Nothing here commits: the runner turns the outcome into one transition. The exceptions are
`for_each` items, each stored as it finishes (through `record_item`) so a crash never runs a
finished item again, and the two kinds that act on other runs through the `Host`:
`send_event` (stored once per run step) and `run_workflow` (a child with a deterministic id).
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from dsl import State, TemplateError, render_value
from dsl.limits import JSON_SIZE_MAX

from . import answers
from .errors import EngineError, ValueNotStorable
from .inputs import InputInvalid, check_json, loggable
from .models import Emission, NewRun, Run
from .registry import StepContext, StepLogger, get_step
from .retry import backoff_delay, is_retryable
from .transitions import Done, Failed, Outcome, Suspended

__all__ = ["Attempt", "Host", "child_run_id", "describe_exception", "execute"]

ERROR_TYPE_MAX = 200  # dy_attempts.error_type
METADATA_MAX = 64 * 1024  # ctx.metadata of one step, as JSON text


class Host(Protocol):
    """What a step may ask of the engine beyond its own run: events and child runs, checked
    and built here, stored by the store with the step's own result."""

    def prepare_event(self, name: str, payload: Any, source: tuple[str, str]) -> Emission: ...

    def prepare_child(
        self, workflow_id: str, payload: Any, parent: tuple[str, str, int], child_id: str
    ) -> NewRun: ...


@dataclass
class Attempt:
    run: Run
    state: State
    attempt: int
    scope: dict[str, Any]
    logger: StepLogger
    now: float
    timeout: float | None  # the step's timeout, capped by what is left of the run's
    host: Host | None
    done_items: dict[int, Any]
    record_item: Callable[[int, int, float, Any], None]
    sleep: Callable[[float], None] = time.sleep
    round_key: str = ""  # inside a repeat body, which round (engine/blocks.py round_key)

    @property
    def field(self) -> str:
        return f"steps.{self.state.id}"

    def render(self, value: Any, key: str, scope: dict[str, Any] | None = None) -> Any:
        return render_value(value, scope or self.scope, f"{self.field}.{key}")


def child_run_id(run_id: str, step_id: str, attempt: int) -> str:
    """The same child for the same parent attempt, whatever crashes in between."""
    return hashlib.sha256(f"{run_id}:{step_id}:{attempt}".encode()).hexdigest()[:28]


def execute(a: Attempt) -> Outcome:
    try:
        return _KINDS[a.state.kind](a)
    except TemplateError as exc:
        return Failed("TemplateError", str(exc), retryable=False)


def _log(a: Attempt) -> Outcome:
    message = str(a.render(a.state.config["message"], "log"))
    a.logger.bind(a.state.id, a.attempt).log(a.state.config.get("level", "info"), message)
    return Done(message)


def _call(a: Attempt) -> Outcome:
    kwargs = a.render(a.state.config["with"], "with")
    return call_function(
        a.run,
        a.state,
        a.state.config["function"],
        kwargs,
        a.attempt,
        a.timeout,
        a.logger.bind(a.state.id, a.attempt),
        a.state.id + a.round_key,
    )


def call_function(
    run: Run,
    state: State,
    function: str,
    kwargs: Any,
    attempt: int,
    timeout: float | None,
    logger: StepLogger,
    key: str,
) -> Outcome:
    try:
        registered = get_step(function)
    except EngineError as exc:
        return Failed("UnknownStep", f"{exc} (steps.{state.id}.call)", retryable=False)
    if not isinstance(kwargs, dict):
        return Failed("TypeError", f"steps.{state.id}.with must give a mapping", retryable=False)
    problem = registered.check_arguments(kwargs)
    if problem:
        return Failed("TypeError", f"{problem} (steps.{state.id}.with)", retryable=False)
    ctx = StepContext(run.id, state.id, attempt, f"{run.id}:{key}", logger)
    try:
        value = registered.invoke(kwargs, ctx, timeout)
    except Exception as exc:
        retryable = state.retry is not None and is_retryable(state.retry, exc)
        status = "timed_out" if isinstance(exc, TimeoutError) else "failed"
        name, message, trace = describe_exception(exc)
        metadata, refused = _metadata(ctx, key)
        if refused is not None:
            return refused
        kinds = tuple(k.__name__ for k in type(exc).__mro__ if k is not object)
        return Failed(name, message, retryable, trace, status, metadata, kinds)
    try:
        check_json(value, f"steps.{key}")
    except InputInvalid as exc:
        return Failed(
            "StepOutputInvalid",
            f"steps.{key}: `{function}` returned a {type(value).__name__}, "
            f"which is not JSON data that can be stored ({exc})",
            retryable=False,
        )
    metadata, refused = _metadata(ctx, key)
    return refused or Done(value, metadata=metadata)


def _metadata(ctx: StepContext, key: str) -> tuple[dict[str, Any] | None, Failed | None]:
    """What the step set on ctx.metadata, through the input boundary (text keys, JSON
    values, bounded in size); a step that set something unstorable fails, not retried."""
    if not ctx.metadata:
        return None, None
    data = dict(ctx.metadata)
    try:
        check_json(data, f"steps.{key}.metadata")
        if len(json.dumps(data)) > METADATA_MAX:
            raise InputInvalid(f"steps.{key}.metadata", f"is larger than {METADATA_MAX} bytes")
    except InputInvalid as exc:
        return None, Failed("MetadataInvalid", str(exc), retryable=False)
    return data, None


def describe_exception(exc: BaseException) -> tuple[str, str, str]:
    """A step's exception as (class name, message, traceback) that can always be shown and
    stored: a message whose `__str__` raises, lone surrogates, NUL, a 50 MB message or a
    200-character class name must not keep the run from recording its failure."""
    name = type(exc).__name__[:ERROR_TYPE_MAX]
    try:
        message = str(exc) or repr(exc)
    except Exception as inner:
        message = f"<its message could not be read: {type(inner).__name__}>"
    try:
        trace = traceback.format_exc()
    except Exception:
        trace = f"{name}: {message}"
    return name, str(loggable(message)), str(loggable(trace))


def _timer(wake_at: float, now: float) -> Outcome:
    return Done(None) if wake_at <= now else Suspended(wake_at, {"kind": "timer"})


def _wait(a: Attempt) -> Outcome:
    return _timer(a.now + float(a.state.config["seconds"]), a.now)


def _wait_until(a: Attempt) -> Outcome:
    return _timer(
        parse_instant(a.render(a.state.config["at"], "wait_until"), f"{a.field}.wait_until"), a.now
    )


def _deadline(a: Attempt) -> float | None:
    return a.now + a.state.timeout if a.state.timeout is not None else None


def _wait_for_event(a: Attempt) -> Outcome:
    match = a.render(a.state.config["match"], "match")
    wait = {"kind": "event", "event": a.state.config["event"], "match": match}
    if a.state.config.get("lookback"):
        wait["lookback"] = float(a.state.config["lookback"])
    return Suspended(_deadline(a), wait)


def _wait_for_token(a: Attempt) -> Outcome:
    return Suspended(_deadline(a), {"kind": "token", "token": answers.new_token()})


def _wait_for_any(a: Attempt) -> Outcome:
    alternatives = a.state.config["alternatives"]
    match = [
        a.render(alt["match"], f"wait_for_any.{alt['name']}.match")
        for alt in alternatives
        if alt["kind"] == "event"
    ]
    wait = answers.any_wait(alternatives, a.now, match)
    return Suspended(answers.wake_at(wait), wait)


def _send_event(a: Attempt) -> Outcome:
    payload = a.render(a.state.config["payload"], "payload")
    if a.host is None:
        return Failed("Unsupported", f"{a.field}: send_event needs the engine", retryable=False)
    try:
        source = (a.run.id, a.state.id + a.round_key)
        emission = a.host.prepare_event(a.state.config["event"], payload, source)
    except EngineError as exc:
        return Failed(type(exc).__name__, f"{a.field}: {exc}", retryable=False)
    # `resumed` is filled in by the store, which answers the waits when it stores the event
    output = {"event_id": emission.event.id, "runs": [r.id for r in emission.runs]}
    return Done(output, emission)


def _run_workflow(a: Attempt) -> Outcome:
    payload = a.render(a.state.config["payload"], "payload")
    if a.host is None:
        return Failed("Unsupported", f"{a.field}: run_workflow needs the engine", retryable=False)
    child = child_run_id(a.run.id, a.state.id, a.attempt)
    try:
        new = a.host.prepare_child(
            a.state.config["workflow"], payload, (a.run.id, a.state.id, a.attempt), child
        )
    except EngineError as exc:
        return Failed(type(exc).__name__, f"{a.field}: {exc}", retryable=False)
    wait = {"kind": "child", "run_id": child, "workflow": a.state.config["workflow"]}
    return Suspended(_deadline(a), wait, (new,))


def _for_each(a: Attempt) -> Outcome:
    cfg = a.state.config
    items = a.render(cfg["items"], "for_each")
    if not isinstance(items, list):
        return Failed(
            "TypeError",
            f"{a.field}.for_each must give a list, not "
            f"{type(items).__name__}: {json.dumps(items, default=str)[:80]}",
            retryable=False,
        )
    failures: list[Failed] = []
    lock = threading.Lock()
    stop = threading.Event()  # recording an item failed (the lease was lost): start no more

    def one(index: int) -> None:
        scope = {**a.scope, cfg["as"]: items[index]}
        key = f"{a.state.id}[{index}]"
        attempt = 1
        while not stop.is_set():
            started = time.time()
            kwargs = a.render(cfg["with"], "with", scope)
            outcome = call_function(
                a.run,
                a.state,
                cfg["function"],
                kwargs,
                attempt,
                a.timeout,
                a.logger.bind(key, attempt),
                key,
            )
            if isinstance(outcome, Done):
                size = len(json.dumps(outcome.output))
                with lock:
                    total[0] += size
                    too_big = total[0] > JSON_SIZE_MAX
                if too_big:  # the step's output (the list of all items') would be refused
                    stop.set()
                    with lock:
                        failures.append(
                            Failed(
                                "StepOutputInvalid",
                                f"{a.field}: the outputs of the items together exceed "
                                f"{JSON_SIZE_MAX} bytes of JSON (at item {index})",
                                retryable=False,
                            )
                        )
                    return
                try:
                    a.record_item(index, attempt, started, outcome.output)
                except ValueNotStorable as exc:
                    stop.set()
                    with lock:
                        failures.append(
                            Failed("StepOutputInvalid", f"item {index}: {exc}", retryable=False)
                        )
                    return
                except BaseException:
                    stop.set()
                    raise
                with lock:
                    a.done_items[index] = outcome.output
                return
            assert isinstance(outcome, Failed)
            policy = a.state.retry
            if not outcome.retryable or policy is None or attempt >= policy.max_attempts:
                with lock:
                    failures.append(
                        Failed(
                            outcome.error_type,
                            f"item {index}: {outcome.message}",
                            False,
                            outcome.traceback,
                        )
                    )
                return
            a.sleep(backoff_delay(policy, attempt))
            attempt += 1

    pending = [i for i in range(len(items)) if i not in a.done_items]
    total = [sum(len(json.dumps(v)) for v in a.done_items.values())]
    workers = max(1, min(int(cfg.get("concurrency") or 1), len(pending)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"for_each:{a.state.id}")
    try:
        # each item in a copy of this context: the attempt's span and run ids (tracing.py)
        for future in [pool.submit(contextvars.copy_context().run, one, i) for i in pending]:
            future.result()
    finally:
        stop.set()  # on an error nothing queued starts; running items end at their next check
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        return min(failures, key=lambda f: f.message)
    return Done([a.done_items[i] for i in range(len(items))])


def parse_instant(value: Any, field: str) -> float:
    if not isinstance(value, str):
        raise TemplateError(field, f"expected an ISO-8601 timestamp, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TemplateError(field, f"{value!r} is not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


_KINDS: dict[str, Callable[[Attempt], Outcome]] = {
    "log": _log,
    "call": _call,
    "wait": _wait,
    "wait_until": _wait_until,
    "wait_for_event": _wait_for_event,
    "wait_for_token": _wait_for_token,
    "wait_for_any": _wait_for_any,
    "send_event": _send_event,
    "run_workflow": _run_workflow,
    "for_each": _for_each,
}
