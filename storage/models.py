"""The catalog's tables: projects, cohorts (by keyed digest), stored series, the audit trail,
the QIDO-RS index of stored studies, series and instances, and the web's users and their roles.

Series are indexed by their pseudonymous UIDs only; nothing here identifies a patient. The
re-identification mapping and the cohort's original values live in the vault (`deid.vault`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched: `Session.execute` is typed as returning a plain
    Result, but for those statements it is a CursorResult."""
    return cast("CursorResult[Any]", result).rowcount or 0


class Base(DeclarativeBase):
    pass


M = TypeVar("M", bound=Base)


def get_or_add(s: Session, model: type[M], **keys: Any) -> M:
    """The row of `model` with these column values, added to the session when there is none."""
    row = s.scalar(select(model).filter_by(**keys))
    if row is None:
        row = model(**keys)
        s.add(row)
    return row


def set_series(s: Session, project_id: int, series_uid: str, values: dict[str, Any]) -> None:
    """Create or update a series row (by pseudonymous UID) with these column values."""
    row = get_or_add(s, SeriesRecord, project_id=project_id, series_uid=series_uid)
    for k, v in values.items():
        setattr(row, k, v)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(256), default="")
    # declared|approved|revoked|purged; "expired" is approved past `expires_on` (`state`)
    status: Mapped[str] = mapped_column(String(16), default="declared")
    committee_ref: Mapped[str | None] = mapped_column(String(128))
    approved_on: Mapped[date | None] = mapped_column(Date)
    expires_on: Mapped[date | None] = mapped_column(Date)
    approved_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    deid_profile: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    cohort: Mapped[list[CohortItem]] = relationship(back_populates="project", cascade="all")
    series: Mapped[list[SeriesRecord]] = relationship(back_populates="project", cascade="all")

    def state(self, today: date) -> str:
        """declared, approved, expired, revoked or purged: what every listing shows."""
        if self.status == "approved" and self.expires_on and today > self.expires_on:
            return "expired"
        return self.status

    def approval_problem(self, today: date) -> str | None:
        """Why this project may not be pulled today, or None if it may."""
        if self.status != "approved":
            return f"project '{self.name}' is not approved (status: {self.status})"
        if self.approved_on and today < self.approved_on:
            return f"project '{self.name}' approval starts on {self.approved_on.isoformat()}"
        if self.expires_on and today > self.expires_on:
            return f"project '{self.name}' approval expired on {self.expires_on.isoformat()}"
        return None


