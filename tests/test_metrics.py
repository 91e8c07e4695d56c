"""/metrics (issue 19, point 4): who may scrape, what a pull and the web count, with several
processes (a pull job on `sphere serve`'s node and its SCP worker processes, `sphere serve
--workers 2`), and never
an identifier in a label. Real Orthanc, real `sphere` processes."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from core import Core, Settings, access, users
from core.settings import S3Options
from gateway.web.app import create_app
from harness.leaks import scan_text
from harness.localpacs import free_port
from tests.test_cli import SPHERE
from tests.test_pull import approved, corpus, make_gateway, pacs, scp_port  # noqa: F401
from tests.test_pull_faults import env_for
from tests.web_server import serving, wait_healthy

STUDIES = "/projects/{project}/dicom-web/studies/{study}/series"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text answer, by name and labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(found: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in found.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def test_who_may_scrape(tmp_path):
    core = Core(Settings(home=tmp_path, fsync=False), create=True)
    app = create_app(core)
    with TestClient(app) as client:  # its client is "testclient": no address of ours
        assert client.get("/metrics").status_code == 403
        core.settings.web.metrics_token = SecretStr("s3cret-scraper")
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403
        r = client.get("/metrics", headers={"Authorization": "Bearer s3cret-scraper"})
        assert r.status_code == 200 and "sphere_http_requests_total" in r.text
        core.settings.web.metrics_token = None
    with serving(core) as url:  # from this host, straight: allowed by default
        assert requests.get(f"{url}/metrics").status_code == 200
        # through a proxy on this host (it forwards for someone else): refused
        r = requests.get(f"{url}/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        assert r.status_code == 403
        r = requests.get(f"{url}/metrics", headers={"Forwarded": "for=203.0.113.9"})
        assert r.status_code == 403
        core.settings.web.metrics_from = ["10.9.9.0/24"]
        assert requests.get(f"{url}/metrics").status_code == 403
        core.settings.web.metrics_from = ["127.0.0.1"]
        r = requests.get(f"{url}/metrics")
    found = samples(r.text)
    assert total(found, "sphere_http_requests_total", route="/metrics", status="4xx") >= 3
    assert total(found, "sphere_http_requests_total", route="/metrics", status="2xx") >= 1
    time.sleep(1.5)  # the web audit writes once a second
    rows = [
        e
        for e in core.catalog.audit_trail(limit=1000)
        if json.loads(e.detail or "{}").get("route") == "/metrics"
    ]
    assert rows and all(e.outcome == "refused" for e in rows)  # refusals kept, scrapes not
    core.close()


@pytest.mark.peers
def test_pull_and_serve_count_across_processes_and_name_no_patient(
    tmp_path,
    pacs,  # noqa: F811
    scp_port,  # noqa: F811
    corpus,  # noqa: F811
):
    gw = make_gateway(tmp_path, pacs, scp_port)
    studies = corpus.studies[:2]
    approved(gw, "metr", [st.accession for st in studies])
    env = env_for(gw, pacs, scp_port)
    env["SPHERE_RECEIVE_WORKERS"] = "2"  # the receivers count in their own processes
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    token = users.add(gw.core, "ivy")
    users.grant(gw.core, "metr", "ivy", "investigator")
    port = free_port()
    serve_env = {**env, "SPHERE_WEB__PORT": str(port), "SPHERE_WEB__WORKERS": "2"}
    proc = subprocess.Popen([*SPHERE, "serve"], env=serve_env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    keys = gw.keys("metr")
    try:
        wait_healthy(url, proc)
        # The pull is a job the server's node runs (its own process, with its SCP worker
        # processes); the server cleared the files of ended processes at its start only.
        done = subprocess.run(
            [*SPHERE, "jobs", "submit", "pull", "metr"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 240
        while (job := gw.catalog.jobs("metr")[0]).state not in ("done", "failed"):
            assert proc.poll() is None and time.monotonic() < deadline, job.state
            time.sleep(0.5)
        assert job.state == "done", job.outcome
        assert sorted(p.name for p in (tmp_path / "metrics").iterdir())  # files, one per process
        auth = {"Authorization": f"Bearer {token}"}
        root = f"{url}/projects/metr/dicom-web"
        typed = []  # what the routes were given: pseudonymous UIDs, and identifiers typed
        for st in studies:
            for uid in (keys.uid(st.study_uid), st.study_uid):
                typed.append(uid)
                for _ in range(3):  # several requests: both worker processes answer some
                    requests.get(f"{root}/studies/{uid}/series", headers=auth)
            requests.get(f"{root}/studies", params={"PatientID": st.patient_id}, headers=auth)
            requests.get(f"{root}/studies", params={"AccessionNumber": st.accession}, headers=auth)
        requests.get(f"{url}/projects/{studies[0].patient_id}/dicom-web/studies", headers=auth)
        requests.get(f"{url}/no/such/{studies[0].accession}")
        text = ""
        for _ in range(4):  # each scrape may meet either worker: all answer the same sums
            r = requests.get(f"{url}/metrics")
            assert r.status_code == 200
            text = r.text
    finally:
        proc.terminate()
        proc.wait(20)
    found = samples(text)
    n_instances = sum(st.n_instances for st in studies)
    n_series = sum(len(st.series) for st in studies)
    pull = {"project": "metr", "source": "pacs"}
    assert total(found, "sphere_instances_received_total", **pull) == n_instances
    assert total(found, "sphere_instances_stored_total", **pull) == n_instances
    assert total(found, "sphere_stored_bytes_total", **pull) > 0
    assert total(found, "sphere_received_bytes_total", **pull) > n_instances * 64 * 64 * 2
    assert total(found, "sphere_series_total", outcome="complete", **pull) == n_series
    assert total(found, "sphere_instances_refused_total") == 0
    assert total(found, "sphere_source_connections") == 0  # none in use once the pull ended
    requests_seen = total(found, "sphere_http_requests_total", route=STUDIES, status="2xx")
    assert requests_seen >= 6  # from both workers' files, summed
    assert total(found, "sphere_http_request_duration_seconds_count", route=STUDIES) >= 12
    assert "sphere_pull_locks_held" in text
    assert total(found, "sphere_jobs", kind="pull", state="done") == 1
    # Not one identifier, original or pseudonymous, in the whole answer.
    needles = list(corpus.phi) + typed + [st.accession for st in studies]
    needles += [keys.uid(se.series_uid) for st in studies for se in st.series]
    assert scan_text("metrics", text, needles) == []
    # Positive control: a metric labelled with the path typed is caught by the same scan.
    bad = CollectorRegistry()
    Counter("leaky", "a raw path as label", ["path"], registry=bad).labels(
        f"/projects/metr/dicom-web/studies/{typed[1]}/series"
    ).inc()
    assert scan_text("metrics", text + generate_latest(bad).decode(), needles)


def test_the_data_manager_token_is_no_scraper(tmp_path):
    """A user's token is not the metrics token: a data manager from elsewhere is refused."""
    core = Core(Settings(home=tmp_path, fsync=False), create=True)
    token = users.add(core, "dan")
    core.catalog.add_user_role(core.catalog.user("dan").id, access.DATA_MANAGER, "tester")
    core.settings.web.metrics_token = SecretStr("the-scraper")
    with TestClient(create_app(core)) as client:
        r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403
    core.close()


