"""Several nodes (issue 19, point 2): two `sphere worker` processes, each its own Storage SCP
(AE title and port, both known to the PACS), sharing a PostgreSQL catalog. Queued jobs are each
run once; a node SIGKILLed mid-pull loses its lease and the other takes the job up, resuming it,
every instance stored once. Real Orthanc, real PostgreSQL, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from core import access, users
from core.settings import PacsPeer, Settings
from gateway.api import Gateway
from harness.localpacs import LocalOrthanc, free_port
from harness.serve import sphere_worker
from harness.synthetic import generate
from storage.catalog import IndexedInstance
from tests.test_pull import approved

pytestmark = pytest.mark.peers
NODES = ("NODEA", "NODEB")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), n_patients=3, slices=24, size=64, seed=7)


@pytest.fixture(scope="module")
def ports():
    return {ae: free_port() for ae in NODES}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, corpus, ports):
    # The PACS knows each node as a C-MOVE destination: its AE title, host and port.
    modalities = {ae: (ae, "127.0.0.1", port) for ae, port in ports.items()}
    with LocalOrthanc(tmp_path_factory.mktemp("orthanc"), modalities=modalities) as orthanc:
        assert orthanc.upload(corpus.files) == len(corpus.files)
        yield orthanc


def cluster(tmp_path, pg_server, pacs, name: str) -> tuple[Gateway, dict[str, str]]:
    env = {
        "SPHERE_PACS__AE_TITLE": pacs.aet,
        "SPHERE_PACS__PORT": str(pacs.dicom_port),
        "SPHERE_BACKOFF_S": "0.1",
        "SPHERE_MAX_ASSOCIATIONS": "1",
        "SPHERE_JOBS__LEASE_S": "3",  # short: a dead node's job is taken up within seconds
        "SPHERE_JOBS__BEAT_S": "0.3",
    }
    pacs_peer = PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port)
    return node_home(tmp_path, pg_server, name, env, pacs=pacs_peer)


def node_home(
    tmp_path, pg_server, name: str, env: dict[str, str], **settings: Any
) -> tuple[Gateway, dict[str, str]]:
    """A home on a new PostgreSQL database `name` (`settings` added), with data manager dan:
    its gateway, and the environment of a `sphere worker` node on it (`env` added)."""
    url = pg_server.create_database(name)
    gw = Gateway(Settings(home=tmp_path, catalog_url=url, fsync=False, **settings))
    token = users.add(gw.core, "dan")
    user = gw.catalog.user("dan")
    assert user is not None
    gw.catalog.add_user_role(user.id, access.DATA_MANAGER, "tester")
    node_env = {
        **os.environ,
        "SPHERE_HOME": str(tmp_path),
        "SPHERE_CATALOG_URL": url,
        "SPHERE_TOKEN": token,
        "SPHERE_FSYNC": "false",
        "SPHERE_JOBS__POLL_S": "0.2",
        **env,
    }
    return gw, node_env


def worker(
    env: dict[str, str], ae: str, port: int
) -> AbstractContextManager[subprocess.Popen[str]]:
    """`sphere worker` as node `ae` (its own SCP port), what it said in the home."""
    return sphere_worker(env, ae, port, Path(env["SPHERE_HOME"]) / f"worker-{ae}.log")


def wait_for(check, what: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.1)


def jobs_ended(gw: Gateway, ids: list[int]) -> bool:
    """Every job of `ids` done or failed."""
    rows = [gw.catalog.job(i) for i in ids]
    return all(r is not None and r.state in ("done", "failed") for r in rows)


def every_instance_once(gw: Gateway, project: str, corpus) -> None:
    p = gw.core.project(project)
    n_series = sum(len(st.series) for st in corpus.studies)
    complete = gw.catalog.series(p.id, status="complete")
    assert len(complete) == n_series
    assert all(r.stored == r.expected for r in complete)
    with gw.catalog.session() as s:
        sops = [
            r.sop_uid
            for r in s.query(IndexedInstance).filter(IndexedInstance.project_id == p.id).all()
        ]
    assert len(sops) == len(set(sops)) == len(corpus.files)


def test_two_nodes_run_three_queued_pulls_each_once(tmp_path, pg_server, pacs, ports, corpus):
    gw, env = cluster(tmp_path, pg_server, pacs, "nodes_three")
    names = ["alpha", "beta", "gamma"]
    dan = gw.catalog.user("dan")
    from gateway import jobs

    ids = []
    for name in names:
        approved(gw, name, [st.accession for st in corpus.studies])
        ids.append(jobs.submit(gw.core, "pull", name, user=dan).id)
    with worker(env, "NODEA", ports["NODEA"]), worker(env, "NODEB", ports["NODEB"]):
        wait_for(lambda: jobs_ended(gw, ids), "the jobs")
    rows = [gw.catalog.job(i) for i in ids]
    assert [r.state for r in rows] == ["done"] * 3, [r.outcome for r in rows]
    assert [r.attempts for r in rows] == [1, 1, 1]  # each leased once
    for name in names:
        starts = [e for e in gw.catalog.audit_trail(name) if e.action == "pull.start"]
        assert len(starts) == 1  # and pulled once
        every_instance_once(gw, name, corpus)
    assert {r.node.split("@")[0] for r in rows} <= set(NODES)


def test_a_node_killed_mid_pull_loses_its_job_to_the_other(
    tmp_path, pg_server, pacs, ports, corpus
):
    gw, env = cluster(tmp_path, pg_server, pacs, "nodes_killed")
    approved(gw, "taken", [st.accession for st in corpus.studies])
    from gateway import jobs

    job = jobs.submit(gw.core, "pull", "taken", user=gw.catalog.user("dan"))
    # Held to 10 instances a second (the source's cap, in the catalog), so that node A is
    # surely mid-pull when it is killed: unthrottled, an idle machine pulled it all before the
    # first progress arrived.
    pacs_source = {"name": "pacs", "ae_title": pacs.aet, "port": pacs.dicom_port, "max_rate": 10}
    env = {**env, "SPHERE_SOURCES": json.dumps([pacs_source])}
    with worker(env, "NODEA", ports["NODEA"]) as a:
        # mid-pull: some instances received, not all
        wait_for(
            lambda: (gw.catalog.job(job.id).progress or {}).get("instances", 0) > 0,
            "node A to receive",
        )
        os.killpg(a.pid, signal.SIGKILL)  # the node and its SCP workers, at once
        a.wait(30)
    row = gw.catalog.job(job.id)
    assert row.state == "running" and row.node.startswith("NODEA")  # still "held" by the dead
    assert row.progress["instances"] < len(corpus.files)
    with worker(env, "NODEB", ports["NODEB"]):
        wait_for(lambda: gw.catalog.job(job.id).state in ("done", "failed"), "node B")
    row = gw.catalog.job(job.id)
    assert row.state == "done", row.outcome
    assert row.attempts == 2 and row.node.startswith("NODEB")
    every_instance_once(gw, "taken", corpus)
    took = [e for e in gw.catalog.audit_trail("taken") if e.action == "pull.lock"]
    assert len(took) == 1 and "process is gone" in took[0].detail
    leases = [e for e in gw.catalog.audit_trail("taken") if e.action == "jobs.lease"]
    (lease,) = leases
    assert "NODEA" in json.loads(lease.detail)["took_over"]


def test_nodes_racing_for_jobs_on_postgresql_lease_each_once(tmp_path, pg_server):
    """Eight threads over two catalogs (two nodes) lease 30 queued jobs at once: every job
    leased exactly once (FOR UPDATE SKIP LOCKED and the token's compare-and-swap)."""
    import threading

    from storage.catalog import Catalog

    url = pg_server.create_database("nodes_race")
    nodes = [Catalog(url), Catalog(url)]
    for i in range(30):
        nodes[0].submit_job("run", f"p{i}", {}, "dan")
    start = threading.Barrier(8)
    leased: list[int] = []

    def take(i: int) -> None:
        start.wait()
        while (
            job := nodes[i % 2].lease_job(f"n{i}", f"t{i}-{time.monotonic_ns()}", 60)
        ) is not None:
            leased.append(job.id)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(leased) == list(range(1, 31))
    assert nodes[1].job_counts() == {("run", "running"): 30}
    for c in nodes:
        c.dispose()