class CohortItem(Base):
    """One line of a project's cohort, by a keyed digest of its value: the accession number,
    patient ID or study UID itself lives in the vault (`Vault.cohort`), never here."""

    __tablename__ = "cohort_items"
    __table_args__ = (UniqueConstraint("project_id", "kind", "digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(16))  # accession|patient_id|study_uid
    digest: Mapped[str] = mapped_column(String(64))  # ProjectKeys.cohort_digest(kind, value)
    added_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    studies_found: Mapped[int | None] = mapped_column(Integer)  # after the last resolution
    # the pseudonymous UIDs of the studies it matched then (what `sphere cohort list` shows)
    studies: Mapped[list[str] | None] = mapped_column(JSON)

    project: Mapped[Project] = relationship(back_populates="cohort")


class SeriesRecord(Base):
    """A series of a project, by pseudonymous UIDs. Visible to readers only once `complete`."""

    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("project_id", "series_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    patient_pseudonym: Mapped[str] = mapped_column(String(64), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    source: Mapped[str] = mapped_column(String(64), default="")  # the PACS it was pulled from
    expected: Mapped[int] = mapped_column(Integer, default=0)
    stored: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|complete|failed
    storage_key: Mapped[str | None] = mapped_column(String(256))
    nbytes: Mapped[int] = mapped_column(Integer, default=0)
    shape: Mapped[list[int] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    # The transfer syntax UIDs the instances came in (DICOMweb), space-separated.
    transfer_syntax: Mapped[str | None] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    project: Mapped[Project] = relationship(back_populates="series")


class PullLock(Base):
    """Who pulls a project now: one row per project, taken in a transaction, kept alive by a
    heartbeat. A row whose heartbeat is stale (or whose process on this host is gone) may be
    taken over; `token` makes every change a compare-and-swap on the holder."""

    __tablename__ = "pull_locks"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(128), default="")
    since: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """A unit of work a node runs (`storage.catalog.jobs`, `gateway.jobs`): a pull, a pipeline run.

    A node leases it (`token`, `lease_expires`) and renews the lease with each heartbeat; a job
    whose lease ran out is taken up by any node. `progress` holds counts only (instances,
    bytes, series, rate): no identifier of a patient."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state", "not_before"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # pull|run
    project: Mapped[str] = mapped_column(String(64), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # queued|running|waiting|done|failed|cancelled
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    node: Mapped[str | None] = mapped_column(String(255))
    submitted_by: Mapped[str] = mapped_column(String(128), default="")
    submitted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    outcome: Mapped[str | None] = mapped_column(Text)  # one line: what it did, or why it waits
    token: Mapped[str | None] = mapped_column(String(64))  # the lease holder's
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime)
    heartbeat: Mapped[datetime | None] = mapped_column(DateTime)
    not_before: Mapped[datetime | None] = mapped_column(DateTime)  # a waiting job's next try
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # leases taken
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    taken_from = ""  # not stored: set by `take_job`, the node whose lease ran out if one's


class DailyTask(Base):
    """A cluster-wide task done once a day by whichever node claims the day first (the
    retention sweep): the unique (task, day) row is the claim."""

    __tablename__ = "daily_tasks"
    __table_args__ = (UniqueConstraint("task", "day"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task: Mapped[str] = mapped_column(String(32))
    day: Mapped[date] = mapped_column(Date)
    node: Mapped[str] = mapped_column(String(255), default="")
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class SourceSlot(Base):
    """One of a source's `cluster_limit` slots, held by whoever has an association (or request)
    to it open, on any node: leased with an expiry the holder renews, so a dead holder's slot
    frees itself. `token` makes every change a compare-and-swap."""

    __tablename__ = "source_slots"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    token: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str] = mapped_column(String(255), default="")
    expires: Mapped[datetime] = mapped_column(DateTime)


class SourceBucket(Base):
    """A source's instance-rate cap, shared by every node: a token bucket refilled by time.
    `tokens` may go below zero (taken ahead: the taker waits for them); `taken` counts all."""

    __tablename__ = "source_buckets"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float, default=0.0)
    updated: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    taken: Mapped[int] = mapped_column(BigInteger, default=0)


class SourceBreaker(Base):
    """A source's breaker, shared by every node: `misses` counts calls in a row that got no
    answer (any node's); past the source's `breaker_after` it opens (`opened_at`, `opening`
    counts the openings and makes closing a compare-and-swap). While open, whoever moves
    `next_probe` on is the one node that probes the source this interval."""

    __tablename__ = "source_breakers"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    misses: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None] = mapped_column(DateTime)
    next_probe: Mapped[datetime | None] = mapped_column(DateTime)
    probes: Mapped[int] = mapped_column(Integer, default=0)
    opening: Mapped[int] = mapped_column(Integer, default=0)


class AuditEvent(Base):
    """Who did what, when. `detail` never holds identifiers of patients."""

    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    project: Mapped[str | None] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16), default="ok")  # ok|refused|error
    detail: Mapped[str] = mapped_column(Text, default="{}")
    # The chain (`storage.audit`): this row's place and the hash of it and the row before.
    # None on rows written before the catalog had the chain.
    seq: Mapped[int | None] = mapped_column(Integer)
    hash: Mapped[str | None] = mapped_column(String(64))


class AuditHead(Base):
    """One row: the chain's last place and hash. Appending locks it first, so rows written by
    several processes at once still form one chain; a trail cut short no longer reaches it."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64), default="")


class AccessVersion(Base):
    """One row whose number changes with every commit that changes who may see what (projects,
    users, roles) or what is there to see (the QIDO-RS index): a server's caches of those stay
    valid while it is unchanged (`Catalog.access_version`)."""

    __tablename__ = "access_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=0)


# -- the QIDO-RS index: written when a series is committed, read by searches (never Zarr) --------
# Columns hold what searches match on; `dataset` the DICOM JSON of the level's own attributes
# (those every instance below shares), for returning them and matching on the others.


class IndexedStudy(Base):
    """A stored study, by pseudonymous UID; attributes are the de-identified ones."""

    __tablename__ = "qido_studies"
    __table_args__ = (
        UniqueConstraint("project_id", "study_uid"),
        # the search order (so a page is read in order, not sorted), date ranges, accessions
        Index("ix_qido_studies_order", "project_id", "study_date", "study_uid"),
        Index("ix_qido_studies_accession", "project_id", "accession"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(256))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))  # normalised HHMMSS.ffffff
    accession: Mapped[str | None] = mapped_column(String(64))
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(256))
    referring_physician: Mapped[str | None] = mapped_column(String(256))
    modalities: Mapped[str] = mapped_column(String(128), default="")  # "CT\\SR"
    n_series: Mapped[int] = mapped_column(Integer, default=0)
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    dataset: Mapped[str] = mapped_column(Text, default="{}")


class IndexedSeries(Base):
    __tablename__ = "qido_series"
    __table_args__ = (
        UniqueConstraint("project_id", "series_uid"),
        Index("ix_qido_series_study", "project_id", "study_uid"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(256))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(256))
    series_date: Mapped[str | None] = mapped_column(String(8))
    n_instances: Mapped[int] = mapped_column(Integer, default=0)
    committed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    dataset: Mapped[str] = mapped_column(Text, default="{}")
    # The patient and study attributes this series' headers share, merged into its study's
    # row (NULL on a series indexed before they were kept: its study row stands for it).
    study_dataset: Mapped[str | None] = mapped_column(Text, nullable=True)


class IndexedInstance(Base):
    """An instance and where it is: `position` in its series' stored headers (and volume)."""

    __tablename__ = "qido_instances"
    __table_args__ = (
        UniqueConstraint("project_id", "sop_uid"),
        Index("ix_qido_instances_series", "project_id", "series_uid", "position"),
        Index("ix_qido_instances_order", "project_id", "study_uid", "series_uid", "position"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    bits_allocated: Mapped[int | None] = mapped_column(Integer)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    has_pixels: Mapped[bool] = mapped_column(Boolean, default=False)
    dataset: Mapped[str] = mapped_column(Text, default="{}")  # what differs from the series'


# -- web users --------------------------------------------------------------------------------


class User(Base):
    """A web user. Only a digest of the API token is kept; the token is shown once."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")


class UserRole(Base):
    """A global role a user holds: admin, data-manager or trusted-third-party (`core.access`)."""

    __tablename__ = "user_roles"
    __table_args__ = (UniqueConstraint("user_id", "role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    role: Mapped[str] = mapped_column(String(32))
    granted_by: Mapped[str] = mapped_column(String(128), default="")
    granted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class OsAccount(Base):
    """The OS account (login) the CLI maps to a sphere user, when no SPHERE_TOKEN is given.
    A table of its own, not a column of `users`: catalogs made before it open unchanged."""

    __tablename__ = "os_accounts"

    login: Mapped[str] = mapped_column(String(128), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), unique=True)


class Membership(Base):
    """A user's role in a project: investigator or viewer."""

    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("project_id", "user_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    role: Mapped[str] = mapped_column(String(16))
    granted_by: Mapped[str] = mapped_column(String(128), default="")
    granted_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WebSession(Base):
    """A browser's sign-in, by a digest of its cookie's random value (the value is never kept).
    Deleted at sign-out; ended as well when the user's token changes or the user is revoked
    (`token_fingerprint` no longer matches, or the user is not active)."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_fingerprint: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


# -- pipeline results -------------------------------------------------------------------------


class PipelineResult(Base):
    """One pipeline's result for one series of a project: a re-run replaces it.

    `status`: ok (measured), unmeasurable (ran; the method declined, `reason` says why),
    ineligible (the series does not qualify, `reason` says why) or failed (an error; retried
    by the next run). `values` are the measurements, `provenance` what produced them (version,
    parameters, input and model checksums, device). Derived series (SR, SEG) by pseudonymous UID.
    """

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("project_id", "series_uid", "pipeline"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # ok|unmeasurable|ineligible|failed
    reason: Mapped[str | None] = mapped_column(Text)
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sr_series_uid: Mapped[str | None] = mapped_column(String(64))
    seg_series_uid: Mapped[str | None] = mapped_column(String(64))
    report_key: Mapped[str | None] = mapped_column(String(256))  # the PNG report in the store
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


# -- retention and patient opposition -----------------------------------------------------------


class Retention(Base):
    """A project's retention end set by hand (`sphere project retain`); without a row it is the
    approval's expiry plus the settings' grace period (`core.retention.retention_end`)."""

    __tablename__ = "retention"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    retain_until: Mapped[date] = mapped_column(Date)
    set_by: Mapped[str] = mapped_column(String(128), default="")
    set_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    reason: Mapped[str] = mapped_column(Text, default="")


class PurgeRecord(Base):
    """What a purge removed: a whole project (retention) or one patient's series (opt-out).
    Counts only; the audit trail has a row for each too."""

    __tablename__ = "purges"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    project: Mapped[str] = mapped_column(String(64), index=True)
    scope: Mapped[str] = mapped_column(String(16))  # project|optout
    reason: Mapped[str] = mapped_column(Text, default="")
    series: Mapped[int] = mapped_column(Integer, default=0)
    objects: Mapped[int] = mapped_column(Integer, default=0)
    nbytes: Mapped[int] = mapped_column(BigInteger, default=0)
    rows: Mapped[int] = mapped_column(Integer, default=0)  # catalog rows deleted


class OptOut(Base):
    """A patient who objects, by a keyed digest of their Patient ID (`core.optout`): the key
    is in the vault, so this table alone tells nobody who they are."""

    __tablename__ = "optouts"

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    added_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    added_by: Mapped[str] = mapped_column(String(128), default="")


# -- exports --------------------------------------------------------------------------------


class Export(Base):
    """A project's study set written as one zip to the store (`exports/<project>/<id>.zip`):
    who asked, what (format, studies, modality), its size. `state`: running, done, failed, or
    deleted (the project's retention ended; the zip is gone, the record stays)."""

    __tablename__ = "exports"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    format: Mapped[str] = mapped_column(String(8))  # dicom|nifti|zarr
    selection: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # the patients' pseudonyms it holds: an opted-out patient's exports are deleted
    patients: Mapped[list[str] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="running")
    key: Mapped[str] = mapped_column(String(256))
    nbytes: Mapped[int] = mapped_column(BigInteger, default=0)
    n_files: Mapped[int] = mapped_column(Integer, default=0)
    n_series: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)


# -- study requests -------------------------------------------------------------------------------


class StudyRequest(Base):
    """An investigator's request for a study set within a project, until a data manager decides.

    Its values are originals: `sealed` holds them sealed to the vault key's inbox (only the
    trusted side opens them) while the request is pending, and nothing once it is decided; an
    approved request keeps its items as cohort digests (`items`: [kind, digest] in the order
    given), which is how what was found of each is told."""

    __tablename__ = "study_requests"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), index=True)
    requested_by: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    n_items: Mapped[int] = mapped_column(Integer, default=0)
    kinds: Mapped[str] = mapped_column(String(64), default="")  # "accession,patient_id"
    sealed: Mapped[str | None] = mapped_column(Text)
    items: Mapped[list[list[str]] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="pending")  # |approved|declined
    decided_by: Mapped[str | None] = mapped_column(String(128))
    decided_at: Mapped[datetime | None] = mapped_column(DateTime)
    reason: Mapped[str | None] = mapped_column(Text)  # why declined
    job_id: Mapped[int | None] = mapped_column(Integer)  # the pull started on approval


class InboxKey(Base):
    """The public half of the vault key's inbox (`deid.sealing`): what `sphere serve` seals a
    request's values to. One row; written by the trusted side."""

    __tablename__ = "inbox_key"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
