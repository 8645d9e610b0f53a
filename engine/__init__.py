"""durable-yaml's engine: register steps, run workflows durably, talk to the store.

`Client` is imported when first used (PEP 562): a steps module's `from engine import step`
and the CLI's start-up do not load the store, SQLAlchemy or the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EngineError, NonRetryableError
from .registry import StepContext, step

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Client", "EngineError", "NonRetryableError", "StepContext", "step"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
