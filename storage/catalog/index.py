"""The catalog's queries on the QIDO-RS index (`storage.index`): write, search, read; and the
catalog's part of committing a series (index, complete, audit: one transaction)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from dicom.query import Query
from storage import audit as chain
from storage import index
from storage.catalog.audit import audit_values
from storage.catalog.db import Queries
from storage.models import IndexedInstance, IndexedSeries, IndexedStudy, set_series

log = logging.getLogger(__name__)


class IndexQueries(Queries):
    """The index of committed series: studies, series, instances."""

    def index_series(
        self, project_id: int, storage_key: str, headers: list[dict[str, Any]], n_slices: int
    ) -> None:
        """Index a committed series from its headers, replacing any earlier version of it."""
        with self.session() as s:
            index.write_series(s, project_id, storage_key, headers, n_slices)
        self._refresh_statistics()

    def commit_series(
        self,
        project_id: int,
        series_uid: str,
        storage_key: str,
        headers: Sequence[dict[str, Any]],
        n_images: int,
        values: dict[str, Any],
        audit: dict[str, Any] | None = None,
    ) -> None:
        """The catalog's part of committing a series (`storage.commit`), in one transaction:
        its QIDO-RS index rows from `headers`, its row complete with `values`, and the audit
        row (actor, action, project, outcome, detail). All of it or none of it."""
        with self.session() as s:
            index.write_series(s, project_id, storage_key, headers, n_images)
            done = {"status": "complete", "storage_key": storage_key}
            set_series(s, project_id, series_uid, {**values, **done})
            if audit is not None:  # last: the chain's head stays locked until the commit
                chain.append(s, audit_values([audit]))
        self._refresh_statistics()

    def unindex_series(self, project_id: int, series_uid: str) -> None:
        with self.session() as s:
            index.delete_series(s, project_id, series_uid)
        self._refresh_statistics()

    def _refresh_statistics(self) -> None:
        """SQLite: the planner's statistics of the QIDO-RS tables, sampled (`analysis_limit`:
        a few ms at any size). Without them it takes the index that gives the search order over
        the one that finds an accession number. PostgreSQL's autovacuum keeps its own.
        Best effort: the series is indexed already; a busy or read-only file only slows
        searches."""
        if self.engine.dialect.name != "sqlite":
            return
        try:
            with self.engine.begin() as conn:
                for model in (IndexedStudy, IndexedSeries, IndexedInstance):
                    conn.exec_driver_sql(f"ANALYZE {model.__tablename__}")
        except SQLAlchemyError as e:
            log.warning("catalog: statistics not refreshed (%s)", type(e).__name__)

    def search(
        self,
        project_id: int,
        query: Query,
        max_rows: int | None = None,
        deadline: float | None = None,
    ) -> list[index.Hit]:
        """The page of a QIDO-RS `query` within one project (bounded by `max_rows` and
        `deadline`: `index.search`)."""
        with self.session() as s:
            return index.search(s, project_id, query, max_rows, deadline)

    def indexed_series(
        self, project_id: int, study_uid: str, series_uid: str | None = None
    ) -> list[IndexedSeries]:
        """A study's indexed series (or the one named), by series number."""
        with self.session() as s:
            q = select(IndexedSeries).where(
                IndexedSeries.project_id == project_id, IndexedSeries.study_uid == study_uid
            )
            if series_uid is not None:
                q = q.where(IndexedSeries.series_uid == series_uid)
            q = q.order_by(IndexedSeries.series_number, IndexedSeries.series_uid)
            return list(s.scalars(q))

    def indexed_instances(
        self, project_id: int, series_uid: str, sop_uid: str | None = None
    ) -> list[IndexedInstance]:
        """A series' indexed instances (or the one named), by stored position."""
        with self.session() as s:
            q = select(IndexedInstance).where(
                IndexedInstance.project_id == project_id, IndexedInstance.series_uid == series_uid
            )
            if sop_uid is not None:
                q = q.where(IndexedInstance.sop_uid == sop_uid)
            return list(s.scalars(q.order_by(IndexedInstance.position)))

    def instance_positions(self, project_id: int, series_uid: str) -> dict[str, tuple[int, bool]]:
        """Each instance of a series: SOP Instance UID -> (stored position, has pixels)."""
        with self.session() as s:
            q = select(
                IndexedInstance.sop_uid, IndexedInstance.position, IndexedInstance.has_pixels
            ).where(
                IndexedInstance.project_id == project_id, IndexedInstance.series_uid == series_uid
            )
            return {sop: (position, bool(pixels)) for sop, position, pixels in s.execute(q)}

    def indexed_studies(
        self, project_id: int, limit: int | None = None, offset: int = 0
    ) -> tuple[list[IndexedStudy], int]:
        """A page of a project's indexed studies, by date, and how many there are in all."""
        with self.session() as s:
            mine = IndexedStudy.project_id == project_id
            q = select(IndexedStudy).where(mine)
            q = q.order_by(IndexedStudy.study_date, IndexedStudy.study_uid)
            page = list(s.scalars(q.offset(offset or None).limit(limit)))
            total = s.scalar(select(func.count()).select_from(IndexedStudy).where(mine)) or 0
            return page, int(total)

    def study_dates(self, project_id: int) -> dict[str, str | None]:
        """{study UID: study date (shifted, YYYYMMDD)} of a project's indexed studies."""
        with self.session() as s:
            q = select(IndexedStudy.study_uid, IndexedStudy.study_date)
            return dict(s.execute(q.where(IndexedStudy.project_id == project_id)).all())
