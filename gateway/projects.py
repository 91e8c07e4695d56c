"""Research projects: declaration, committee approval, cohorts. Every change is audited."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from storage.catalog import Catalog, CohortItem, Project, SeriesRecord

COHORT_KINDS = ("accession", "patient_id", "study_uid")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,63}$")


class ProjectError(Exception):
    """A project action that cannot be done; the message says why (and holds no PHI)."""


@dataclass
class ProjectSummary:
    name: str
    title: str
    status: str
    committee_ref: str | None
    approved_on: date | None
    expires_on: date | None
    cohort: dict[str, int]
    series: dict[str, int]
    deid_profile: dict[str, Any]


def create(
    catalog: Catalog, name: str, *, title: str, actor: str, deid_profile: dict[str, Any]
) -> None:
    """Declare a project. Its name is used in object keys, so it is a plain slug."""
    if not NAME_RE.match(name):
        raise ProjectError(
            "project name must be 2-64 characters of lower-case letters, digits, '-' or '_'"
        )
    try:
        with catalog.session() as s:
            s.add(Project(name=name, title=title, created_by=actor, deid_profile=deid_profile))
    except IntegrityError:
        raise ProjectError(f"project '{name}' already exists") from None
    catalog.audit(actor, "project.create", name, title=title)


def approve(
    catalog: Catalog,
    name: str,
    *,
    committee_ref: str,
    approved_on: date,
    expires_on: date,
    actor: str,
) -> None:
    """Record the committee's approval; pulls are allowed from `approved_on` to `expires_on`."""
    if expires_on < approved_on:
        raise ProjectError("expiry date is before the approval date")
    if not committee_ref.strip():
        raise ProjectError("a committee reference is required")
    with catalog.session() as s:
        p = _get(s, name)
        p.status, p.committee_ref, p.approved_by = "approved", committee_ref, actor
        p.approved_on, p.expires_on = approved_on, expires_on
    catalog.audit(
        actor,
        "project.approve",
        name,
        committee_ref=committee_ref,
        approved_on=approved_on,
        expires_on=expires_on,
    )


def revoke(catalog: Catalog, name: str, *, actor: str, reason: str = "") -> None:
    """Withdraw approval: no further pulls."""
    with catalog.session() as s:
        _get(s, name).status = "revoked"
    catalog.audit(actor, "project.revoke", name, reason=reason)


def add_cohort(catalog: Catalog, name: str, kind: str, values: Iterable[str], *, actor: str) -> int:
    """Add cohort items (accession numbers, patient IDs or study UIDs); return how many are new."""
    if kind not in COHORT_KINDS:
        raise ProjectError(f"cohort kind must be one of {', '.join(COHORT_KINDS)}")
    clean = sorted({v.strip() for v in values if v and v.strip()})
    with catalog.session() as s:
        p = _get(s, name)
        have = set(
            s.scalars(
                select(CohortItem.value).where(
                    CohortItem.project_id == p.id, CohortItem.kind == kind
                )
            )
        )
        new = [v for v in clean if v not in have]
        s.add_all(CohortItem(project_id=p.id, kind=kind, value=v) for v in new)
    # Counts only: the values themselves identify patients.
    catalog.audit(actor, "cohort.add", name, kind=kind, added=len(new), given=len(clean))
    return len(new)


def read_cohort_csv(path: Path) -> dict[str, list[str]]:
    """Read a cohort CSV with a header naming one or more of the cohort kinds as columns."""
    out: dict[str, list[str]] = {k: [] for k in COHORT_KINDS}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        # Header names are matched loosely: "AccessionNumber", "accession_number", "Patient ID"...
        cols = {c: re.sub(r"[^a-z]", "", c.lower()) for c in reader.fieldnames or []}
        aliases = {
            "accession": "accession",
            "accessionnumber": "accession",
            "patientid": "patient_id",
            "studyuid": "study_uid",
            "studyinstanceuid": "study_uid",
        }
        known = {c: aliases[n] for c, n in cols.items() if n in aliases}
        if not known:
            raise ProjectError(
                f"no column named one of {', '.join(COHORT_KINDS)} in the CSV header"
            )
        for row in reader:
            for col, kind in known.items():
                if row.get(col):
                    out[kind].append(row[col])
    return {k: v for k, v in out.items() if v}


def get(catalog: Catalog, name: str) -> Project:
    with catalog.session() as s:
        return _get(s, name)


def cohort(catalog: Catalog, name: str) -> list[CohortItem]:
    with catalog.session() as s:
        p = _get(s, name)
        return list(s.scalars(select(CohortItem).where(CohortItem.project_id == p.id)))


def summary(catalog: Catalog, name: str) -> ProjectSummary:
    with catalog.session() as s:
        p = _get(s, name)
        kinds = dict(
            s.execute(
                select(CohortItem.kind, func.count())
                .where(CohortItem.project_id == p.id)
                .group_by(CohortItem.kind)
            ).all()
        )
        series = dict(
            s.execute(
                select(SeriesRecord.status, func.count())
                .where(SeriesRecord.project_id == p.id)
                .group_by(SeriesRecord.status)
            ).all()
        )
        return ProjectSummary(
            p.name,
            p.title,
            p.status,
            p.committee_ref,
            p.approved_on,
            p.expires_on,
            kinds,
            series,
            dict(p.deid_profile or {}),
        )


def list_all(catalog: Catalog) -> list[Project]:
    with catalog.session() as s:
        return list(s.scalars(select(Project).order_by(Project.name)))


def _get(s: Any, name: str) -> Project:
    p = s.scalar(select(Project).where(Project.name == name))
    if p is None:
        raise ProjectError(f"no project named '{name}'")
    return p
