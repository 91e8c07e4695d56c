"""The catalog's database: the engine (SQLite or PostgreSQL), its sessions, the columns and
indexes added since a catalog was made, and the access version every change to a watched table
bumps. The queries, one module per domain beside this one, build on `Queries`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from sqlalchemy import create_engine, event, inspect, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker
from sqlalchemy.schema import CreateIndex

from storage import audit as chain
from storage.models import (
    AccessVersion,
    AuditHead,
    Base,
    IndexedInstance,
    IndexedSeries,
    IndexedStudy,
    Membership,
    OsAccount,
    Project,
    User,
    UserRole,
    WebSession,
)

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


class Queries:
    """What every domain's queries build on: a transaction (`session`) and the engine, both
    given by `Database`."""

    engine: Engine

    def session(self) -> AbstractContextManager[Session]:  # pragma: no cover - Database's
        raise NotImplementedError

    def _update_one(self, model: type[Base], where: Any, values: dict[str, Any]) -> bool:
        """Set columns of the one row of `model` that `where` finds; False when there is none."""
        with self.session() as s:
            row = s.scalar(select(model).where(where))
            if row is None:
                return False
            for k, v in values.items():
                setattr(row, k, v)
            return True


class Database(Queries):
    """Opens the catalog database: tables, columns and indexes made as needed."""

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

    def ping(self) -> None:
        """One trivial query: raises when the database does not answer."""
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))


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
