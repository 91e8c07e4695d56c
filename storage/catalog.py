"""The catalog (SQLAlchemy; SQLite or PostgreSQL) and every query made on it, by what it returns.

The tables are in `storage.models`. Callers (the pull, the CLI, the web server, pipelines) ask
here instead of writing their own `select`, so a query has one definition and one name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.models import AuditEvent, Base, CohortItem, Project, SeriesRecord, utcnow

__all__ = [
    "AuditEvent",
    "Catalog",
    "CohortItem",
    "DuplicateProject",
    "Project",
    "SeriesRecord",
    "utcnow",
]


class DuplicateProject(Exception):
    """A project of that name exists already."""


class Catalog:
    """Opens the catalog database; its methods are the queries the gateway makes."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()

    # -- projects -----------------------------------------------------------------------------

    def project(self, name: str) -> Project | None:
        """The project of that name, or None."""
        with self.session() as s:
            return s.scalar(select(Project).where(Project.name == name))

    def projects(self) -> list[Project]:
        """Every project, by name."""
        with self.session() as s:
            return list(s.scalars(select(Project).order_by(Project.name)))

    def add_project(self, project: Project) -> None:
        """Insert a new project; `DuplicateProject` if the name is taken."""
        try:
            with self.session() as s:
                s.add(project)
        except IntegrityError:
            raise DuplicateProject(project.name) from None

    def update_project(self, name: str, **values: Any) -> bool:
        """Set columns of a project; False when there is no such project."""
        with self.session() as s:
            p = s.scalar(select(Project).where(Project.name == name))
            if p is None:
                return False
            for k, v in values.items():
                setattr(p, k, v)
            return True

    # -- cohorts ------------------------------------------------------------------------------

    def cohort(self, project_id: int) -> list[CohortItem]:
        """The cohort items of a project (kind and keyed digest; originals are in the vault)."""
        with self.session() as s:
            q = select(CohortItem).where(CohortItem.project_id == project_id)
            return list(s.scalars(q.order_by(CohortItem.id)))

    def add_cohort_items(self, project_id: int, kind: str, digests: Iterable[str]) -> list[str]:
        """Add cohort items by digest; returns the digests that were new."""
        wanted = sorted(set(digests))
        with self.session() as s:
            have = set(
                s.scalars(
                    select(CohortItem.digest).where(
                        CohortItem.project_id == project_id, CohortItem.kind == kind
                    )
                )
            )
            new = [d for d in wanted if d not in have]
            s.add_all(CohortItem(project_id=project_id, kind=kind, digest=d) for d in new)
        return new

    def cohort_counts(self, project_id: int) -> dict[str, int]:
        """Cohort items of a project by kind."""
        with self.session() as s:
            q = (
                select(CohortItem.kind, func.count())
                .where(CohortItem.project_id == project_id)
                .group_by(CohortItem.kind)
            )
            return dict(s.execute(q).all())

    def record_resolution(self, studies_found: dict[int, int]) -> None:
        """Remember how many studies each cohort item (by id) matched at the last pull."""
        with self.session() as s:
            for item_id, n in studies_found.items():
                item = s.get(CohortItem, item_id)
                if item is not None:
                    item.studies_found = n

    # -- series -------------------------------------------------------------------------------

    def series(self, project_id: int, *, status: str | None = None) -> list[SeriesRecord]:
        """The series of a project, with their status (or only those of `status`), by study."""
        with self.session() as s:
            q = select(SeriesRecord).where(SeriesRecord.project_id == project_id)
            if status is not None:
                q = q.where(SeriesRecord.status == status)
            return list(s.scalars(q.order_by(SeriesRecord.study_uid, SeriesRecord.id)))

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

    def upsert_series(self, project_id: int, series_uid: str, **values: Any) -> None:
        """Create or update a series row (by pseudonymous UID) with these column values."""
        with self.session() as s:
            row = s.scalar(
                select(SeriesRecord).where(
                    SeriesRecord.project_id == project_id, SeriesRecord.series_uid == series_uid
                )
            )
            if row is None:
                row = SeriesRecord(project_id=project_id, series_uid=series_uid)
                s.add(row)
            for k, v in values.items():
                setattr(row, k, v)

    # -- audit --------------------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, project: str | None, outcome: str = "ok", **detail: Any
    ) -> None:
        """Append one audit row in its own transaction, so a failed action is still recorded."""
        with self.session() as s:
            s.add(
                AuditEvent(
                    actor=actor,
                    action=action,
                    project=project,
                    outcome=outcome,
                    detail=json.dumps(detail, default=str, sort_keys=True),
                )
            )

    def audit_trail(self, project: str | None = None, limit: int = 100) -> list[AuditEvent]:
        """The most recent audit rows, newest first (of one project, or all)."""
        with self.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            if project is not None:
                q = q.where(AuditEvent.project == project)
            return list(s.scalars(q))

    def refusals_since(self, project: str, since: datetime) -> int:
        """Unsolicited instances refused for a project since `since`."""
        with self.session() as s:
            q = select(func.count()).where(
                AuditEvent.project == project,
                AuditEvent.action == "store.refused",
                AuditEvent.at >= since,
            )
            return int(s.scalar(q) or 0)


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    # WAL lets readers (status, web) work while a pull writes.
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
