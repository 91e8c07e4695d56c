"""The catalog's tables: projects, cohorts (by keyed digest), stored series, the audit trail.

Series are indexed by their pseudonymous UIDs only; nothing here identifies a patient. The
re-identification mapping and the cohort's original values live in the vault (`deid.vault`).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import JSON, Date, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(16), default="declared")  # declared|approved|revoked
    committee_ref: Mapped[str | None] = mapped_column(String(128))
    approved_on: Mapped[date | None] = mapped_column(Date)
    expires_on: Mapped[date | None] = mapped_column(Date)
    approved_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128), default="")
    deid_profile: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    cohort: Mapped[list[CohortItem]] = relationship(back_populates="project", cascade="all")
    series: Mapped[list[SeriesRecord]] = relationship(back_populates="project", cascade="all")

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
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    project: Mapped[Project] = relationship(back_populates="series")


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
