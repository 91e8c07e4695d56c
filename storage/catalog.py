"""The catalog (SQLAlchemy; SQLite or PostgreSQL) and every query made on it, by what it returns.

The tables are in `storage.models`. Callers (the pull, the CLI, the web server, pipelines) ask
here instead of writing their own `select`, so a query has one definition and one name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import create_engine, delete, event, func, inspect, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.schema import CreateIndex

from dicom.query import Query
from storage import audit as chain
from storage import index
from storage.exports import ExportQueries
from storage.governance import GovernanceQueries
from storage.jobs import JobQueries
from storage.models import (
    AccessVersion,
    AuditEvent,
    AuditHead,
    Base,
    CohortItem,
    IndexedInstance,
    IndexedSeries,
    IndexedStudy,
    Job,
    Membership,
    OsAccount,
    PipelineResult,
    Project,
    PullLock,
    SeriesRecord,
    User,
    UserRole,
    WebSession,
    get_or_add,
    rowcount,
    utcnow,
)
from storage.requests import RequestQueries

__all__ = [
    "AuditEvent",
    "Catalog",
    "CohortItem",
    "DuplicateProject",
    "Hit",
    "IndexedInstance",
    "IndexedSeries",
    "IndexedStudy",
    "Job",
    "Membership",
    "PipelineResult",
    "Project",
    "PullLock",
    "SeriesRecord",
    "User",
    "UserRole",
    "WebSession",
    "utcnow",
]


Hit = index.Hit
# Changes to these bump `AccessVersion` in the same transaction.
WATCHED = (
    Project,
    User,
    UserRole,
    OsAccount,
    Membership,
    IndexedStudy,
    IndexedSeries,
    IndexedInstance,
    WebSession,  # a sign-out ends a session cached by any worker at once
)
_WATCHED_TABLES = frozenset(m.__tablename__ for m in WATCHED)
_VERSION = "SELECT version FROM access_version WHERE id = 1"
_CHECKED_OUT_AT = "version_at_checkout"  # left by `_fresh_statistics` for `access_version`
log = logging.getLogger(__name__)


def _add_missing_indexes(engine: Engine) -> None:
    """Indexes added to the models since this catalog was made (`create_all` makes indexes
    only with the tables it creates). Only missing ones are created, so an up-to-date catalog
    takes no lock and a role that may not create indexes still opens it (searches are slower,
    and the log says why)."""
    have = inspect(engine)
    missing = [
        ix
        for table in Base.metadata.sorted_tables
        for ix in table.indexes
        if ix.name not in {i["name"] for i in have.get_indexes(table.name)}
    ]
    for ix in missing:
        try:
            with engine.begin() as conn:
                conn.execute(CreateIndex(ix, if_not_exists=True))
        except SQLAlchemyError as e:
            log.warning("catalog: index %s not created (%s)", ix.name, type(e).__name__)


def _add_missing_columns(engine: Engine) -> None:
    """Nullable columns added to the models since this catalog was made (`create_all` does
    not alter tables it finds): the audit chain's `seq` and `hash`, for one. Rows already
    there keep NULL in them."""
    have = inspect(engine)
    for table in Base.metadata.sorted_tables:
        if not have.has_table(table.name):
            continue
        present = {c["name"] for c in have.get_columns(table.name)}
        for col in table.columns:
            if col.name in present or not col.nullable:
                continue
            kind = col.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {col.name} {kind}"))
            except SQLAlchemyError as e:  # another process added it first
                log.warning("catalog: column %s.%s not added (%s)", table.name, col.name, e)


class DuplicateProject(Exception):
    """A project of that name exists already."""


class Catalog(GovernanceQueries, JobQueries, ExportQueries, RequestQueries):
    """Opens the catalog database; its methods are the queries the gateway makes."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, future=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "checkout", _fresh_statistics)
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        _add_missing_indexes(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        _watch_changes(self._sessions)
        try:
            with self.session() as s:
                if s.get(AccessVersion, 1) is None:
                    s.add(AccessVersion(id=1, version=0))
        except IntegrityError:  # another process made it first
            pass
        try:
            with self.session() as s:
                if s.get(AuditHead, 1) is None:  # a new catalog, or one older than the chain
                    s.add(AuditHead(id=1, seq=0, hash=chain.GENESIS))
        except IntegrityError:
            pass

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        with self._sessions.begin() as s:
            yield s

    def dispose(self) -> None:
        self.engine.dispose()

    def access_version(self) -> int:
        """A number that changes with every commit that changes projects, users, roles or the
        QIDO-RS index: one one-row read, for a cache of those to check on each request."""
        try:
            return self._read_version()
        except Exception:  # a pooled connection the server dropped (a PostgreSQL restart)
            return self._read_version()  # once more, on a fresh one

    def _read_version(self) -> int:
        conn = self.engine.raw_connection()  # asked on every web request: no Core overhead
        try:
            # on SQLite the checkout has just read it (`_fresh_statistics`): not twice
            version = conn.info.pop(_CHECKED_OUT_AT, None)
            if version is None:
                version = _version_of(conn)
        except Exception:
            conn.invalidate()  # not back into the pool
            raise
        finally:
            conn.close()
        return int(version or 0)

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

    def record_resolution(self, studies: dict[int, list[str]]) -> None:
        """Remember the studies (pseudonymous UIDs) each cohort item (by id) matched at the
        last pull or plan."""
        with self.session() as s:
            for item_id, uids in studies.items():
                item = s.get(CohortItem, item_id)
                if item is not None:
                    item.studies_found, item.studies = len(uids), sorted(uids)

    def remove_cohort_items(self, project_id: int, kind: str, digests: Iterable[str]) -> list[str]:
        """Remove cohort items by digest; returns the digests that were there."""
        wanted = set(digests)
        with self.session() as s:
            q = select(CohortItem).where(
                CohortItem.project_id == project_id, CohortItem.kind == kind
            )
            gone = [i for i in s.scalars(q) if i.digest in wanted]
            for item in gone:
                s.delete(item)
            return [i.digest for i in gone]

    # -- series -------------------------------------------------------------------------------

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
            row = get_or_add(s, SeriesRecord, project_id=project_id, series_uid=series_uid)
            for k, v in values.items():
                setattr(row, k, v)

    def fail_pending(self, project_id: int, error: str) -> int:
        """Mark a project's pending series failed (a pull that stopped); returns how many."""
        with self.session() as s:
            q = (
                update(SeriesRecord)
                .where(SeriesRecord.project_id == project_id, SeriesRecord.status == "pending")
                .values(status="failed", error=error)
            )
            return rowcount(s.execute(q))

    # -- pull locks (gateway.pull.lock) ---------------------------------------------------------

    def pull_lock(self, project_id: int) -> PullLock | None:
        """Who holds the project's pull lock, if anyone."""
        with self.session() as s:
            return s.get(PullLock, project_id)

    def take_pull_lock(
        self, project_id: int, token: str, *, host: str, pid: int, actor: str, replace: str = ""
    ) -> bool:
        """Take the project's pull lock: a new row, or (`replace`) the row still held under
        that token. False when someone else holds it (or took it first)."""
        now = utcnow()
        values = {"token": token, "host": host, "pid": pid, "actor": actor}
        try:
            with self.session() as s:
                if not replace:
                    s.add(PullLock(project_id=project_id, since=now, heartbeat=now, **values))
                    return True
                q = (
                    update(PullLock)
                    .where(PullLock.project_id == project_id, PullLock.token == replace)
                    .values(since=now, heartbeat=now, **values)
                )
                return bool(rowcount(s.execute(q)))
        except IntegrityError:  # another pull inserted it first
            return False

    def renew_pull_lock(self, project_id: int, token: str) -> bool:
        """The holder's heartbeat; False when the lock is no longer its own."""
        with self.session() as s:
            q = (
                update(PullLock)
                .where(PullLock.project_id == project_id, PullLock.token == token)
                .values(heartbeat=utcnow())
            )
            return bool(rowcount(s.execute(q)))

    def ping(self) -> None:
        """One trivial query: raises when the database does not answer."""
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))

    def held_pull_locks(self) -> list[str]:
        """The names of the projects whose pull lock is held now (for the metrics)."""
        with self.session() as s:
            q = select(Project.name).join(PullLock, PullLock.project_id == Project.id)
            return [str(n) for n in s.scalars(q)]

    def release_pull_lock(self, project_id: int, token: str) -> None:
        """Drop the lock, if it is still the holder's."""
        with self.session() as s:
            s.execute(
                delete(PullLock).where(PullLock.project_id == project_id, PullLock.token == token)
            )

    # -- the QIDO-RS index (storage.index) ----------------------------------------------------

    def index_series(
        self, project_id: int, storage_key: str, headers: list[dict[str, Any]], n_slices: int
    ) -> None:
        """Index a committed series from its headers, replacing any earlier version of it."""
        with self.session() as s:
            index.write_series(s, project_id, storage_key, headers, n_slices)
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

    # -- users and roles ----------------------------------------------------------------------

    def user(self, name: str) -> User | None:
        with self.session() as s:
            return s.scalar(select(User).where(User.name == name))

    def user_by_token_hash(self, token_hash: str) -> User | None:
        """The active user holding this token digest, or None."""
        with self.session() as s:
            return s.scalar(
                select(User).where(User.token_hash == token_hash, User.active.is_(True))
            )

    def user_by_id(self, user_id: int) -> User | None:
        with self.session() as s:
            return s.get(User, user_id)

    # -- web sessions -------------------------------------------------------------------------

    def add_web_session(self, row: WebSession) -> None:
        """Keep a new sign-in (and forget the expired ones)."""
        with self.session() as s:
            s.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))
            s.add(row)

    def web_session(self, digest: str) -> WebSession | None:
        """The unexpired session of that digest, or None."""
        with self.session() as s:
            row = s.scalar(select(WebSession).where(WebSession.digest == digest))
            return row if row is not None and row.expires_at > utcnow() else None

    def end_web_session(self, digest: str) -> None:
        with self.session() as s:
            s.execute(delete(WebSession).where(WebSession.digest == digest))

    def add_user(self, user: User) -> bool:
        """Insert a new user; False when the name is taken."""
        try:
            with self.session() as s:
                s.add(user)
        except IntegrityError:
            return False
        return True

    def update_user(self, name: str, **values: Any) -> bool:
        with self.session() as s:
            u = s.scalar(select(User).where(User.name == name))
            if u is None:
                return False
            for k, v in values.items():
                setattr(u, k, v)
            return True

    def users(self) -> list[User]:
        """Every user, by name."""
        with self.session() as s:
            return list(s.scalars(select(User).order_by(User.name)))

    def user_roles(self, user_id: int) -> set[str]:
        """The global roles a user holds (admin, data-manager, trusted-third-party)."""
        with self.session() as s:
            return set(s.scalars(select(UserRole.role).where(UserRole.user_id == user_id)))

    def add_user_role(self, user_id: int, role: str, by: str) -> bool:
        """Give a user a global role; False when it held it already."""
        with self.session() as s:
            held = s.scalar(
                select(UserRole).where(UserRole.user_id == user_id, UserRole.role == role)
            )
            if held is None:
                s.add(UserRole(user_id=user_id, role=role, granted_by=by))
            return held is None

    def remove_user_role(self, user_id: int, role: str) -> bool:
        """Take a global role away; False when the user did not hold it."""
        with self.session() as s:
            held = s.scalar(
                select(UserRole).where(UserRole.user_id == user_id, UserRole.role == role)
            )
            if held is not None:
                s.delete(held)
            return held is not None

    def role_holders(self, role: str) -> list[User]:
        """The users holding a global role."""
        with self.session() as s:
            q = (
                select(User)
                .join(UserRole, UserRole.user_id == User.id)
                .where(UserRole.role == role)
            )
            return list(s.scalars(q.order_by(User.name)))

    def user_by_os_account(self, login: str) -> User | None:
        """The user an OS account is mapped to, or None."""
        with self.session() as s:
            q = select(User).join(OsAccount, OsAccount.user_id == User.id)
            return s.scalar(q.where(OsAccount.login == login))

    def map_os_account(self, login: str, user_id: int) -> None:
        """Map an OS account to a user (replacing that account's and that user's mapping)."""
        with self.session() as s:
            for old in s.scalars(
                select(OsAccount).where((OsAccount.login == login) | (OsAccount.user_id == user_id))
            ):
                s.delete(old)
            s.flush()
            s.add(OsAccount(login=login, user_id=user_id))

    def os_account(self, user_id: int) -> str | None:
        with self.session() as s:
            return s.scalar(select(OsAccount.login).where(OsAccount.user_id == user_id))

    def grant(self, project_id: int, user_id: int, role: str, by: str) -> None:
        """Give a user a role in a project (replacing the one it had)."""
        with self.session() as s:
            m = get_or_add(s, Membership, project_id=project_id, user_id=user_id)
            m.role, m.granted_by, m.granted_at = role, by, utcnow()

    def role(self, project_id: int, user_id: int) -> str | None:
        """The user's role in the project, or None when not a member."""
        with self.session() as s:
            return s.scalar(
                select(Membership.role).where(
                    Membership.project_id == project_id, Membership.user_id == user_id
                )
            )

    def membership(self, project: str, user_id: int) -> tuple[Project, str] | None:
        """The project of that name and the user's role in it; None unless both exist."""
        with self.session() as s:
            q = (
                select(Project, Membership.role)
                .join(Membership, Membership.project_id == Project.id)
                .where(Project.name == project, Membership.user_id == user_id)
            )
            row = s.execute(q).first()
            return (row[0], row[1]) if row is not None else None

    def user_projects(self, user_id: int) -> list[tuple[Project, str]]:
        """The projects a user is a member of, with the role, by name."""
        with self.session() as s:
            q = (
                select(Project, Membership.role)
                .join(Membership, Membership.project_id == Project.id)
                .where(Membership.user_id == user_id)
                .order_by(Project.name)
            )
            return [(p, r) for p, r in s.execute(q)]

    # -- pipeline results -----------------------------------------------------------------------

    def upsert_result(self, project_id: int, series_uid: str, pipeline: str, **values: Any) -> None:
        """Create or replace the result of `pipeline` for a series (one row per project,
        series and pipeline): columns not given are reset, so nothing of a previous run stays."""
        fresh: dict[str, Any] = {
            "reason": None,
            "values": {},
            "provenance": {},
            "sr_series_uid": None,
            "seg_series_uid": None,
            "report_key": None,
        }
        with self.session() as s:
            row = get_or_add(
                s, PipelineResult, project_id=project_id, series_uid=series_uid, pipeline=pipeline
            )
            for k, v in {**fresh, **values}.items():
                setattr(row, k, v)

    def results(self, project_id: int, pipeline: str | None = None) -> list[PipelineResult]:
        """Pipeline results of a project (of one pipeline), by study and series."""
        with self.session() as s:
            q = select(PipelineResult).where(PipelineResult.project_id == project_id)
            if pipeline is not None:
                q = q.where(PipelineResult.pipeline == pipeline)
            order = (PipelineResult.study_uid, PipelineResult.series_uid, PipelineResult.pipeline)
            return list(s.scalars(q.order_by(*order)))

    def result_states(self, project_id: int, pipeline: str) -> dict[str, tuple[str, str]]:
        """{series UID: (version, status)} of a pipeline's results in a project."""
        with self.session() as s:
            q = select(
                PipelineResult.series_uid, PipelineResult.version, PipelineResult.status
            ).where(PipelineResult.project_id == project_id, PipelineResult.pipeline == pipeline)
            return {uid: (v, st) for uid, v, st in s.execute(q).all()}

    def derived_series_uids(self, project_id: int) -> set[str]:
        """UIDs of the series pipelines made (SR, SEG): outputs, never inputs."""
        with self.session() as s:
            q = select(PipelineResult.sr_series_uid, PipelineResult.seg_series_uid).where(
                PipelineResult.project_id == project_id
            )
            return {uid for row in s.execute(q).all() for uid in row if uid}

    # -- audit --------------------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, project: str | None, outcome: str = "ok", **detail: Any
    ) -> None:
        """Append one audit row in its own transaction, so a failed action is still recorded."""
        self.audit_many(
            [
                {
                    "actor": actor,
                    "action": action,
                    "project": project,
                    "outcome": outcome,
                    "detail": detail,
                }
            ]
        )

    def audit_many(self, rows: Iterable[dict[str, Any]]) -> None:
        """Append audit rows (actor, action, project, outcome, detail dict, at) in one go,
        chained (`storage.audit`)."""
        values = [
            {**r, "detail": json.dumps(r.get("detail") or {}, default=str, sort_keys=True)}
            for r in rows
        ]
        if values:
            with self.session() as s:
                chain.append(s, values)

    def audit_trail(
        self,
        project: str | None = None,
        limit: int = 100,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[AuditEvent]:
        """The most recent audit rows, newest first: of one project (or all), one actor, one
        action (or, ending in `*`, those starting so), at or after `since`, before `until`."""
        with self.session() as s:
            q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
            if project is not None:
                q = q.where(AuditEvent.project == project)
            if actor is not None:
                q = q.where(AuditEvent.actor == actor)
            if action is not None and action.endswith("*"):
                q = q.where(AuditEvent.action.startswith(action[:-1], autoescape=True))
            elif action is not None:
                q = q.where(AuditEvent.action == action)
            if since is not None:
                q = q.where(AuditEvent.at >= since)
            if until is not None:
                q = q.where(AuditEvent.at < until)
            return list(s.scalars(q))

    def audited_project(self, project: str) -> bool:
        """Whether any audit row names this project (one that no longer exists, too)."""
        with self.session() as s:
            q = select(AuditEvent.id).where(AuditEvent.project == project).limit(1)
            return s.scalar(q) is not None

    def verify_audit(self) -> chain.ChainCheck:
        """Walk the audit chain: the first row edited, inserted or deleted, if any."""
        with self.session() as s:
            return chain.verify(s)

    def refusals_since(self, project: str, since: datetime) -> int:
        """Unsolicited instances refused for a project since `since`."""
        with self.session() as s:
            q = select(func.count()).where(
                AuditEvent.project == project,
                AuditEvent.action == "store.refused",
                AuditEvent.at >= since,
            )
            return int(s.scalar(q) or 0)


def _watch_changes(sessions: sessionmaker[Session]) -> None:
    """Bump `AccessVersion` in any transaction that changes a `WATCHED` table, whether through
    the ORM's unit of work or a bulk insert, update or delete."""

    def flushing(session: Session, _context: Any, _instances: Any) -> None:
        changed = (*session.new, *session.dirty, *session.deleted)
        if any(isinstance(o, WATCHED) for o in changed):
            session.info["bump"] = True

    def executing(state: ORMExecuteState) -> None:
        if state.is_insert or state.is_update or state.is_delete:
            mapper = state.bind_mapper
            table = getattr(state.statement, "table", None)  # a statement on the Table itself
            if (mapper is not None and issubclass(mapper.class_, WATCHED)) or (
                table is not None and table.name in _WATCHED_TABLES
            ):
                state.session.info["bump"] = True

    def committing(session: Session) -> None:
        session.flush()  # the last flush runs after this hook: see what it would write
        if session.info.pop("bump", False):
            session.execute(
                update(AccessVersion)
                .where(AccessVersion.id == 1)
                .values(version=AccessVersion.version + 1)
            )

    def rolled_back(session: Session, _transaction: Any) -> None:
        session.info.pop("bump", None)

    event.listen(sessions, "before_flush", flushing)
    event.listen(sessions, "do_orm_execute", executing)
    event.listen(sessions, "before_commit", committing)
    event.listen(sessions, "after_soft_rollback", rolled_back)


def _fresh_statistics(conn: Any, record: Any, _proxy: Any) -> None:
    """SQLite: a connection keeps the planner statistics it loaded when it opened. One opened
    before the index last changed (the access version says so) is replaced by a fresh one,
    which loads the statistics indexing has refreshed since: a server opened on a small
    catalog would otherwise keep walking the order index. Reading the version is one row."""
    record.info.pop(_CHECKED_OUT_AT, None)
    try:
        version = _version_of(conn)
    except Exception:  # noqa: BLE001 - a catalog not created yet: nothing to compare
        return
    seen = record.info.setdefault("statistics_of", version)
    if seen != version:
        raise DisconnectionError("the index changed: a new connection loads its statistics")
    record.info[_CHECKED_OUT_AT] = version


def _version_of(conn: Any) -> int | None:
    """The access version, read on a DB-API connection."""
    cur = conn.cursor()
    try:
        cur.execute(_VERSION)
        row = cur.fetchone()
    finally:
        cur.close()
    return row[0] if row else None


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    # WAL lets readers (status, web) work while a pull writes.
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA case_sensitive_like=ON")  # LIKE as in PostgreSQL (QIDO-RS wildcards)
    cur.execute("PRAGMA analysis_limit=400")  # ANALYZE samples: bounded work on a big catalog
    cur.close()
