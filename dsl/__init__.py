"""The durable-yaml language: YAML workflows validated, compiled into state machines, drawn.

Pure: reads files, never touches a database, never imports `engine`.

Names are imported when first used (PEP 562): `import dsl.limits` or `dsl.errors` costs
nothing more, and a command loads jsonschema, jinja2 or croniter only if it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import Catalog, check_file, check_paths, find_workflow_files, load_workflow
    from .cron import CronError, next_fire_after, next_fires
    from .durations import DurationError, InstantError, parse_duration, parse_instant
    from .errors import DslError, Problem, TemplateError, WorkflowInvalid
    from .graph import render_graph
    from .model import (
        BLOCK_KINDS,
        COMPLETED,
        FAILED,
        WAIT_KINDS,
        Machine,
        QueueSpec,
        RetryPolicy,
        State,
        Trigger,
    )
    from .templates import compile_expression, render_value, when_expression

_WHERE = {
    "catalog": ("Catalog", "check_file", "check_paths", "find_workflow_files", "load_workflow"),
    "cron": ("CronError", "next_fire_after", "next_fires"),
    "durations": ("DurationError", "InstantError", "parse_duration", "parse_instant"),
    "errors": ("DslError", "Problem", "TemplateError", "WorkflowInvalid"),
    "graph": ("render_graph",),
    "model": (
        "BLOCK_KINDS",
        "COMPLETED",
        "FAILED",
        "WAIT_KINDS",
        "Machine",
        "QueueSpec",
        "RetryPolicy",
        "State",
        "Trigger",
    ),
    "templates": ("compile_expression", "render_value", "when_expression"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'dsl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])


__all__ = [
    "BLOCK_KINDS",
    "COMPLETED",
    "FAILED",
    "WAIT_KINDS",
    "Catalog",
    "CronError",
    "DslError",
    "DurationError",
    "InstantError",
    "Machine",
    "Problem",
    "QueueSpec",
    "RetryPolicy",
    "State",
    "TemplateError",
    "Trigger",
    "WorkflowInvalid",
    "check_file",
    "check_paths",
    "compile_expression",
    "find_workflow_files",
    "load_workflow",
    "next_fire_after",
    "next_fires",
    "parse_duration",
    "parse_instant",
    "render_graph",
    "render_value",
    "when_expression",
]
