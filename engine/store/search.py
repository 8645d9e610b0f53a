"""Finding runs by the filters of `runs list`: status, workflow, tags, time range, ids.

Newest first, by the (created_at, id) keyset. A filter with tags is driven by the first
tag's rows in `dy_run_tags` (a primary-key range scan in created_at order), the others
checked by primary-key lookups, so a page costs the same at a thousand runs or a million.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy import and_, func, or_, select

from ..models import Run, RunFilter
from . import schema as t
from .db import Db
from .sqlutil import run_from_row

__all__ = ["Search"]


def _where(q: Any, f: RunFilter, created: Any, run_id: Any) -> Any:
    """`q` restricted by `f`, where `created` and `run_id` are the driving columns."""
    if f.ids:
        q = q.where(run_id.in_(list(f.ids)))
    if f.statuses:
        q = q.where(t.runs.c.status.in_([s.value for s in f.statuses]))
    if f.workflow_id is not None:
        q = q.where(t.runs.c.workflow_id == f.workflow_id)
    if f.since is not None:
        q = q.where(created >= f.since)
    if f.until is not None:
        q = q.where(created < f.until)
    for tag in f.tags[1:]:
        other = t.run_tags.alias()
        q = q.where(
            sa.exists().where(
                other.c.tag == tag, other.c.created_at == created, other.c.run_id == run_id
            )
        )
    return q


def filtered(f: RunFilter, columns: Any = None) -> tuple[Any, Any, Any]:
    """A select of runs matching `f` and the (created_at, id) columns it is ordered by."""
    cols = columns if columns is not None else [t.runs]
    if f.tags:
        tags = t.run_tags
        q = (
            select(*cols)
            .select_from(tags.join(t.runs, t.runs.c.id == tags.c.run_id))
            .where(tags.c.tag == f.tags[0])
        )
        created, run_id = tags.c.created_at, tags.c.run_id
    else:
        q = select(*cols).select_from(t.runs)
        created, run_id = t.runs.c.created_at, t.runs.c.id
    return _where(q, f, created, run_id), created, run_id


class Search:
    def __init__(self, db: Db) -> None:
        self.db = db

    def search_runs(
        self, f: RunFilter, limit: int, before: tuple[float, str] | None = None
    ) -> list[Run]:
        """Runs matching `f`, newest first, after the keyset cursor `before`."""
        q, created, run_id = filtered(f)
        q = _before(q, created, run_id, before)
        q = q.order_by(created.desc(), run_id.desc()).limit(limit)
        with self.db.read() as c:
            return [run_from_row(r) for r in c.execute(q).mappings()]

    def count_runs(self, f: RunFilter) -> int:
        q, _, _ = filtered(f, [func.count()])
        with self.db.read() as c:
            return int(c.execute(q).scalar_one())

    def batches(self, f: RunFilter, size: int) -> Iterator[list[str]]:
        """The ids of the runs matching `f`, newest first, `size` at a time, each page read
        when it is asked for (a keyset walk: rows changed meanwhile are not skipped)."""
        before: tuple[float, str] | None = None
        while True:
            q, created, run_id = filtered(f, [t.runs.c.id, t.runs.c.created_at])
            q = _before(q, created, run_id, before)
            q = q.order_by(created.desc(), run_id.desc()).limit(size)
            with self.db.read() as c:
                rows = c.execute(q).all()
            if not rows:
                return
            yield [r.id for r in rows]
            before = (rows[-1].created_at, rows[-1].id)


def _before(q: Any, created: Any, run_id: Any, before: tuple[float, str] | None) -> Any:
    if before is None:
        return q
    return q.where(or_(created < before[0], and_(created == before[0], run_id < before[1])))
