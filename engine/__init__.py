"""durable-yaml's engine: register steps, run workflows durably, talk to the store.

Names are imported when first used (PEP 562): a steps module's `from engine import step`
loads the registry, not the store, SQLAlchemy or the server; the CLI's start-up neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EngineError, NonRetryableError

if TYPE_CHECKING:
    from .client import Client
    from .registry import StepContext, step

__all__ = ["Client", "EngineError", "NonRetryableError", "StepContext", "step"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    if name in ("StepContext", "step"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
