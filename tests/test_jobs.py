"""Jobs (issue 19, point 1): queued in the catalog, leased by a node, run by the same function
the CLI runs; one pull per project; cancel; the CLI and the HTTP API. Real Orthanc for the pulls."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from core import access, users
from core.settings import JobOptions, PacsPeer, Settings
from gateway import jobs
from gateway.api import Gateway
from harness.localpacs import free_port
from harness.synthetic import generate
from storage.catalog import Job, utcnow
from tests.orthanc_fixture import seeded_orthanc
from tests.test_pull import approved

SPHERE = [sys.executable, "-m", "gateway.cli"]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPHERE, *args], capture_output=True, text=True, env=env, timeout=300)


def data_manager(gw: Gateway, name: str = "dan") -> str:
    token = users.add(gw.core, name)
    user = gw.catalog.user(name)
    assert user is not None
    gw.catalog.add_user_role(user.id, access.DATA_MANAGER, "tester")
    return token


# -- the queue on SQLite, without peers ----------------------------------------------------------


@pytest.fixture
def gw(tmp_path):
    g = Gateway(Settings(home=tmp_path, actor="tester"))
    approved(g, "queued", [])
    return g


def test_a_lease_is_taken_once_renewed_and_taken_up_again_only_after_it_runs_out(gw):
    cat = gw.catalog
    job, busy = cat.submit_job("pull", "queued", {}, "dan")
    assert busy is None and job.state == "queued"
    leased = cat.lease_job("node-a", "ta", lease_s=60)
    assert leased.id == job.id and leased.state == "running" and leased.node == "node-a"
    assert cat.lease_job("node-b", "tb", lease_s=60) is None  # held: nobody else gets it
    assert cat.renew_job(job.id, "ta", 60, {"instances": 3, "total": 9}) is False
    assert cat.job(job.id).progress == {"instances": 3, "total": 9}
    assert cat.renew_job(job.id, "tb", 60) is None  # not b's
    with cat.session() as s:  # node a went silent: its lease ran out
        s.execute(update(Job).values(lease_expires=utcnow() - timedelta(seconds=1)))
    assert leased.taken_from == ""  # a queued job: nobody's
    again = cat.lease_job("node-b", "tb", lease_s=60)
    assert again.id == job.id and again.node == "node-b" and again.attempts == 2
    assert again.taken_from == "node-a"  # whose lease ran out
    assert cat.renew_job(job.id, "ta", 60) is None  # a, were it alive, knows it lost it
    assert not cat.end_job(job.id, "ta", "done", "x")
    assert cat.end_job(job.id, "tb", "done", "all there")
    row = cat.job(job.id)
    assert row.state == "done" and row.finished_at and row.token is None
    assert cat.job_counts() == {("pull", "done"): 1}


def test_a_waiting_job_is_leased_again_only_after_its_time(gw):
    cat = gw.catalog
    job, _ = cat.submit_job("pull", "queued", {}, "dan")
    cat.lease_job("n", "t", 60)
    later = utcnow() + timedelta(hours=1)
    assert cat.end_job(job.id, "t", "waiting", "waiting: outside its window", not_before=later)
    assert cat.lease_job("n", "t2", 60) is None
    with cat.session() as s:
        s.execute(update(Job).values(not_before=utcnow() - timedelta(seconds=1)))
    assert cat.lease_job("n", "t2", 60).id == job.id


def test_one_pull_per_project_is_refused_naming_the_job_and_audited(gw, tmp_path):
    token = data_manager(gw)
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_TOKEN": token}
    first = cli("jobs", "submit", "pull", "queued", env=env)
    assert first.returncode == 0, first.stderr
    assert "job 1 queued" in first.stdout
    second = cli("jobs", "submit", "pull", "queued", env=env)
    assert second.returncode == 2
    (line,) = second.stderr.strip().splitlines()
    assert "has pull job 1 queued" in line and "one pull per project" in line
    run = cli("jobs", "submit", "run", "queued", "--pipeline", "bone-density", env=env)
    assert run.returncode == 0, run.stderr  # a run beside it is another kind of job
    bad = cli("jobs", "submit", "run", "queued", "--pipeline", "nope", env=env)
    assert bad.returncode == 2 and "--pipeline is one of" in bad.stderr
    listed = cli("jobs", "--project", "queued", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["id", "kind", "project", "state"]
    assert [ln.split()[:4] for ln in lines[1:]] == [
        ["2", "run:bone-density", "queued", "queued"],
        ["1", "pull", "queued", "queued"],
    ]
    trail = gw.catalog.audit_trail("queued")
    refused = [e for e in trail if e.action == "jobs.submit" and e.outcome == "refused"]
    assert len(refused) == 1 and "pull job 1" in refused[0].detail
    assert sum(e.action == "jobs.submit" and e.outcome == "ok" for e in trail) == 2
    # a queued job is cancelled at once; the pull may then be queued again
    out = cli("jobs", "cancel", "1", env=env)
    assert out.returncode == 0 and "job 1 cancelled" in out.stdout
    assert gw.catalog.job(1).state == "cancelled"
    assert cli("jobs", "submit", "pull", "queued", env=env).returncode == 0


def test_who_may_submit_and_a_closed_project(gw, tmp_path):
    viewer = users.add(gw.core, "vic")
    gw.catalog.grant(gw.core.project("queued").id, gw.catalog.user("vic").id, "viewer", "t")
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_TOKEN": viewer}
    out = cli("jobs", "submit", "pull", "queued", env=env)
    assert out.returncode == 2 and "vic may not jobs.submit" in out.stderr
    assert gw.catalog.jobs() == []
    listed = cli("jobs", "--project", "queued", env=env)  # a viewer reads jobs
    assert listed.returncode == 0 and "no jobs" in listed.stdout
    # control: a data manager may, until the project is revoked
    env["SPHERE_TOKEN"] = data_manager(gw)
    gw.revoke("queued", reason="t")
    out = cli("jobs", "submit", "pull", "queued", env=env)
    assert out.returncode == 2 and "not approved" in out.stderr
    assert gw.catalog.jobs() == []


def test_the_http_api_submits_and_lists(gw):
    from fastapi.testclient import TestClient

    from gateway.web.app import create_app

    token = data_manager(gw)
    viewer = users.add(gw.core, "vic")
    gw.catalog.grant(gw.core.project("queued").id, gw.catalog.user("vic").id, "viewer", "t")
    client = TestClient(create_app(gw.core))
    dm = {"Authorization": f"Bearer {token}"}
    r = client.post("/api/projects/queued/jobs", json={"kind": "pull"}, headers=dm)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "queued" and r.json()["submitted_by"] == "dan"
    again = client.post("/api/projects/queued/jobs", json={"kind": "pull"}, headers=dm)
    assert again.status_code == 409 and "pull job" in again.json()["detail"]
    vic = {"Authorization": f"Bearer {viewer}"}
    refused = client.post("/api/projects/queued/jobs", json={"kind": "pull"}, headers=vic)
    assert refused.status_code == 403
    listed = client.get("/api/projects/queued/jobs", headers=vic)
    assert listed.status_code == 200 and [j["id"] for j in listed.json()] == [r.json()["id"]]
    assert client.get("/api/projects/nope/jobs", headers=dm).status_code == 404
    assert client.post("/api/projects/queued/jobs", json={"kind": "pull"}).status_code == 401


def test_the_http_api_takes_a_runs_level_rule(gw):
    """`level_rule` over HTTP: the CLI's choices, checked (400 and the choices otherwise), kept in
    the job's parameters (what the node runs with); only for a run."""
    from fastapi.testclient import TestClient

    from gateway.web.app import create_app

    dm = {"Authorization": f"Bearer {data_manager(gw)}"}
    client = TestClient(create_app(gw.core))
    url = "/api/projects/queued/jobs"
    run = {"kind": "run", "pipeline": "bone-density"}
    bad = client.post(url, json={**run, "level_rule": "ribs"}, headers=dm)
    assert bad.status_code == 400 and "both, ribs-if-no-sacrum" in bad.json()["detail"]
    pull = client.post(url, json={"kind": "pull", "level_rule": "both"}, headers=dm)
    assert pull.status_code == 400 and "run job" in pull.json()["detail"]
    assert gw.catalog.jobs() == []  # control: neither was queued
    r = client.post(url, json={**run, "level_rule": "ribs-if-no-sacrum"}, headers=dm)
    assert r.status_code == 201, r.text
    want = {"pipeline": "bone-density", "level_rule": "ribs-if-no-sacrum"}
    assert r.json()["params"] == want
    assert [j.params for j in gw.catalog.jobs()] == [want]
    plain = client.post(url, json=run, headers=dm)  # no rule: the default, as on the CLI
    assert plain.status_code == 201 and plain.json()["params"] == {"pipeline": "bone-density"}


