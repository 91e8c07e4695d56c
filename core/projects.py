"""Research projects: declaration, committee approval, cohorts. Every change is audited.

A cohort item's value (accession number, patient ID, study UID) identifies a patient: the vault
keeps it, and the catalog only a keyed digest of it (`ProjectKeys.cohort_digest`).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from core.core import Core
from core.errors import ProjectError
from core.retention import retention_end
from deid.profile import Profile
from storage.catalog import DuplicateProject, Project

COHORT_KINDS = ("accession", "patient_id", "study_uid")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{1,63}$")


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
    retention_end: date | None = None  # the last day its data is kept (`core.retention`)


@dataclass(frozen=True)
class CohortEntry:
    """A cohort item with its original value, as the pull needs it (never stored in clear)."""

    id: int
    kind: str
    value: str


def create(
    core: Core, name: str, *, title: str = "", profile: Profile | None = None, actor: str = ""
) -> None:
    """Declare a project. Its name is used in object keys, so it is a plain slug."""
    if not NAME_RE.match(name):
        raise ProjectError(
            "project name must be 2-64 characters of lower-case letters, digits, '-' or '_'"
        )
    actor = actor or core.actor
    deid_profile = (profile or Profile()).to_json()
    try:
        core.catalog.add_project(
            Project(name=name, title=title, created_by=actor, deid_profile=deid_profile)
        )
    except DuplicateProject:
        raise ProjectError(f"project '{name}' already exists") from None
    core.keys(name)  # the project's secret, made now rather than by the first pull
    if core.catalog.inbox_key() is None:  # what the web seals study requests to (core.requests)
        core.catalog.set_inbox_key(core.vault.key.inbox_public())
    core.catalog.audit(actor, "project.create", name, title=title)


def approve(
    core: Core,
    name: str,
    *,
    committee_ref: str,
    approved_on: date,
    expires_on: date,
    actor: str = "",
) -> None:
    """Record the committee's approval; pulls are allowed from `approved_on` to `expires_on`."""
    if expires_on < approved_on:
        raise ProjectError("expiry date is before the approval date")
    if not committee_ref.strip():
        raise ProjectError("a committee reference is required")
    actor = actor or core.actor
    _update(
        core,
        name,
        status="approved",
        committee_ref=committee_ref,
        approved_by=actor,
        approved_on=approved_on,
        expires_on=expires_on,
    )
    core.catalog.audit(
        actor,
        "project.approve",
        name,
        committee_ref=committee_ref,
        approved_on=approved_on,
        expires_on=expires_on,
    )


def revoke(core: Core, name: str, *, reason: str = "", actor: str = "") -> None:
    """Withdraw approval: no further pulls."""
    _update(core, name, status="revoked")
    core.catalog.audit(actor or core.actor, "project.revoke", name, reason=reason)


def require_active(core: Core, name: str, action: str, *, actor: str = "") -> Project:
    """The project, when it is approved and in date; else the refusal is audited and a
    `ProjectError` says why (not approved, revoked, expired, purged). The one lifecycle rule
    pulls, pipeline runs, exports, grants, the jobs and the web call."""
    p = core.project(name)
    problem = p.approval_problem(date.today())
    if problem:
        core.catalog.audit(actor or core.actor, action, name, "refused", reason=problem)
        raise ProjectError(problem)
    return p


def add_cohort(core: Core, name: str, kind: str, values: Iterable[str], *, actor: str = "") -> int:
    """Add cohort items (accession numbers, patient IDs or study UIDs); return how many are new.
    The values go to the vault; the catalog gets their keyed digests."""
    if kind not in COHORT_KINDS:
        raise ProjectError(f"cohort kind must be one of {', '.join(COHORT_KINDS)}")
    project = core.project(name)
    keys = core.keys(name)
    by_digest = {keys.cohort_digest(kind, v): v.strip() for v in values if v and v.strip()}
    core.vault.add_cohort(name, kind, by_digest.items())  # first: a pull never misses one
    new = core.catalog.add_cohort_items(project.id, kind, by_digest)
    # Counts only: the values themselves identify patients.
    core.catalog.audit(
        actor or core.actor, "cohort.add", name, kind=kind, added=len(new), given=len(by_digest)
    )
    return len(new)


def cohort(core: Core, name: str, *, purpose: str, actor: str = "") -> list[CohortEntry]:
    """The project's cohort with its original values, read from the vault (audited there)."""
    project = core.project(name)
    originals = core.vault.cohort(name, actor=actor or core.actor, purpose=purpose)
    entries = []
    for item in core.catalog.cohort(project.id):
        value = originals.get((item.kind, item.digest))
        if value is None:
            raise ProjectError(
                f"cohort item {item.id} of '{name}' has no value in the vault: "
                "is SPHERE_VAULT_URL the vault this project was created with?"
            )
        entries.append(CohortEntry(item.id, item.kind, value))
    return entries


def summary(core: Core, name: str) -> ProjectSummary:
    """Approval, cohort size by kind, series by status and profile of one project."""
    p = core.project(name)
    return ProjectSummary(
        p.name,
        p.title,
        p.state(date.today()),
        p.committee_ref,
        p.approved_on,
        p.expires_on,
        core.catalog.cohort_counts(p.id),
        core.catalog.series_counts(p.id),
        dict(p.deid_profile or {}),
        retention_end(core, p),
    )


def read_cohort_csv(path: Path) -> dict[str, list[str]]:
    """Read a cohort CSV with a header naming one or more of the cohort kinds as columns.

    As spreadsheets write them: UTF-8 (with or without a BOM), UTF-16 with a BOM ("Unicode
    text"), Windows-1252 otherwise; separated by commas, semicolons (where the decimal mark is
    a comma) or tabs, whichever the header uses. A header with no rows is a mistake, said."""
    return parse_cohort_csv(path.read_bytes(), path.name)


def parse_cohort_csv(data: bytes, name: str) -> dict[str, list[str]]:
    """`read_cohort_csv` of bytes (an upload); `name` says what they are in a mistake."""
    text = _decoded(data)
    lines = text.splitlines()
    header = lines[0] if lines else ""
    delimiter = max(",;\t", key=header.count) if header else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
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
        raise ProjectError(f"no column named one of {', '.join(COHORT_KINDS)} in the CSV header")
    out: dict[str, list[str]] = {k: [] for k in COHORT_KINDS}
    for row in reader:
        for col, kind in known.items():
            value = (row.get(col) or "").strip()
            if value:
                out[kind].append(value)
    if not any(out.values()):
        raise ProjectError(f"{name} has a header but no values under it: nothing added")
    return {k: v for k, v in out.items() if v}


def _decoded(data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise ProjectError("the CSV starts as UTF-16 but is not: save it again") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def _update(core: Core, name: str, **values: Any) -> None:
    if core.project(name).status == "purged":  # says so too when there is none
        raise ProjectError(f"project '{name}' is purged: its approval cannot change")
    core.catalog.update_project(name, **values)
