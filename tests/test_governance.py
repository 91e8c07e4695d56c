"""Retention ends and who may purge when; the opt-out register (digests only); the CLI's
`project purge|retain|purges` and `optout ...`. Without peers: see test_purge.py for pulls."""

from __future__ import annotations

import sqlite3
from datetime import date, timedelta

import pytest
from typer.testing import CliRunner
from zarr.core.buffer import default_buffer_prototype

from core import Core, ProjectError, Settings, SphereError, optout, projects, users
from core.retention import retention_end, set_retention
from gateway.cli import app
from gateway.pull.lock import ProjectPullLock, PullBusy
from gateway.purge import opt_out, purge_expired, purge_project
from harness.leaks import scan_database
from storage.objectstore import delete_prefix, leftovers, open_store, run, usage

TODAY = date(2026, 6, 1)


@pytest.fixture
def core(tmp_path):
    c = Core(Settings(home=tmp_path / "home", fsync=False), create=True, actor="dm")
    yield c
    c.close()


def approved(core: Core, name: str, expires_on: date) -> None:
    projects.create(core, name)
    projects.approve(
        core,
        name,
        committee_ref="C-1",
        approved_on=TODAY - timedelta(days=400),
        expires_on=expires_on,
    )


def put(store, key: str, data: bytes = b"12345") -> None:
    run(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def test_delete_prefix_takes_the_folder_and_nothing_beside_it(tmp_path):
    store = open_store(str(tmp_path / "store"))
    for key in ("projects/p/s/zarr.json", "projects/p/s/v/c/0", "projects/p2/x", "reports/p/r"):
        put(store, key)
    assert usage(store, "projects/p") == (2, 10)
    assert delete_prefix(store, "projects/p") == (2, 10)
    assert leftovers(store, "projects/p") == []
    assert leftovers(store, "projects/p2") == ["projects/p2/x"]  # a longer name is not below
    assert leftovers(store, "reports/p") == ["reports/p/r"]
    with pytest.raises(ValueError):
        delete_prefix(store, "projects/../p2")


def test_retention_end_is_expiry_plus_grace_unless_set(core):
    approved(core, "rp", TODAY + timedelta(days=30))
    p = core.project("rp")
    assert retention_end(core, p) == TODAY + timedelta(days=120)
    core.settings.retention_grace_days = 0
    assert retention_end(core, p) == TODAY + timedelta(days=30)
    set_retention(core, "rp", TODAY + timedelta(days=400), reason="follow-up study")
    assert retention_end(core, p) == TODAY + timedelta(days=400)
    assert projects.summary(core, "rp").retention_end == TODAY + timedelta(days=400)
    assert core.catalog.audit_trail("rp")[0].action == "project.retain"


def test_who_is_purged_when(core):
    approved(core, "live", TODAY + timedelta(days=30))
    approved(core, "old", TODAY - timedelta(days=100))  # expired, and past 90 days of grace
    approved(core, "late", TODAY - timedelta(days=5))  # expired, still within grace
    approved(core, "gone", TODAY + timedelta(days=30))
    projects.revoke(core, "gone", reason="withdrawn")
    with pytest.raises(ProjectError, match="retention end"):
        purge_project(core, "live", today=TODAY)
    assert core.catalog.audit_trail("live")[0].outcome == "refused"
    with pytest.raises(ProjectError, match="reason"):
        purge_project(core, "live", now=True, today=TODAY)
    purge_project(core, "gone", today=TODAY)  # revoked: at once
    assert [p.project for p in purge_expired(core, today=TODAY)] == ["old"]
    status = {p.name: p.status for p in core.catalog.projects()}
    assert status == {"live": "approved", "old": "purged", "late": "approved", "gone": "purged"}
    purge_project(core, "live", now=True, reason="committee decision", today=TODAY)
    assert [r.reason for r in core.catalog.purge_records("live")] == ["committee decision"]
    with pytest.raises(ProjectError, match="purged"):
        projects.revoke(core, "live")


def test_the_register_keeps_digests_never_ids(core, tmp_path):
    ids, new = optout.add(core, ["PAT-0001", " PAT-0002 ", "PAT-0001"])
    assert (ids, new) == (["PAT-0001", "PAT-0002"], 2)
    register = optout.Register(core)
    assert register.refuses("PAT-0001") and register.refuses("PAT-0002 ")
    assert not register.refuses("PAT-0003") and not register.refuses("")
    assert core.catalog.optout_count() == 2
    assert scan_database(core.settings.resolved_catalog_url(), ["PAT-0001", "PAT-0002"]) == []
    # Positive control: the same scan finds an ID where one is kept in clear.
    control = tmp_path / "control.db"
    with sqlite3.connect(control) as c:
        c.execute("create table t (v text)")
        c.execute("insert into t values ('PAT-0001')")
    assert scan_database(f"sqlite:///{control}", ["PAT-0001"])
    projects.create(core, "pc")
    projects.add_cohort(core, "pc", "patient_id", ["PAT-0001"])
    assert scan_database(core.settings.resolved_vault_url(), ["PAT-0001"]) == []  # sealed
    # The digests are keyed: not a project's pseudonym, nor a plain hash.
    assert register.digest("PAT-0001") != core.keys("pc").mac("optout", "PAT-0001").hex()
    assert optout.remove(core, ["PAT-0002"]) == 1
    register.reload()
    assert not register.refuses("PAT-0002")

    lines = tmp_path / "ids.txt"
    lines.write_text("A1\n\nA2\n")
    assert optout.read_ids(lines) == ["A1", "A2"]
    table = tmp_path / "ids.csv"
    table.write_text("Patient ID,name\nB1,x\nB2,y\n")
    assert optout.read_ids(table) == ["B1", "B2"]
    table.write_text("accession\nACC1\n")
    with pytest.raises(SphereError, match="no patient ID column"):
        optout.read_ids(table)


def test_cli_by_role(tmp_path):
    home = tmp_path / "home"
    with Core(Settings(home=home), create=True, actor="setup") as c:
        tokens = {}
        for name, role in (("dan", "data-manager"), ("tess", "trusted-third-party")):
            tokens[name] = users.add(c, name)
            c.catalog.add_user_role(c.catalog.user(name).id, role, "setup")
        approved(c, "cli-p", date(2099, 1, 1))
    runner = CliRunner()

    def sphere(who: str, *args: str):
        env = {"SPHERE_HOME": str(home), "SPHERE_TOKEN": tokens[who], "COLUMNS": "200"}
        return runner.invoke(app, list(args), env=env)

    assert "2099-04-01" in sphere("dan", "project", "show", "cli-p").output  # +90 days
    r = sphere("dan", "project", "purge", "cli-p")
    assert r.exit_code == 2 and "--yes" in r.output  # no terminal to confirm at
    r = sphere("dan", "project", "purge", "cli-p", "--yes")
    assert r.exit_code == 2 and "retention end" in r.output
    assert sphere("dan", "project", "purge", "--expired", "cli-p").exit_code == 2
    r = sphere("dan", "project", "retain", "cli-p", "--until", "soon")
    assert r.exit_code == 2 and "YYYY-MM-DD" in r.output
    r = sphere("tess", "project", "purge", "cli-p", "--yes", "--now", "--reason", "x")
    assert r.exit_code == 2 and "tess may not project.purge" in r.output
    r = sphere("dan", "project", "purge", "cli-p", "--yes", "--now", "--reason", "asked")
    assert r.exit_code == 0 and "0 objects" in r.output
    assert "asked" in sphere("dan", "project", "purges").output
    assert "purged" in sphere("dan", "project", "show", "cli-p").output

    ids = tmp_path / "ids.txt"
    ids.write_text("PAT-9\nPAT-8\n")
    r = sphere("dan", "optout", "import", str(ids))  # the trusted third party's alone
    assert r.exit_code == 2 and "dan may not optout.manage" in r.output
    r = sphere("tess", "optout", "import", str(ids))
    assert r.exit_code == 0 and "nothing of theirs" in r.output
    assert sphere("tess", "optout", "add", "--patient-id", "PAT-7").exit_code == 0
    r = sphere("tess", "optout", "list")
    assert "3 patient(s) opted out" in r.output and "PAT" not in r.output
    assert sphere("tess", "optout", "import", str(tmp_path / "none.txt")).exit_code == 2
    with Core(Settings(home=home)) as c:
        refused = [e for e in c.catalog.audit_trail(limit=1000) if e.outcome == "refused"]
    assert {(e.actor, e.action) for e in refused} >= {
        ("tess", "project.purge"),
        ("dan", "optout.manage"),
    }


def test_no_purge_while_a_pull_runs(core):
    approved(core, "busy", TODAY + timedelta(days=30))
    p = core.project("busy")
    pseudonym = core.keys("busy").pseudonym("PAT-X")
    core.catalog.upsert_series(
        p.id, "2.25.1", study_uid="2.25.9", patient_pseudonym=pseudonym, status="pending"
    )
    with ProjectPullLock(core.catalog, p, "a pull"):  # as a running pull holds it
        with pytest.raises(PullBusy):
            purge_project(core, "busy", now=True, reason="x", today=TODAY)
        with pytest.raises(PullBusy, match="busy is being pulled"):
            opt_out(core, ["PAT-X"])
    assert core.project("busy").status == "approved"
    assert optout.Register(core).refuses("PAT-X")  # registered at once all the same
    assert [s.series_uid for s in core.catalog.series(p.id)] == ["2.25.1"]
    projects.add_cohort(core, "busy", "patient_id", ["PAT-X", "PAT-Y"])
    (done,) = opt_out(core, ["PAT-X"])  # again, once the pull has ended
    assert (done.project, done.series) == ("busy", 1)
    assert core.catalog.series(p.id) == []
    # Out of the cohort too (catalog and vault); the other patient stays.
    assert len(core.catalog.cohort(p.id)) == 1
    assert [e.value for e in projects.cohort(core, "busy", purpose="test")] == ["PAT-Y"]


def test_job_nodes_sweep_retention_once_a_day(core):
    """The service's daily purge: the first idle node to claim the day purges every project
    past its end; another node that day does nothing; a project a pull holds is left for the
    next day while the others are purged."""
    from gateway.jobs import Node

    approved(core, "old", TODAY - timedelta(days=100))
    approved(core, "held", TODAY - timedelta(days=100))
    approved(core, "live", TODAY + timedelta(days=30))
    a, b = Node(core.settings, name="node-a"), Node(core.settings, name="node-b")
    try:
        with ProjectPullLock(core.catalog, core.project("held"), "dm"):
            assert a.sweep(TODAY) and not b.sweep(TODAY) and not a.sweep(TODAY)
        status = {p.name: p.status for p in core.catalog.projects()}
        assert status == {"old": "purged", "held": "approved", "live": "approved"}
        assert core.catalog.purge_records("old")[0].actor == "node:node-a"
        assert b.sweep(TODAY + timedelta(days=1))  # the next day: the held one goes
        assert core.project("held").status == "purged" and core.project("live").status != "purged"
    finally:
        a.core.close()
        b.core.close()
