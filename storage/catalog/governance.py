"""The catalog's queries for retention and patient opposition: retention ends, purge records,
the opt-out register (keyed digests) and forgetting series. Mixed into `Catalog`, so callers ask
`core.catalog` as for any other query."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from storage import index
from storage.catalog.db import Queries
from storage.models import (
    CohortItem,
    IndexedInstance,
    IndexedSeries,
    IndexedStudy,
    OptOut,
    PipelineResult,
    PurgeRecord,
    Retention,
    SeriesRecord,
    rowcount,
)


class GovernanceQueries(Queries):
    """Retention, purges and the opt-out register."""

    # -- retention ----------------------------------------------------------------------------

    def retention(self, project_id: int) -> Retention | None:
        """The retention end set by hand for a project, if any."""
        with self.session() as s:
            return s.get(Retention, project_id)

    def set_retention(self, project_id: int, until: date, *, by: str, reason: str = "") -> None:
        with self.session() as s:
            row = s.get(Retention, project_id) or Retention(project_id=project_id)
            row.retain_until, row.set_by, row.reason = until, by, reason
            s.add(row)

    def add_purge_record(self, **values: Any) -> PurgeRecord:
        with self.session() as s:
            row = PurgeRecord(**values)
            s.add(row)
        return row

    def purge_records(self, project: str | None = None) -> list[PurgeRecord]:
        """Purges, oldest first (of one project, or all)."""
        with self.session() as s:
            q = select(PurgeRecord).order_by(PurgeRecord.id)
            if project is not None:
                q = q.where(PurgeRecord.project == project)
            return list(s.scalars(q))

    # -- what a patient has in a project ------------------------------------------------------

    def patient_studies(self, project_id: int, pseudonym: str) -> set[str]:
        """Pseudonymous study UIDs of a patient (by pseudonym) in a project: from the pull's
        series rows and from the index (whose PatientID is the pseudonym)."""
        with self.session() as s:
            pulled = select(SeriesRecord.study_uid).where(
                SeriesRecord.project_id == project_id, SeriesRecord.patient_pseudonym == pseudonym
            )
            indexed = select(IndexedStudy.study_uid).where(
                IndexedStudy.project_id == project_id, IndexedStudy.patient_id == pseudonym
            )
            return set(s.scalars(pulled)) | set(s.scalars(indexed))

    def study_series(self, project_id: int, study_uids: Iterable[str]) -> dict[str, str]:
        """{series UID: study UID} of every series of these studies, pulled or derived (SR,
        SEG), complete or not."""
        studies = list(study_uids)
        out: dict[str, str] = {}
        with self.session() as s:
            for model in (SeriesRecord, IndexedSeries):
                q = select(model.series_uid, model.study_uid).where(
                    model.project_id == project_id, model.study_uid.in_(studies)
                )
                out.update((uid, study) for uid, study in s.execute(q))
        return out

    def report_keys(self, project_id: int, series_uids: Iterable[str]) -> list[str]:
        """Store keys of the pipeline reports (PNG) of these series."""
        uids = list(series_uids)
        with self.session() as s:
            q = select(PipelineResult.report_key).where(
                PipelineResult.project_id == project_id,
                PipelineResult.series_uid.in_(uids),
                PipelineResult.report_key.is_not(None),
            )
            return [k for k in s.scalars(q) if k]

    def forget_series(self, project_id: int, series_uids: Iterable[str]) -> int:
        """Delete every catalog row of these series (index, series, results that read or made
        them); returns how many rows went."""
        uids = list(series_uids)
        n = 0
        with self.session() as s:
            for uid in uids:
                n += _count_index_rows(s, project_id, uid)
                index.delete_series(s, project_id, uid)
            n += _deleted(
                s,
                delete(PipelineResult).where(
                    PipelineResult.project_id == project_id,
                    or_(
                        PipelineResult.series_uid.in_(uids),
                        PipelineResult.sr_series_uid.in_(uids),
                        PipelineResult.seg_series_uid.in_(uids),
                    ),
                ),
            )
            n += _deleted(
                s,
                delete(SeriesRecord).where(
                    SeriesRecord.project_id == project_id, SeriesRecord.series_uid.in_(uids)
                ),
            )
        return n

    def forget_project_data(self, project_id: int) -> int:
        """Delete a project's series, index, results and cohort rows (the project row, its
        memberships, retention and the audit trail stay); returns how many rows went."""
        n = 0
        with self.session() as s:
            for model in (
                IndexedInstance,
                IndexedSeries,
                IndexedStudy,
                PipelineResult,
                SeriesRecord,
                CohortItem,
            ):
                n += _deleted(s, delete(model).where(model.project_id == project_id))
        return n

    # -- the opt-out register ----------------------------------------------------------------

    def add_optouts(self, digests: Iterable[str], *, by: str) -> int:
        """Add digests to the register; returns how many were new."""
        fresh = set(digests)
        with self.session() as s:
            have = set(s.scalars(select(OptOut.digest).where(OptOut.digest.in_(fresh))))
            s.add_all(OptOut(digest=d, added_by=by) for d in sorted(fresh - have))
        return len(fresh - have)

    def remove_optouts(self, digests: Iterable[str]) -> int:
        with self.session() as s:
            return _deleted(s, delete(OptOut).where(OptOut.digest.in_(list(digests))))

    def optout_digests(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(OptOut.digest)))

    def optout_count(self) -> int:
        with self.session() as s:
            return int(s.scalar(select(func.count()).select_from(OptOut)) or 0)

    def optouts(self) -> list[OptOut]:
        """The register's rows (digests, when, by whom), oldest first."""
        with self.session() as s:
            return list(s.scalars(select(OptOut).order_by(OptOut.added_at)))


def _count_index_rows(s: Session, project_id: int, series_uid: str) -> int:
    q = select(func.count()).where(
        IndexedInstance.project_id == project_id, IndexedInstance.series_uid == series_uid
    )
    has_series = s.scalar(
        select(func.count()).where(
            IndexedSeries.project_id == project_id, IndexedSeries.series_uid == series_uid
        )
    )
    return int(s.scalar(q) or 0) + int(has_series or 0)


def _deleted(s: Session, stmt: Any) -> int:
    return rowcount(s.execute(stmt))
