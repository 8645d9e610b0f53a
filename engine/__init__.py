"""durable-yaml's engine: register steps, run workflows durably, talk to the store."""

from __future__ import annotations

from .client import Client
from .errors import EngineError, NonRetryableError
from .registry import StepContext, step

__all__ = ["Client", "EngineError", "NonRetryableError", "StepContext", "step"]
