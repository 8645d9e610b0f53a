"""The durable-yaml language: YAML workflows validated, compiled into state machines, drawn.

Pure: reads files, never touches a database, never imports `engine`.
"""

from __future__ import annotations

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