# -- pulls run as jobs, against Orthanc ----------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), n_patients=3, slices=16, size=64, seed=5)


@pytest.fixture(scope="module")
def scp_port():
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, corpus, scp_port):
    with seeded_orthanc(tmp_path_factory.mktemp("orthanc"), corpus.files, scp_port) as orthanc:
        yield orthanc


def pulling_gateway(home, pacs, port, **jobs_opts) -> Gateway:
    settings = Settings(
        home=home,
        port=port,
        pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port),
        actor="tester",
        fsync=False,
        backoff_s=0.1,
        jobs=JobOptions(**{"beat_s": 0.2, "poll_s": 0.2, "lease_s": 5, **jobs_opts}),
    )
    return Gateway(settings)


@pytest.mark.peers
def test_a_pull_job_runs_on_a_node_and_is_watched(tmp_path, pacs, scp_port, corpus):
    gw = pulling_gateway(tmp_path, pacs, scp_port)
    approved(gw, "jobbed", [st.accession for st in corpus.studies])
    token = data_manager(gw)
    job = jobs.submit(gw.core, "pull", "jobbed", user=gw.catalog.user("dan"))
    node = jobs.Node(gw.settings, name="node-1")
    node.run(once=True)
    assert node.ran == [job.id]
    row = gw.catalog.job(job.id)
    n_series = sum(len(st.series) for st in corpus.studies)
    assert row.state == "done", row.outcome
    assert row.outcome.startswith(f"{n_series} series stored")
    assert row.progress["instances"] == row.progress["total"] == len(corpus.files)
    assert row.progress["series"] == n_series and row.node == "node-1"
    trail = gw.catalog.audit_trail("jobbed")
    assert [e.actor for e in trail if e.action == "pull.start"] == ["dan"]  # as its submitter
    complete = gw.catalog.series(gw.core.project("jobbed").id, status="complete")
    assert len(complete) == n_series
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_TOKEN": token}
    watched = cli("jobs", "watch", str(job.id), env=env)  # not a terminal: plain lines
    assert watched.returncode == 0, watched.stderr
    assert f"job {job.id}: done" in watched.stdout
    assert f"{len(corpus.files)}/{len(corpus.files)} instances" in watched.stdout
    listed = cli("jobs", env=env)
    assert "done" in listed.stdout and "node-1" in listed.stdout
    # a second job of the same pull finds everything complete
    again = jobs.submit(gw.core, "pull", "jobbed", user=gw.catalog.user("dan"))
    node.run(once=True)
    assert gw.catalog.job(again.id).outcome.startswith(f"0 series stored, {n_series} already")


