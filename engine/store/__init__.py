"""Persistence: the store contract and its SQL implementation (SQLite and PostgreSQL)."""

from __future__ import annotations

from .base import Store
from .sql import SqlStore, normalise_url

__all__ = ["SqlStore", "Store", "normalise_url", "open_store"]


def open_store(url: str, migrate: bool = True) -> SqlStore:
    """Open (and by default create or upgrade) the database at `url`."""
    store = SqlStore(url)
    if migrate:
        store.migrate()
    return store
