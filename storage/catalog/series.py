"""The catalog's queries for a project's series: their status, as a pull or a commit leaves it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from storage.catalog.db import Queries
from storage.models import SeriesRecord, rowcount, set_series


class SeriesQueries(Queries):
    """Series rows (pending, complete, failed) by pseudonymous UID."""

    def series(self, project_id: int, *, status: str | None = None) -> list[SeriesRecord]:
        """The series of a project, with their status (or only those of `status`), by study."""
        with self.session() as s:
            q = select(SeriesRecord).where(SeriesRecord.project_id == project_id)
            if status is not None:
                q = q.where(SeriesRecord.status == status)
            return list(s.scalars(q.order_by(SeriesRecord.study_uid, SeriesRecord.id)))

    def one_series(self, project_id: int, series_uid: str) -> SeriesRecord | None:
        """A series of a project by its pseudonymous UID, or None."""
        with self.session() as s:
            q = select(SeriesRecord).where(
                SeriesRecord.project_id == project_id, SeriesRecord.series_uid == series_uid
            )
            return s.scalar(q)

    def complete_series(self, project_id: int) -> dict[str, int]:
        """{pseudonymous series UID: instances stored} of the project's complete series."""
        with self.session() as s:
            q = select(SeriesRecord.series_uid, SeriesRecord.stored).where(
                SeriesRecord.project_id == project_id, SeriesRecord.status == "complete"
            )
            return dict(s.execute(q).all())

    def series_counts(self, project_id: int) -> dict[str, int]:
        """Series of a project by status."""
        with self.session() as s:
            q = (
                select(SeriesRecord.status, func.count())
                .where(SeriesRecord.project_id == project_id)
                .group_by(SeriesRecord.status)
            )
            return dict(s.execute(q).all())

    def mark_complete(
        self, project_id: int, series_uid: str, storage_key: str, info: Any, **values: Any
    ) -> None:
        """A series committed whole outside a pull (a pipeline's output, a test's data):
        complete, with what `info` (the commit's SeriesInfo) says is stored, all expected."""
        self.upsert_series(
            project_id,
            series_uid,
            status="complete",
            storage_key=storage_key,
            expected=info.n_instances,
            stored=info.n_instances,
            nbytes=info.nbytes,
            shape=list(info.shape),
            **values,
        )

    def upsert_series(self, project_id: int, series_uid: str, **values: Any) -> None:
        """Create or update a series row (by pseudonymous UID) with these column values."""
        with self.session() as s:
            set_series(s, project_id, series_uid, values)

    def fail_pending(self, project_id: int, error: str) -> int:
        """Mark a project's pending series failed (a pull that stopped); returns how many."""
        with self.session() as s:
            q = (
                update(SeriesRecord)
                .where(SeriesRecord.project_id == project_id, SeriesRecord.status == "pending")
                .values(status="failed", error=error)
            )
            return rowcount(s.execute(q))
