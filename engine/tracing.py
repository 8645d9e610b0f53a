"""Traces (OpenTelemetry, the `otel` extra) and the run/step ids of log records.

With `DURABLE_YAML_OTEL=1` (and only then is OpenTelemetry imported):

- creating a run (`send`, `trigger`, `run`, a cron fire, a step's `send_event` or
  `run_workflow`) starts and ends a span `run <workflow>` under whatever span is current
  there (the code that sent the event, or the parent's step attempt), and stores its W3C
  `traceparent` in the run's trigger (`trigger.traceparent`);
- every attempt of a step, in whichever process executes it, is a span `<workflow>.<step>`
  under that run span, with `durable_yaml.run_id`, `.workflow`, `.step`, `.attempt`,
  `.step_kind` and `.outcome`; a failed attempt has status ERROR and an `exception` event
  with the error's type and message.

So a run is one trace, continued from its sender, across workers on other machines. A run
stored without a `traceparent` (created with tracing off) gets a trace id derived from its
id, so its attempts still form one trace. The exporter is configured by the standard
`OTEL_*` variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL`
`http/protobuf` (default) or `grpc`, `OTEL_SERVICE_NAME`, ...); `OTEL_TRACES_EXPORTER=console`
prints each span as one line of JSON on stdout instead. A tracer provider the application set
up itself is used as it is.

Independently of tracing, while an attempt executes `current_attempt()` names it, and
`RunContextFilter` puts its `run_id`, `step_id` and `attempt` on every log record (the
worker's log output shows them).
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "RunContextFilter",
    "StepLogFormatter",
    "TraceHeaders",
    "attempt_context",
    "current_attempt",
    "enabled",
    "run_created",
]

log = logging.getLogger("durable_yaml.tracing")
_ATTEMPT: contextvars.ContextVar[tuple[str, str, int] | None] = contextvars.ContextVar(
    "durable_yaml_attempt", default=None
)
_setup_lock = threading.Lock()
_set_up = False


def enabled() -> bool:
    return os.environ.get("DURABLE_YAML_OTEL", "").strip().lower() in ("1", "true", "yes", "on")


def current_attempt() -> tuple[str, str, int] | None:
    """(run id, step id, attempt) of the attempt executing in this context, if any."""
    return _ATTEMPT.get()


# log records ------------------------------------------------------------------------------
class RunContextFilter(logging.Filter):
    """Adds `run_id`, `step_id` and `attempt` (None outside a step) to each record that does
    not carry them already (a `ctx.logger` record carries its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "run_id"):
            current = _ATTEMPT.get()
            record.run_id, record.step_id, record.attempt = current or (None, None, None)
        return True


class StepLogFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(message)s`, then `[run=… step=…#attempt]` when the
    record belongs to a run, then a `ctx.logger` call's `extra` fields as JSON."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        run_id = getattr(record, "run_id", None)
        if run_id:
            step = getattr(record, "step_id", None)
            attempt = getattr(record, "attempt", None)
            where = f" step={step}#{attempt}" if step else ""
            text += f"  [run={run_id}{where}]"
        fields = getattr(record, "fields", None)
        if fields:
            import json

            text += f"  {json.dumps(fields, default=str)}"
        return text


# traces -------------------------------------------------------------------------------------
def _tracer() -> Any:
    from opentelemetry import trace

    _set_up_provider()
    return trace.get_tracer("durable_yaml")


def _set_up_provider() -> None:
    """Install an SDK provider with the exporter of the OTEL_* variables, unless the
    application installed one."""
    global _set_up
    with _setup_lock:
        if _set_up:
            return
        _set_up = True
        from opentelemetry import trace

        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        provider = TracerProvider(
            resource=Resource.create(
                {"service.name": os.environ.get("OTEL_SERVICE_NAME") or "durable-yaml"}
            )
        )
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if kind == "console":
            provider.add_span_processor(
                SimpleSpanProcessor(
                    ConsoleSpanExporter(
                        out=sys.stdout, formatter=lambda span: span.to_json(indent=None) + "\n"
                    )
                )
            )
        elif kind != "none":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
        trace.set_tracer_provider(provider)


def _otlp_exporter() -> Any:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if protocol.strip().lower() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def run_created(trigger: dict[str, Any], run_id: str, workflow_id: str) -> dict[str, Any]:
    """The trigger of a new run, with the `traceparent` of its run span (a child of the
    current span) when tracing is on; without it (a replay copies its original's trigger)."""
    if not enabled():
        if "traceparent" in trigger:
            return {k: v for k, v in trigger.items() if k != "traceparent"}
        return trigger
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    with _tracer().start_as_current_span(
        f"run {workflow_id}",
        attributes={
            "durable_yaml.run_id": run_id,
            "durable_yaml.workflow": workflow_id,
            "durable_yaml.trigger": str(trigger.get("kind", "")),
        },
    ):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    return {**trigger, **({"traceparent": carrier["traceparent"]} if carrier else {})}


def _run_context(run_id: str, trigger: dict[str, Any]) -> Any:
    """The context the run's attempts continue: its stored traceparent, else ids derived
    from the run id."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    traceparent = trigger.get("traceparent") if isinstance(trigger, dict) else None
    if isinstance(traceparent, str):
        ctx = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
        if trace.get_current_span(ctx).get_span_context().is_valid:
            return ctx
    digest = hashlib.sha256(run_id.encode()).digest()
    parent = trace.SpanContext(
        trace_id=int.from_bytes(digest[:16], "big") or 1,
        span_id=int.from_bytes(digest[16:24], "big") or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


class AttemptSpan:
    """What an attempt's observer learns at its end (see `attempt_context`)."""

    def __init__(self, span: Any) -> None:
        self.span = span

    def ended(self, outcome: str, error_type: str | None, message: str | None) -> None:
        if self.span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("durable_yaml.outcome", outcome)
        if outcome == "failed":
            self.span.add_event(
                "exception",
                {"exception.type": error_type or "Error", "exception.message": message or ""},
            )
            self.span.set_status(Status(StatusCode.ERROR, f"{error_type}: {message}"))


@contextmanager
def attempt_context(
    run_id: str, workflow_id: str, trigger: dict[str, Any], step: str, kind: str, attempt: int
) -> Iterator[AttemptSpan]:
    """While one attempt executes: `current_attempt()` names it and, with tracing on, it is
    the current span (so runs and events it creates, and the step's own spans, are its
    children)."""
    token = _ATTEMPT.set((run_id, step, attempt))
    try:
        if not enabled():
            yield AttemptSpan(None)
            return
        with _tracer().start_as_current_span(
            f"{workflow_id}.{step}",
            context=_run_context(run_id, trigger),
            attributes={
                "durable_yaml.run_id": run_id,
                "durable_yaml.workflow": workflow_id,
                "durable_yaml.step": step,
                "durable_yaml.step_kind": kind,
                "durable_yaml.attempt": attempt,
            },
        ) as span:
            yield AttemptSpan(span)
    finally:
        _ATTEMPT.reset(token)


class TraceHeaders:
    """ASGI middleware: with tracing on, a request's `traceparent`/`tracestate` headers are
    the current context while it is handled, so a run it creates continues the caller's
    trace (a POST /api/events from a traced service)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not enabled():
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", [])
            if k in (b"traceparent", b"tracestate")
        }
        if "traceparent" not in headers:
            await self.app(scope, receive, send)
            return
        from opentelemetry import context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        token = context.attach(TraceContextTextMapPropagator().extract(headers))
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)
