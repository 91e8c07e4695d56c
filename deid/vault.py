"""The re-identification vault: per-project secrets and the original <-> pseudonym mapping.

It lives in its own database (SQLAlchemy URL, SQLite or PostgreSQL), apart from the catalog and
from research data. Only a user the catalog gives the `trusted-third-party` role may look a
pseudonym up (the caller checks, `core.access`), and every lookup, allowed or not, is written to
the vault's own audit table. Keep the vault's
database credentials away from research users: that is the boundary that really holds.

Sealed: project secrets and original values are encrypted with the vault key (`deid.sealing`),
each bound to its row; rows are found by project, pseudonym or keyed digest, never by an original.
A copy of the database alone reveals nothing. A vault written before it was sealed (plaintext rows)
is sealed in place the first time it is opened with a key, and its free pages wiped (SQLite).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from deid.sealing import VaultKey

log = logging.getLogger(__name__)
TRUSTED_THIRD_PARTY = "trusted-third-party"
KINDS = frozenset({"patient", "accession", "study", "series", "sop", "frame", "uid"})

metadata = MetaData()
secrets_table = Table(
    "vault_secrets",
    metadata,
    Column("project", String(64), primary_key=True),
    Column("secret", LargeBinary(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
)
mappings_table = Table(
    "vault_mappings",
    metadata,
    Column("project", String(64), primary_key=True),
    Column("pseudonym", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("original", Text, nullable=False),
    Column("first_seen", DateTime, nullable=False),
)
_MAPPING_KEY = ["project", "pseudonym"]
cohort_table = Table(
    "vault_cohort",
    metadata,
    Column("project", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("digest", String(64), primary_key=True),  # as the catalog's cohort item has it
    Column("original", Text, nullable=False),
    Column("added_at", DateTime, nullable=False),
)
# Kept for vaults made before roles moved to the catalog: no longer read or written.
grants_table = Table(
    "vault_grants",
    metadata,
    Column("actor", String(128), primary_key=True),
    Column("role", String(64), primary_key=True),
    Column("granted_by", String(128), nullable=False),
    Column("granted_at", DateTime, nullable=False),
)
meta_table = Table(  # "key-check": a digest that tells which key sealed this vault
    "vault_meta",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", String(128), nullable=False),
)
audit_table = Table(
    "vault_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime, nullable=False),
    Column("actor", String(128), nullable=False),
    Column("role", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("project", String(64)),
    Column("pseudonym", String(64)),
    Column("outcome", String(32), nullable=False),
    Column("detail", String(128)),
)


@dataclass(frozen=True)
class AuditEntry:
    at: datetime
    actor: str
    role: str
    action: str
    project: str | None
    pseudonym: str | None
    outcome: str
    detail: str | None = None


class VaultDenied(PermissionError):
    """The actor may not read the vault."""


class WrongVaultKey(ValueError):
    """The key given is not the one this vault was sealed with."""


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Vault:
    """The vault's database. Mappings are buffered and written in batches (`flush`)."""

    def __init__(self, url: str, key: VaultKey, *, batch: int = 1000) -> None:
        self.engine = create_engine(url)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        self.key = key
        self._recognise_key()
        self._batch = batch
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    # -- secrets ----------------------------------------------------------------------------

    def project_secret(self, project: str) -> bytes:
        """The project's 32-byte secret, created on first use and kept for good."""
        with self.engine.begin() as c:
            row = c.execute(
                select(secrets_table.c.secret).where(secrets_table.c.project == project)
            ).first()
            if row:
                return self.key.open(row[0], "secret", project)
        try:
            with self.engine.begin() as c:
                value = secrets.token_bytes(32)
                sealed = self.key.seal(value, "secret", project)
                c.execute(
                    insert(secrets_table).values(project=project, secret=sealed, created_at=_now())
                )
                return value
        except IntegrityError:  # created meanwhile by another process
            return self.project_secret(project)

    # -- mappings ---------------------------------------------------------------------------

    def record(self, project: str, kind: str, original: str, pseudonym: str) -> None:
        """Remember that `pseudonym` stands for `original` (buffered)."""
        self.record_many(project, [(kind, original, pseudonym)], flush=False)

    def record_many(
        self, project: str, items: Iterable[tuple[str, str, str]], *, flush: bool = True
    ) -> None:
        """Remember many (kind, original, pseudonym); written at once unless `flush` is False."""
        now = _now()
        rows = []
        for kind, original, pseudonym in items:
            if kind not in KINDS:
                raise ValueError(f"unknown mapping kind: {kind!r}")
            rows.append(
                {
                    "project": project,
                    "pseudonym": pseudonym,
                    "kind": kind,
                    "original": self.key.seal_text(original, "mapping", project, pseudonym, kind),
                    "first_seen": now,
                }
            )
        with self._lock:
            self._buffer.extend(rows)
            full = len(self._buffer) >= self._batch
        if flush or full:
            self.flush()

    def flush(self) -> int:
        """Write buffered mappings; ones already known are left as they are. Returns rows sent."""
        with self._lock:
            rows, self._buffer = self._buffer, []
        if not rows:
            return 0
        unique = list({(r["project"], r["pseudonym"]): r for r in rows}.values())
        with self.engine.begin() as c:
            dialect = self.engine.dialect.name
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                lite = sqlite_insert(mappings_table)
                c.execute(lite.on_conflict_do_nothing(index_elements=_MAPPING_KEY), unique)
            elif dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                pg = pg_insert(mappings_table)
                c.execute(pg.on_conflict_do_nothing(index_elements=_MAPPING_KEY), unique)
            else:  # portable fallback: skip what exists
                for r in unique:
                    exists = c.execute(
                        select(mappings_table.c.pseudonym).where(
                            mappings_table.c.project == r["project"],
                            mappings_table.c.pseudonym == r["pseudonym"],
                        )
                    ).first()
                    if not exists:
                        c.execute(insert(mappings_table).values(**r))
        return len(unique)

    # -- cohorts ----------------------------------------------------------------------------

    def add_cohort(self, project: str, kind: str, items: Iterable[tuple[str, str]]) -> None:
        """Keep the original values of cohort items, as (digest, original)."""
        rows = [
            {
                "project": project,
                "kind": kind,
                "digest": d,
                "original": self.key.seal_text(o, "cohort", project, kind, d),
                "added_at": _now(),
            }
            for d, o in items
        ]
        if not rows:
            return
        with self.engine.begin() as c:
            have = set(
                c.scalars(
                    select(cohort_table.c.digest).where(
                        cohort_table.c.project == project, cohort_table.c.kind == kind
                    )
                )
            )
            fresh = [r for r in rows if r["digest"] not in have]
            if fresh:
                c.execute(insert(cohort_table), fresh)

    def cohort(self, project: str, *, actor: str, purpose: str) -> dict[tuple[str, str], str]:
        """{(kind, digest): original} of a project's cohort, for the gateway's own use (a pull
        resolving it on the PACS); each read is audited with its purpose."""
        with self.engine.begin() as c:
            rows = c.execute(
                select(cohort_table.c.kind, cohort_table.c.digest, cohort_table.c.original).where(
                    cohort_table.c.project == project
                )
            ).all()
            self._audit(c, actor, "gateway", "cohort.read", project, None, "ok", detail=purpose)
        return {(k, d): self.key.open_text(o, "cohort", project, k, d) for k, d, o in rows}

    def forget_cohort(self, project: str) -> int:
        """Delete a project's cohort values (its purge); returns how many went."""
        with self.engine.begin() as c:
            gone = c.execute(cohort_table.delete().where(cohort_table.c.project == project))
            return int(gone.rowcount or 0)

    def forget_cohort_items(self, project: str, kind: str, digests: Iterable[str]) -> int:
        """Delete the values of some cohort items (`sphere cohort remove`); how many went."""
        wanted = list(set(digests))
        if not wanted:
            return 0
        t = cohort_table
        with self.engine.begin() as c:
            gone = c.execute(
                t.delete().where(t.c.project == project, t.c.kind == kind, t.c.digest.in_(wanted))
            )
            return int(gone.rowcount or 0)

    # -- the trusted third party ------------------------------------------------------------

    def lookup(
        self, project: str, pseudonym: str, *, actor: str, role: str = TRUSTED_THIRD_PARTY
    ) -> str:
        """The original behind `pseudonym`; audited. Who may ask is not the vault's to say: the
        caller has checked the catalog's roles (`core.access`, action vault.lookup) first.

        Raises `VaultDenied` when not asked as the trusted third party, `KeyError` for an
        unknown pseudonym.
        """
        self.flush()
        with self.engine.begin() as c:
            if role != TRUSTED_THIRD_PARTY:
                self._audit(c, actor, role, "lookup", project, pseudonym, "denied")
                row = None
            else:
                row = c.execute(
                    select(mappings_table.c.original, mappings_table.c.kind).where(
                        mappings_table.c.project == project,
                        mappings_table.c.pseudonym == pseudonym,
                    )
                ).first()
                self._audit(
                    c, actor, role, "lookup", project, pseudonym, "found" if row else "not found"
                )
        if role != TRUSTED_THIRD_PARTY:
            raise VaultDenied(f"a lookup is made as the {TRUSTED_THIRD_PARTY} only")
        if row is None:
            raise KeyError(pseudonym)
        return self.key.open_text(row[0], "mapping", project, pseudonym, row[1])

    def audit_denied(self, project: str, pseudonym: str, *, actor: str) -> None:
        """Record a lookup the catalog's roles refused, in the vault's own trail too."""
        with self.engine.begin() as c:
            self._audit(c, actor, "none", "lookup", project, pseudonym, "denied")

    def audit_trail(self, project: str | None = None) -> list[AuditEntry]:
        """Who read or granted what, and when (oldest first)."""
        q = select(audit_table).order_by(audit_table.c.id)
        if project is not None:
            q = q.where(audit_table.c.project == project)
        with self.engine.connect() as c:
            return [
                AuditEntry(
                    r.at, r.actor, r.role, r.action, r.project, r.pseudonym, r.outcome, r.detail
                )
                for r in c.execute(q)
            ]

    def count(self, project: str) -> int:
        """How many mappings the project has (no originals shown)."""
        with self.engine.connect() as c:
            return c.execute(
                select(func.count())
                .select_from(mappings_table)
                .where(mappings_table.c.project == project)
            ).scalar_one()

    def digest(self, domain: str, value: str) -> str:
        """A keyed digest of `value` under the vault key (`VaultKey.digest`): for a register
        found by value (e.g. opted-out patients) that must not keep the value."""
        return self.key.digest(domain, value)

    # -- the key ----------------------------------------------------------------------------

    def _recognise_key(self) -> None:
        """Check the key against the one this vault was sealed with; a new vault takes it, a
        vault from before sealing (plaintext rows) is sealed with it now."""
        check = self.key.check()
        have = self._key_check()
        if have is None:
            try:
                with self.engine.begin() as c:
                    # The insert first: a second process opening the vault waits here, then
                    # finds the row, instead of sealing the same rows twice.
                    c.execute(insert(meta_table).values(name="key-check", value=check))
                    sealed = _seal_plaintext(c, self.key)
            except IntegrityError:
                have = self._key_check()
        if have is not None:
            if not hmac.compare_digest(have.encode(), check.encode()):
                raise WrongVaultKey("the vault key given is not the one this vault was sealed with")
            return
        if any(sealed):
            log.warning(
                "vault sealed in place: %d secrets, %d mappings, %d cohort values encrypted; "
                "copies made before (backups) still hold them in clear",
                *sealed,
            )
            # The cleartext rows' old versions go too: SQLite's free pages and WAL frames,
            # PostgreSQL's dead tuples (its own WAL archive, if kept, still has them).
            auto = self.engine.execution_options(isolation_level="AUTOCOMMIT")
            with auto.connect() as c:
                if self.engine.dialect.name == "sqlite":
                    c.exec_driver_sql("VACUUM")
                    c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                elif self.engine.dialect.name == "postgresql":
                    c.exec_driver_sql("VACUUM FULL vault_secrets, vault_mappings, vault_cohort")

    def _key_check(self) -> str | None:
        with self.engine.connect() as c:
            q = select(meta_table.c.value).where(meta_table.c.name == "key-check")
            return c.execute(q).scalar()

    def close(self) -> None:
        self.flush()
        self.engine.dispose()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _audit(
        c: Any,
        actor: str,
        role: str,
        action: str,
        project: str | None,
        pseudonym: str | None,
        outcome: str,
        detail: str | None = None,
    ) -> None:
        c.execute(
            insert(audit_table).values(
                at=_now(),
                actor=actor,
                role=role,
                action=action,
                project=project,
                pseudonym=pseudonym,
                outcome=outcome,
                detail=detail,
            )
        )