@pytest.mark.peers
def test_a_running_pull_is_cancelled_at_its_next_heartbeat(tmp_path, pacs, scp_port, corpus):
    gw = pulling_gateway(tmp_path, pacs, scp_port)
    gw.settings.max_associations = 1  # one series at a time: the cancel lands between them
    approved(gw, "stopped", [st.accession for st in corpus.studies])
    data_manager(gw)
    dan = gw.catalog.user("dan")
    job = jobs.submit(gw.core, "pull", "stopped", user=dan)
    node = jobs.Node(gw.settings, name="node-1")
    runner = threading.Thread(target=node.run, kwargs={"once": True})
    runner.start()
    deadline = time.monotonic() + 120
    while gw.catalog.job(job.id).state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "stops at its next heartbeat" in jobs.cancel(gw.core, job.id, user=dan)
    runner.join(300)
    row = gw.catalog.job(job.id)
    assert row.state == "cancelled", row.outcome
    assert "what was stored is kept" in row.outcome
    n_series = sum(len(st.series) for st in corpus.studies)
    complete = gw.catalog.series(gw.core.project("stopped").id, status="complete")
    assert len(complete) < n_series  # it stopped before the end
    assert gw.catalog.pull_lock(gw.core.project("stopped").id) is None  # released
    # what it left is picked up by the next pull
    jobs.submit(gw.core, "pull", "stopped", user=dan)
    node.run(once=True)
    complete = gw.catalog.series(gw.core.project("stopped").id, status="complete")
    assert len(complete) == n_series


