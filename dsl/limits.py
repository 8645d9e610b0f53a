"""Every size limit of the language and of the data a run stores, in one place.

The lengths match the columns of `engine/store/schema.py` (a test checks they agree), so a
value that passes `validate` or the engine's input boundary always fits the database.
The JSON Schema in `schemas/` repeats the lengths as `maxLength` (checked by the same test).
"""

from __future__ import annotations

__all__ = [
    "CONCURRENCY_KEY_MAX",
    "EVENT_NAME_MAX",
    "FOR_EACH_CONCURRENCY_MAX",
    "IDEMPOTENCY_KEY_MAX",
    "INT_BITS_MAX",
    "INT_MAX",
    "JSON_DEPTH_MAX",
    "JSON_SIZE_MAX",
    "LATEST_YEAR",
    "MAX_ATTEMPTS_MAX",
    "QUEUE_NAME_MAX",
    "RETRY_FACTOR_MAX",
    "RUN_ID_MAX",
    "RUN_NESTING_MAX",
    "SECONDS_MAX",
    "STEP_ID_MAX",
    "TEMPLATE_OUTPUT_MAX",
    "TEMPLATE_SECONDS",
    "TOKEN_MAX",
    "VERSION_MAX",
    "WORKFLOW_ID_MAX",
    "YAML_ALIASES_MAX",
    "YAML_BYTES_MAX",
    "YAML_DEPTH_MAX",
    "YAML_NODES_MAX",
]

# Column lengths (engine/store/schema.py).
WORKFLOW_ID_MAX = 200  # dy_runs.workflow_id, dy_definitions.workflow_id
RUN_ID_MAX = 40  # dy_runs.id
VERSION_MAX = 100  # dy_runs.version
EVENT_NAME_MAX = 200  # dy_events.name, dy_steps.wait_event
QUEUE_NAME_MAX = 200  # dy_runs.queue, dy_queues.name
STEP_ID_MAX = 100  # dy_runs.current_step is 200, step keys 220: room for item suffixes
IDEMPOTENCY_KEY_MAX = 500  # dy_runs.idempotency_key, dy_idempotency.key
CONCURRENCY_KEY_MAX = 500  # dy_runs.concurrency_key
TOKEN_MAX = 64  # dy_tokens.token

# Workflow files.
YAML_BYTES_MAX = 2 * 1024 * 1024  # a 15,000-step file is about 0.5 MiB
YAML_DEPTH_MAX = 64  # nested mappings and lists
YAML_ALIASES_MAX = 100  # `*name` uses in one file
YAML_NODES_MAX = 200_000  # values after expanding aliases

# Values.
SECONDS_MAX = 10 * 365 * 86400  # any duration: ten years
MAX_ATTEMPTS_MAX = 1000
RETRY_FACTOR_MAX = 100
FOR_EACH_CONCURRENCY_MAX = 100  # threads one for_each step may use
RUN_NESTING_MAX = 32  # child runs inside child runs (run_workflow), at run time
LATEST_YEAR = 9998  # a `wait_until` must fall before 9999 in every timezone
INT_MAX = 2**63 - 1  # whole numbers in files and payloads fit a 64-bit integer

# JSON data (payloads, event data, token data, step outputs, template results).
JSON_DEPTH_MAX = 64
JSON_SIZE_MAX = 1024 * 1024  # bytes of its compact JSON text
TEMPLATE_OUTPUT_MAX = JSON_SIZE_MAX  # characters or items a template may build
TEMPLATE_SECONDS = 1.0  # time one template may take to evaluate
INT_BITS_MAX = 4096  # integers a template may compute