# -- /readyz ----------------------------------------------------------------------------------


def readyz(core: Core) -> tuple[int, dict]:
    with TestClient(create_app(core)) as client:
        r = client.get("/readyz")
    assert r.headers["content-type"] == "application/json"
    return r.status_code, r.json()


def test_ready_and_the_spool_space(tmp_path):
    core = Core(Settings(home=tmp_path, fsync=False), create=True)
    assert readyz(core) == (200, {"status": "ready", "checks": {"catalog": "ok", "store": "ok"}})
    core.settings.spool_dir.mkdir()  # a node that pulls: its spool's disk counts
    status, body = readyz(core)
    assert status == 200 and body["checks"]["spool"] == "ok"
    core.settings.web.ready_spool_free_mb = 1 << 40  # more than any disk here
    status, body = readyz(core)
    assert status == 503 and body["status"] == "not ready"
    assert body["checks"]["spool"].endswith(f"below {1 << 40} MB")
    assert body["checks"]["catalog"] == body["checks"]["store"] == "ok"
    core.close()


@pytest.mark.peers
def test_not_ready_when_the_store_is_down(tmp_path):
    from harness.seaweed import SeaweedS3

    s3 = SeaweedS3(tmp_path / "s3").start()
    try:
        settings = Settings(
            home=tmp_path / "home",
            storage_url=s3.url(prefix="sphere"),
            s3=S3Options(**vars(s3.options())),
        )
        core = Core(settings, create=True)
        secret_free = [s3.secret_key, s3.access_key, s3.endpoint]
        assert readyz(core)[0] == 200
    finally:
        s3.stop()
    status, body = readyz(core)  # the same server, its store gone
    assert status == 503 and body["checks"]["catalog"] == "ok"
    assert body["checks"]["store"].startswith("unreachable")
    assert not any(x in json.dumps(body) for x in secret_free)
    core.close()


@pytest.mark.peers
def test_not_ready_when_the_catalog_is_down(tmp_path, pg_server):
    url = pg_server.create_database("readyz")
    core = Core(Settings(home=tmp_path, catalog_url=url, fsync=False), create=True)
    assert readyz(core)[0] == 200
    with pg_server.connect() as c:  # the catalog's database gone, connections cut
        c.execute('DROP DATABASE "readyz" WITH (FORCE)')
    status, body = readyz(core)
    assert status == 503 and body["checks"]["store"] == "ok"
    assert body["checks"]["catalog"].startswith("unreachable")
    assert str(pg_server.port) not in json.dumps(body)
    core.close()