@pytest.mark.peers
def test_a_foreground_pull_at_a_terminal_draws_its_progress(tmp_path, pacs, scp_port, corpus):
    """`sphere pull P` with a terminal on stderr: the bar of the job's progress hook (instances
    of the total, series), then the summary as without a terminal."""
    import pty

    gw = pulling_gateway(tmp_path, pacs, scp_port)
    approved(gw, "shown", [st.accession for st in corpus.studies])
    env = {
        **os.environ,
        "SPHERE_HOME": str(tmp_path),
        "SPHERE_TOKEN": data_manager(gw),
        "SPHERE_PORT": str(scp_port),
        "SPHERE_PACS__AE_TITLE": pacs.aet,
        "SPHERE_PACS__PORT": str(pacs.dicom_port),
        "SPHERE_FSYNC": "false",
        "COLUMNS": "120",
    }
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*SPHERE, "pull", "shown"], env=env, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the pull ended: the terminal is closed
            break
        if not chunk:
            break
        drawn += chunk
    out, _ = proc.communicate(timeout=300)
    os.close(master)
    assert proc.returncode == 0, drawn.decode(errors="replace")
    n = len(corpus.files)
    n_series = sum(len(st.series) for st in corpus.studies)
    text = drawn.decode(errors="replace")
    assert "pull shown" in text and f"{n}/{n}" in text and f"{n_series}/{n_series} series" in text
    assert b"instances" in out  # the summary, on stdout as ever


def test_a_run_job_runs_the_pipeline_runner(gw):
    """A pipeline run as a job: the runner the CLI uses (here with nothing to do: no series)."""
    data_manager(gw)
    job = jobs.submit(
        gw.core, "run", "queued", pipeline="bone-density", user=gw.catalog.user("dan")
    )
    node = jobs.Node(gw.settings, name="n")
    node.run(once=True)
    row = gw.catalog.job(job.id)
    assert row.state == "done", row.outcome
    assert row.outcome.startswith("bone-density ") and "nothing to do" in row.outcome


