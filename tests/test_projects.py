"""Projects: approval rules, cohorts, audit trail (catalog in SQLite)."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from gateway import projects
from storage.catalog import Catalog

TODAY = date(2026, 11, 22)


@pytest.fixture
def catalog(tmp_path):
    return Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")


def test_approval_window(catalog):
    projects.create(catalog, "p1", title="t", actor="dm", deid_profile={})
    p = projects.get(catalog, "p1")
    assert "not approved" in p.approval_problem(TODAY)
    projects.approve(
        catalog,
        "p1",
        committee_ref="CSE-1",
        approved_on=TODAY,
        expires_on=TODAY + timedelta(days=10),
        actor="cse",
    )
    p = projects.get(catalog, "p1")
    assert p.approval_problem(TODAY) is None
    assert "expired" in p.approval_problem(TODAY + timedelta(days=11))
    assert "starts" in p.approval_problem(TODAY - timedelta(days=1))
    projects.revoke(catalog, "p1", actor="cse", reason="withdrawn")
    assert "not approved" in projects.get(catalog, "p1").approval_problem(TODAY)


def test_bad_requests_are_refused_clearly(catalog):
    with pytest.raises(projects.ProjectError, match="lower-case"):
        projects.create(catalog, "Bad Name!", title="", actor="dm", deid_profile={})
    projects.create(catalog, "p2", title="", actor="dm", deid_profile={})
    with pytest.raises(projects.ProjectError, match="already exists"):
        projects.create(catalog, "p2", title="", actor="dm", deid_profile={})
    with pytest.raises(projects.ProjectError, match="before the approval"):
        projects.approve(
            catalog,
            "p2",
            committee_ref="x",
            approved_on=TODAY,
            expires_on=TODAY - timedelta(days=1),
            actor="cse",
        )
    with pytest.raises(projects.ProjectError, match="no project"):
        projects.add_cohort(catalog, "nope", "accession", ["A"], actor="dm")
    with pytest.raises(projects.ProjectError, match="kind"):
        projects.add_cohort(catalog, "p2", "name", ["A"], actor="dm")


def test_cohort_from_arguments_and_csv_deduplicates(catalog, tmp_path):
    projects.create(catalog, "p3", title="", actor="dm", deid_profile={})
    assert projects.add_cohort(catalog, "p3", "accession", ["A1", "A2", " A1 "], actor="dm") == 2
    csv = tmp_path / "cohort.csv"
    csv.write_text("AccessionNumber,PatientID\nA2,P9\nA3,\n")
    for kind, values in projects.read_cohort_csv(csv).items():
        projects.add_cohort(catalog, "p3", kind, values, actor="dm")
    items = sorted((i.kind, i.value) for i in projects.cohort(catalog, "p3"))
    assert items == [
        ("accession", "A1"),
        ("accession", "A2"),
        ("accession", "A3"),
        ("patient_id", "P9"),
    ]
    assert projects.summary(catalog, "p3").cohort == {"accession": 3, "patient_id": 1}


def test_audit_records_who_what_when_without_identifiers(catalog):
    projects.create(catalog, "p4", title="", actor="alice", deid_profile={})
    projects.add_cohort(catalog, "p4", "patient_id", ["SECRET-PATIENT-ID"], actor="bob")
    trail = catalog.audit_trail("p4")
    assert [(e.actor, e.action) for e in reversed(trail)] == [
        ("alice", "project.create"),
        ("bob", "cohort.add"),
    ]
    assert all(e.at is not None for e in trail)
    assert all("SECRET-PATIENT-ID" not in e.detail for e in trail)
