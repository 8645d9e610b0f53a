"""The JSON Schema of the durable-yaml workflow language, shipped with the package."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["workflow_schema"]


@cache
def workflow_schema() -> dict[str, Any]:
    """Return the parsed `workflow.schema.json` (cached; treat as read-only)."""
    text = resources.files(__package__).joinpath("workflow.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