@pytest.mark.peers
def test_a_window_closing_mid_pull_sends_the_job_back_waiting(
    tmp_path, pacs, scp_port, corpus, monkeypatch
):
    """The heartbeat finds the source's window closed (made so here for the node only: the
    pull itself started inside it): no series started after, the job waits for the window,
    and a later lease completes it."""
    from gateway.pull.guard import OutsideWindow

    gw = pulling_gateway(tmp_path, pacs, scp_port)
    gw.settings.max_associations = 1  # one series at a time: the stop lands between them
    approved(gw, "evening", [st.accession for st in corpus.studies])
    data_manager(gw)
    job = jobs.submit(gw.core, "pull", "evening", user=gw.catalog.user("dan"))

    def closed(sources) -> None:  # noqa: ANN001
        raise OutsideWindow(
            "outside the source's time window: pacs (test)", utcnow() + timedelta(hours=1)
        )

    monkeypatch.setattr(jobs, "check_windows", closed)
    jobs.Node(gw.settings, name="n").run(once=True)
    row = gw.catalog.job(job.id)
    assert row.state == "waiting" and "outside the source's time window" in row.outcome
    assert row.not_before > utcnow() + timedelta(minutes=50)
    pid = gw.core.project("evening").id
    n_series = sum(len(st.series) for st in corpus.studies)
    assert len(gw.catalog.series(pid, status="complete")) < n_series
    assert gw.catalog.pull_lock(pid) is None
    monkeypatch.undo()  # the window opens
    with gw.catalog.session() as s:
        s.execute(update(Job).values(not_before=utcnow()))
    jobs.Node(gw.settings, name="n").run(once=True)
    assert gw.catalog.job(job.id).state == "done"
    assert len(gw.catalog.series(pid, status="complete")) == n_series


@pytest.mark.peers
def test_serve_stopped_mid_pull_gives_its_job_back_to_the_queue(tmp_path, pacs, scp_port, corpus):
    """SIGTERM to `sphere serve` while its worker child runs a pull: the job is queued again at
    once (its lease released, not waited out: 10 minutes here), the pull lock released, and a
    node then completes it, every instance once."""
    import json
    import signal

    from tests.test_jobs_nodes import every_instance_once

    gw = pulling_gateway(tmp_path, pacs, scp_port, lease_s=600)
    approved(gw, "served", [st.accession for st in corpus.studies])
    token = data_manager(gw)  # who may serve
    job = jobs.submit(gw.core, "pull", "served", user=gw.catalog.user("dan"))
    web_port = free_port()
    # held to 10 instances a second, so that the pull is surely under way when serve stops
    source = {"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port, "max_rate": 10}
    env = {
        **os.environ,
        "SPHERE_HOME": str(tmp_path),
        "SPHERE_TOKEN": token,
        "SPHERE_WEB__PORT": str(web_port),
        "SPHERE_PORT": str(scp_port),
        "SPHERE_SOURCES": json.dumps([source]),
        "SPHERE_MAX_ASSOCIATIONS": "1",
        "SPHERE_FSYNC": "false",
        "SPHERE_JOBS__LEASE_S": "600",
        "SPHERE_JOBS__BEAT_S": "0.2",
        "SPHERE_JOBS__POLL_S": "0.2",
    }
    serve = subprocess.Popen([*SPHERE, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_serve(serve, web_port)
        deadline = time.monotonic() + 120
        while (gw.catalog.job(job.id).progress or {}).get("instances", 0) == 0:
            assert serve.poll() is None and time.monotonic() < deadline, "no pull under way"
            time.sleep(0.05)
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(10)
    assert serve.returncode == 0, err
    assert "Traceback" not in err and "unexpected" not in err
    row = gw.catalog.job(job.id)
    assert row.state == "queued", (row.state, row.outcome)
    assert row.outcome.startswith("requeued: node") and "stopped" in row.outcome
    assert row.token is None and row.lease_expires is None  # the lease is given back
    assert row.progress["instances"] < len(corpus.files)  # it was stopped mid-pull
    assert gw.catalog.pull_lock(gw.core.project("served").id) is None
    node = jobs.Node(gw.settings, name="node-2")  # leases it at once: no lease to run out
    node.run(once=True)
    assert node.ran == [job.id]
    row = gw.catalog.job(job.id)
    assert row.state == "done" and row.attempts == 2, row.outcome
    every_instance_once(gw, "served", corpus)


def wait_for_serve(serve: subprocess.Popen[str], port: int, timeout_s: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        if serve.poll() is not None:
            pytest.fail(f"sphere serve ended: {serve.stderr.read() if serve.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "sphere serve does not listen"
            time.sleep(0.1)
