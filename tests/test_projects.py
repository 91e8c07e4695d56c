"""Projects: approval rules, cohorts (values in the vault, digests in the catalog), audit trail."""

from __future__ import annotations

import sqlite3
from datetime import date, timedelta

import pytest

from core import Core, ProjectError, Settings, projects
from storage.models import CohortItem

TODAY = date(2026, 11, 22)


@pytest.fixture
def core(tmp_path):
    c = Core(Settings(home=tmp_path), create=True, actor="dm")
    yield c
    c.close()


def test_approval_window(core):
    projects.create(core, "p1", title="t")
    p = core.project("p1")
    assert "not approved" in p.approval_problem(TODAY)
    projects.approve(
        core,
        "p1",
        committee_ref="CSE-1",
        approved_on=TODAY,
        expires_on=TODAY + timedelta(days=10),
        actor="cse",
    )
    p = core.project("p1")
    assert p.approval_problem(TODAY) is None
    assert "expired" in p.approval_problem(TODAY + timedelta(days=11))
    assert "starts" in p.approval_problem(TODAY - timedelta(days=1))
    projects.revoke(core, "p1", actor="cse", reason="withdrawn")
    assert "not approved" in core.project("p1").approval_problem(TODAY)


def test_bad_requests_are_refused_clearly(core):
    with pytest.raises(ProjectError, match="lower-case"):
        projects.create(core, "Bad Name!")
    projects.create(core, "p2")
    with pytest.raises(ProjectError, match="already exists"):
        projects.create(core, "p2")
    with pytest.raises(ProjectError, match="before the approval"):
        projects.approve(
            core, "p2", committee_ref="x", approved_on=TODAY, expires_on=TODAY - timedelta(days=1)
        )
    with pytest.raises(ProjectError, match="no project"):
        projects.add_cohort(core, "nope", "accession", ["A"])
    with pytest.raises(ProjectError, match="no project"):
        projects.revoke(core, "nope")
    with pytest.raises(ProjectError, match="kind"):
        projects.add_cohort(core, "p2", "name", ["A"])


def test_cohort_from_arguments_and_csv_deduplicates(core, tmp_path):
    projects.create(core, "p3")
    assert projects.add_cohort(core, "p3", "accession", ["A1", "A2", " A1 "]) == 2
    csv = tmp_path / "cohort.csv"
    csv.write_text("AccessionNumber,PatientID\nA2,P9\nA3,\n")
    for kind, values in projects.read_cohort_csv(csv).items():
        projects.add_cohort(core, "p3", kind, values)
    items = sorted((i.kind, i.value) for i in projects.cohort(core, "p3", purpose="test"))
    assert items == [
        ("accession", "A1"),
        ("accession", "A2"),
        ("accession", "A3"),
        ("patient_id", "P9"),
    ]
    assert projects.summary(core, "p3").cohort == {"accession": 3, "patient_id": 1}
    reads = [e for e in core.vault.audit_trail("p3") if e.action == "cohort.read"]
    assert [(e.actor, e.detail) for e in reads] == [("dm", "test")]


def test_the_catalog_holds_cohort_digests_never_values(core, tmp_path):
    projects.create(core, "p5")
    planted = ["ACC-PLANTED-0042", "IPP-PLANTED-7777"]
    projects.add_cohort(core, "p5", "accession", planted[:1])
    projects.add_cohort(core, "p5", "patient_id", planted[1:])
    core.close()
    catalog_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("catalog.db*"))
    vault_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("vault.db*"))
    control = tmp_path / "control.db"  # positive control: the scan sees SQLite text
    with sqlite3.connect(control) as c:
        c.execute("create table t (v text)")
        c.executemany("insert into t values (?)", [(v,) for v in planted])
    for value in planted:
        assert value.encode() not in catalog_bytes
        assert value.encode() not in vault_bytes  # sealed (tests/test_vault_sealed.py)
        assert value.encode() in control.read_bytes()
    with core.catalog.session() as s:
        digests = {i.digest for i in s.query(CohortItem)}
    keys = core.keys("p5")
    assert digests == {
        keys.cohort_digest("accession", planted[0]),
        keys.cohort_digest("patient_id", planted[1]),
    }


def test_audit_records_who_what_when_without_identifiers(core):
    projects.create(core, "p4", actor="alice")
    projects.add_cohort(core, "p4", "patient_id", ["SECRET-PATIENT-ID"], actor="bob")
    trail = core.catalog.audit_trail("p4")
    assert [(e.actor, e.action) for e in reversed(trail)] == [
        ("alice", "project.create"),
        ("bob", "cohort.add"),
    ]
    assert all(e.at is not None for e in trail)
    assert all("SECRET-PATIENT-ID" not in e.detail for e in trail)


def test_a_fresh_home_is_not_created_by_reading_it(tmp_path):
    from core import NotSetUp

    reader = Core(Settings(home=tmp_path / "typo"))
    with pytest.raises(NotSetUp, match="no catalog at .*typo"):
        reader.project("p")
    assert not (tmp_path / "typo").exists()