def is_sealed(url: str) -> bool:
    """Whether the vault at `url` was sealed with a key (False: new, or written before sealing)."""
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            if not inspect(c).has_table(meta_table.name):
                return False
            q = select(meta_table.c.value).where(meta_table.c.name == "key-check")
            return c.execute(q).first() is not None
    finally:
        engine.dispose()


def _seal_plaintext(c: Any, key: VaultKey) -> tuple[int, int, int]:
    """Encrypt the rows of a vault written before sealing, in the open transaction `c`."""
    t = secrets_table
    rows = c.execute(select(t.c.project, t.c.secret)).all()
    for project, secret in rows:
        c.execute(
            update(t)
            .where(t.c.project == project)
            .values(secret=key.seal(bytes(secret), "secret", project))
        )
    n_secrets = len(rows)
    m = mappings_table
    rows = c.execute(select(m.c.project, m.c.pseudonym, m.c.kind, m.c.original)).all()
    for project, pseudonym, kind, original in rows:
        c.execute(
            update(m)
            .where(m.c.project == project, m.c.pseudonym == pseudonym)
            .values(original=key.seal_text(original, "mapping", project, pseudonym, kind))
        )
    n_mappings = len(rows)
    k = cohort_table
    rows = c.execute(select(k.c.project, k.c.kind, k.c.digest, k.c.original)).all()
    for project, kind, digest, original in rows:
        c.execute(
            update(k)
            .where(k.c.project == project, k.c.kind == kind, k.c.digest == digest)
            .values(original=key.seal_text(original, "cohort", project, kind, digest))
        )
    return n_secrets, n_mappings, len(rows)


def _sqlite_pragmas(conn: Any, _record: Any) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
