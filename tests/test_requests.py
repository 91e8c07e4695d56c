"""Study requests end to end on a served app and the real CLI: an investigator asks (API and
the page's form, a list or a cohort CSV), a data manager lists, approves (the items join the
cohort by its own path, a pull job is queued) or declines with a reason, the investigator sees
each state and, after the pull's resolution, what was found of each item. The values are
originals: sealed in the catalog until the decision, then in the vault only; never in a
response (decoded scans of the catalog and the answers, with a positive control). With real
peers: an approved request's pull runs on a node (the job machinery) against Orthanc, and the
investigator sees per item what was found and what was not."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from core import Core, Settings, access, projects, users
from gateway import jobs
from gateway.cli import app as cli_app
from harness.leaks import date_forms, scan_database, scan_text
from tests.processing_data import new_project
from tests.test_pull import approved, corpus, make_gateway, pacs, scp_port  # noqa: F401
from tests.web_server import fetch, leaks, serving

PROJECT = "asks"
PLANTED = ["PLANTED-ACC-7731", "PLANTED-ACC-7732", "PLANTED-PID-0099"]
PLANTED_FORM = ["PLANTED-UID-1.2.3", "PLANTED-CSV-ACC-55"]


@dataclass
class Home:
    settings: Settings
    url: str
    tokens: dict[str, str]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    settings = Settings(home=tmp_path_factory.mktemp("requests") / "home", fsync=False)
    new_project(settings, PROJECT)
    with Core(settings) as c:
        tokens = {}
        for role, name in (("investigator", "ivy"), ("viewer", "val"), ("none", "nobody")):
            tokens[role] = users.add(c, name)
            if role != "none":
                users.grant(c, PROJECT, name, role)
        tokens["data-manager"] = users.add(c, "dan")
        c.catalog.add_user_role(c.catalog.user("dan").id, access.DATA_MANAGER, "setup")
    with Core(settings, research=True) as core, serving(core) as url:  # serve: no vault
        yield Home(settings, url, tokens)


def sphere(home: Home, *words: str) -> str:
    env = {"SPHERE_HOME": str(home.settings.home), "SPHERE_TOKEN": home.tokens["data-manager"]}
    out = CliRunner().invoke(cli_app, list(words), env={**env, "COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    return out.output


def test_a_request_asked_approved_pulled_and_followed(home):
    api = f"{home.url}/api/projects/{PROJECT}/requests"
    body = {"accession": PLANTED[:2], "patient_id": PLANTED[2:]}
    made = fetch(api, home.tokens["investigator"], "POST", json=body)
    assert made.status == 201, made.body
    first = made.json()
    assert (first["state"], first["items"]) == ("pending", 3)
    # Who may not ask is refused; who is no member learns nothing.
    assert fetch(api, home.tokens["viewer"], "POST", json=body).status == 403
    assert fetch(api, home.tokens["none"], "POST", json=body).status == 404
    # The data manager sees it pending (the page and the CLI), and approves it: items in the
    # cohort, a pull queued.
    seen_dm = fetch(f"{home.url}/projects/{PROJECT}/requests", home.tokens["data-manager"])
    html_dm = seen_dm.body.decode()
    assert seen_dm.status == 200 and f"<td>{first['id']}</td><td>ivy</td>" in html_dm
    assert "<td>pending</td>" in html_dm and "sphere requests approve ID" in html_dm
    listed = sphere(home, "requests", PROJECT)
    assert "pending" in listed and "3 accession/patient_id" in listed
    approved = sphere(home, "requests", "approve", str(first["id"]))
    assert "3 item(s) joined" in approved and "pull job" in approved
    with Core(home.settings) as c:
        p = c.project(PROJECT)
        values = {e.value for e in projects.cohort(c, PROJECT, purpose="test", actor="t")}
        assert values == set(PLANTED)  # from the vault, where the cohort's values live
        (job,) = c.catalog.jobs(PROJECT)
        assert job.kind == "pull" and job.state == "queued"
        row = c.catalog.request(first["id"])
        assert row.sealed is None and len(row.items) == 3 and row.job_id == job.id
        # The pull's resolution (as `gateway.pull` records it): the first accession matched a
        # study, the second none; the patient ID not looked up yet.
        items = {(i.kind, i.digest): i.id for i in c.catalog.cohort(p.id)}
        ids = [items[(k, d)] for k, d in row.items]
        c.catalog.record_resolution({ids[0]: ["1.2.826.0.1.3680043.99.1"], ids[1]: []})
    (seen,) = fetch(api, home.tokens["investigator"]).json()
    assert seen["state"] == "approved" and seen["job"]["state"] == "queued"
    assert seen["outcome"]["per_item"] == ["found 1", "not found", "not looked up yet"]
    assert (seen["outcome"]["found"], seen["outcome"]["not_found"]) == (1, 1)
    page = fetch(f"{home.url}/projects/{PROJECT}/requests", home.tokens["investigator"])
    assert page.status == 200 and "found 1, not found 1 (items 2)" in page.body.decode()
    # A data manager sees it on the web too; a viewer may not read requests.
    assert fetch(api, home.tokens["data-manager"]).status == 200
    assert fetch(api, home.tokens["viewer"]).status == 403
    with Core(home.settings) as c:
        actions = {e.action for e in c.catalog.audit_trail(PROJECT, 500)}
    assert {"request.submit", "request.read", "request.approve", "jobs.submit"} <= actions


def test_a_form_request_with_a_cohort_file_declined_with_a_reason(home):
    page = f"{home.url}/projects/{PROJECT}/requests"
    csv = f"StudyInstanceUID,AccessionNumber\n{PLANTED_FORM[0]},{PLANTED_FORM[1]}\n".encode()
    sent = fetch(
        page, home.tokens["investigator"], "POST", allow_redirects=False,
        files={"cohort": ("cohort.csv", csv, "text/csv")},
    )  # fmt: skip
    assert sent.status == 303
    with Core(home.settings) as c:
        row = c.catalog.requests(c.project(PROJECT).id, "pending")[0]
    assert row.n_items == 2 and row.sealed
    out = sphere(home, "requests", "decline", str(row.id), "--reason", "outside the protocol")
    assert "declined" in out
    html = fetch(page, home.tokens["investigator"]).body.decode()
    assert "declined: outside the protocol" in html
    with Core(home.settings) as c:
        assert c.catalog.request(row.id).sealed is None  # the values are dropped
        assert len(c.catalog.cohort(c.project(PROJECT).id)) == 3  # nothing added
        assert "request.decline" in {e.action for e in c.catalog.audit_trail(PROJECT, 500)}
    # A decision is made once.
    again = CliRunner().invoke(
        cli_app, ["requests", "approve", str(row.id)],
        env={"SPHERE_HOME": str(home.settings.home), "SPHERE_TOKEN": home.tokens["data-manager"]},
    )  # fmt: skip
    assert again.exit_code == 2 and "declined already" in again.output


def test_no_value_of_a_request_is_in_the_catalog_or_an_answer(home):
    needles = PLANTED + PLANTED_FORM
    with Core(home.settings) as c:
        url = home.settings.resolved_catalog_url()
    answers = ""
    for path in (f"/api/projects/{PROJECT}/requests", f"/projects/{PROJECT}/requests"):
        for role in ("investigator", "data-manager"):
            answers += fetch(home.url + path, home.tokens[role]).body.decode()
    answers += sphere(home, "requests")
    assert scan_database(url, needles) == []
    assert scan_text("answers", answers, needles) == []
    # Control: a value written in clear into the catalog is found by the same scan.
    with Core(home.settings) as c:
        c.catalog.audit("t", "control", PROJECT, value=PLANTED[0])
    assert {leak.needle for leak in scan_database(url, needles)} == {PLANTED[0]}


@pytest.mark.peers
def test_an_approved_request_is_pulled_by_a_node_and_told_per_item(
    tmp_path,
    pacs,  # noqa: F811
    scp_port,  # noqa: F811
    corpus,  # noqa: F811
):
    gw = make_gateway(tmp_path / "home", pacs, scp_port)
    approved(gw, "asked", [])
    c = gw.core
    tokens = {"investigator": users.add(c, "ivy"), "data-manager": users.add(c, "dan")}
    users.grant(c, "asked", "ivy", access.INVESTIGATOR)
    c.catalog.add_user_role(c.catalog.user("dan").id, access.DATA_MANAGER, "setup")
    home = Home(gw.settings, "", tokens)
    sphere(home, "requests")  # the data manager opens requests (the inbox key published)
    absent = "ACC0000001"  # in no study of the PACS
    items = [corpus.studies[0].accession, absent, corpus.studies[1].accession]
    ivy = tokens["investigator"]
    with Core(gw.settings, research=True) as core, serving(core) as url:
        api, page = f"{url}/api/projects/asked/requests", f"{url}/projects/asked/requests"
        made = fetch(api, ivy, "POST", json={"accession": items})
        assert made.status == 201, made.body
        rid = made.json()["id"]
        assert "pull job" in sphere(home, "requests", "approve", str(rid))
        (queued,) = fetch(api, ivy).json()
        assert queued["job"]["state"] == "queued" and queued["outcome"]["not_looked_up"] == 3
        node = jobs.Node(gw.settings, name="node-1")  # what `sphere worker` / `serve` run
        node.run(once=True)
        assert node.ran == [queued["job"]["id"]]
        answers = [("api", fetch(api, ivy)), ("page", fetch(page, ivy))]
    seen = answers[0][1].json()[0]
    assert seen["job"]["state"] == "done", seen["job"]
    assert seen["outcome"]["per_item"] == ["found 1", "not found", "found 1"]
    assert (seen["outcome"]["found"], seen["outcome"]["not_found"]) == (2, 1)
    assert seen["outcome"]["studies_stored"] == 2
    html = answers[1][1].body.decode()
    assert "found 2, not found 1 (items 2), not looked up yet 0; 2 studies stored" in html
    # The pull stored the two studies found, whole, and nothing of the PACS' third.
    p = c.project("asked")
    stored = {r.study_uid for r in c.catalog.series(p.id, status="complete")}
    assert len(stored) == 2
    n_series = sum(len(st.series) for st in corpus.studies[:2])
    assert len(c.catalog.series(p.id, status="complete")) == n_series
    trail = {(e.action, e.actor) for e in c.catalog.audit_trail("asked", 500)}
    assert {("request.submit", "ivy"), ("request.approve", "dan"), ("pull.start", "dan")} <= trail
    # No original value in what the investigator reads, decoded (the absent item's too) ...
    needles = [*date_forms(corpus.phi), absent]
    assert [leak for where, f in answers for leak in leaks(where, f, needles)] == []
    # ... control: the trusted side's cohort (from the vault) holds them, and the scan sees them.
    values = " ".join(e.value for e in projects.cohort(c, "asked", purpose="test", actor="t"))
    assert {leak.needle for leak in scan_text("cohort", values, needles)} >= set(items)
