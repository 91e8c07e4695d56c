"""The catalog's queries for exports: their records, and the series an export selects.
Mixed into `Catalog`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, update

from storage.catalog.db import Queries
from storage.models import Export, IndexedSeries, IndexedStudy, rowcount, utcnow


class ExportQueries(Queries):
    """Export records and selections."""

    def add_export(self, row: Export) -> Export:
        with self.session() as s:
            s.add(row)
        return row

    def update_export(self, export_id: str, **values: Any) -> None:
        with self.session() as s:
            s.execute(update(Export).where(Export.id == export_id).values(**values))

    def finish_export(self, export_id: str, **values: Any) -> None:
        self.update_export(export_id, finished_at=utcnow(), **values)

    def export(self, export_id: str) -> Export | None:
        with self.session() as s:
            return s.get(Export, export_id)

    def exports(self, project: str) -> list[Export]:
        """A project's exports, newest first."""
        with self.session() as s:
            q = select(Export).where(Export.project == project)
            return list(s.scalars(q.order_by(Export.created_at.desc(), Export.id)))

    def exports_deleted(self, project: str) -> int:
        """Mark a project's exports deleted (their zips removed); returns how many."""
        with self.session() as s:
            q = update(Export).where(Export.project == project, Export.state != "deleted")
            return rowcount(s.execute(q.values(state="deleted")))

    def export_series(
        self, project_id: int, studies: Iterable[str] = (), modality: str | None = None
    ) -> list[tuple[IndexedSeries, IndexedStudy]]:
        """The indexed series (what the server serves) of a project with their study rows:
        of these studies (all when none are named) and this modality (any when None), by
        study and series number."""
        wanted = list(studies)
        with self.session() as s:
            q = (
                select(IndexedSeries, IndexedStudy)
                .join(
                    IndexedStudy,
                    (IndexedStudy.project_id == IndexedSeries.project_id)
                    & (IndexedStudy.study_uid == IndexedSeries.study_uid),
                )
                .where(IndexedSeries.project_id == project_id)
            )
            if wanted:
                q = q.where(IndexedSeries.study_uid.in_(wanted))
            if modality:
                q = q.where(IndexedSeries.modality == modality)
            q = q.order_by(
                IndexedStudy.study_date,
                IndexedSeries.study_uid,
                IndexedSeries.series_number,
                IndexedSeries.series_uid,
            )
            return [(se, st) for se, st in s.execute(q).all()]
