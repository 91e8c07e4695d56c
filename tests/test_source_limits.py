"""The PACS protected, cluster-wide (issue 19, point 3): time windows (a job outside waits, a
foreground pull is refused saying when it opens); at most N associations across every node
(slots in the catalog): two `sphere worker` processes pulling through a counting proxy with a
limit of 1 never have more than one association open to Orthanc; one breaker for the cluster
(a catalog row): a source that stops answering opens it once, one node probes per interval,
every node's pull resumes when it answers; the instance-rate cap counts every node's instances."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from core import access, metrics, users
from core.settings import JobOptions, PacsPeer, Settings, Source
from core.windows import is_open, next_open, parse
from gateway import jobs
from gateway.api import Gateway
from harness.localpacs import LocalOrthanc, free_port
from harness.synthetic import generate
from storage.catalog import utcnow
from storage.models import SourceSlot
from tests.tcp_proxy import CountingProxy
from tests.test_jobs_nodes import every_instance_once, jobs_ended, node_home, wait_for, worker
from tests.test_pull import approved

SPHERE = [sys.executable, "-m", "gateway.cli"]


# -- windows ------------------------------------------------------------------------------------


def test_windows_parse_and_open():
    nights = ["mon-fri 20:00-07:00", "sat-sun"]
    monday = datetime(2026, 12, 7)  # a Monday
    assert not is_open(nights, monday.replace(hour=12))
    assert is_open(nights, monday.replace(hour=21))
    assert is_open(nights, monday.replace(hour=6, minute=59) + timedelta(days=1))  # Tue morning
    assert not is_open(nights, monday.replace(hour=7) + timedelta(days=1))
    assert is_open(nights, monday - timedelta(days=1))  # Sunday
    assert is_open(["fri 22:00-06:00"], monday.replace(hour=3) + timedelta(days=5))  # Sat 03:00
    assert next_open(nights, monday.replace(hour=12)) == monday.replace(hour=20)
    assert is_open([], monday)  # no window: always
    for bad in ("funday", "mon-fri 25:00-07:00", "20:00"):
        with pytest.raises(ValueError, match="window"):
            parse(bad)
    with pytest.raises(ValueError, match="window"):  # the settings refuse it too
        Source(windows=["someday"])


def closed_window(now: datetime) -> str:
    """A one-minute window two hours away: now is outside it."""
    start = now + timedelta(hours=2)
    end = start + timedelta(minutes=1)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_a_job_outside_its_window_waits_and_a_foreground_pull_is_refused(tmp_path):
    now = datetime.now()
    pacs = PacsPeer(port=free_port(), windows=[closed_window(now)])
    settings = Settings(home=tmp_path, pacs=pacs, fsync=False, jobs=JobOptions(beat_s=0.2))
    gw = Gateway(settings)
    approved(gw, "night", ["A1"])
    token = users.add(gw.core, "dan")
    gw.catalog.add_user_role(gw.catalog.user("dan").id, access.DATA_MANAGER, "t")
    job = jobs.submit(gw.core, "pull", "night", user=gw.catalog.user("dan"))
    jobs.Node(settings, name="n").run(once=True)
    row = gw.catalog.job(job.id)
    assert row.state == "waiting" and "outside the source's time window" in row.outcome
    assert row.not_before > utcnow() + timedelta(minutes=100)  # until it opens
    assert not [e for e in gw.catalog.audit_trail("night") if e.action == "pull.start"]
    env = {
        **os.environ,
        "SPHERE_HOME": str(tmp_path),
        "SPHERE_TOKEN": token,
        "SPHERE_PACS__PORT": str(pacs.port),
        "SPHERE_PACS__WINDOWS": json.dumps(pacs.windows),
    }
    listed = subprocess.run([*SPHERE, "jobs"], capture_output=True, text=True, env=env)
    assert " waiting " in listed.stdout
    fg = subprocess.run([*SPHERE, "pull", "night"], capture_output=True, text=True, env=env)
    assert fg.returncode == 2
    (line,) = fg.stderr.strip().splitlines()
    assert "outside the source's time window" in line and "it opens at" in line
    # Control: a window open now lets the job through (to the PACS, which is not there).
    with gw.catalog.session() as s:
        from storage.catalog import Job

        s.execute(update(Job).values(not_before=utcnow()))
    opened = settings.model_copy(update={"pacs": pacs.model_copy(update={"windows": []})})
    jobs.Node(opened, name="n").run(once=True)
    row = gw.catalog.job(job.id)
    assert row.state == "waiting" and "unavailable" in row.outcome, row.outcome


# -- slots --------------------------------------------------------------------------------------


def test_source_slots_are_limited_and_a_dead_holders_expire(tmp_path):
    gw = Gateway(Settings(home=tmp_path))
    cat = gw.catalog
    assert cat.take_source_slot("pacs", 2, "a", "node-a", 30) == 0
    assert cat.take_source_slot("pacs", 2, "b", "node-b", 30) == 1
    assert cat.take_source_slot("pacs", 2, "c", "node-c", 30) is None  # all held
    assert cat.source_slots_held("pacs") == 2
    cat.release_source_slot("pacs", 1, "b")
    assert cat.take_source_slot("pacs", 2, "c", "node-c", 30) == 1
    with cat.session() as s:  # node a died: its slot's lease runs out
        s.execute(
            update(SourceSlot)
            .where(SourceSlot.token == "a")
            .values(expires=utcnow() - timedelta(seconds=1))
        )
    assert cat.take_source_slot("pacs", 2, "d", "node-d", 30) == 0
    cat.release_source_slot("pacs", 0, "a")  # a, back, releases nothing of d's
    assert cat.source_slots_held("pacs") == 2


def test_the_proxy_counts_concurrent_connections():
    """Control for the test below: two connections at once through the proxy count 2."""
    upstream = socket.create_server(("127.0.0.1", 0))
    proxy = CountingProxy(upstream.getsockname()[1])
    try:
        a = socket.create_connection(("127.0.0.1", proxy.port))
        b = socket.create_connection(("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.most == 2, "two connections", 10)
        a.close()
        b.close()
    finally:
        proxy.close()
        upstream.close()


NODES = ("NODEA", "NODEB")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("corpus"), n_patients=3, slices=12, size=64, seed=9)


@pytest.fixture(scope="module")
def ports():
    return {ae: free_port() for ae in NODES}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, corpus, ports):
    modalities = {ae: (ae, "127.0.0.1", port) for ae, port in ports.items()}
    with LocalOrthanc(tmp_path_factory.mktemp("orthanc"), modalities=modalities) as orthanc:
        assert orthanc.upload(corpus.files) == len(corpus.files)
        yield orthanc


@pytest.fixture
def two_nodes(tmp_path, pg_server, pacs, ports, corpus):
    """Starts two `sphere worker` nodes on a new PostgreSQL catalog `db`, with a queued pull of
    each of `projects` (every study approved), from Orthanc behind a counting proxy as source
    "pacs" (`source`: its limits; `env`: the nodes' settings). Yields (gateway, proxy, job ids)
    while both run; stops them, then closes the proxy."""

    @contextmanager
    def start(
        db: str, projects: tuple[str, str], source: dict[str, Any], env: dict[str, str]
    ) -> Iterator[tuple[Gateway, CountingProxy, list[int]]]:
        with CountingProxy(pacs.dicom_port) as proxy:
            source = {"name": "pacs", "protocol": "move", "ae_title": pacs.aet,
                      "host": "127.0.0.1", "port": proxy.port, **source}  # fmt: skip
            env = {"SPHERE_SOURCES": json.dumps([source]), "SPHERE_JOBS__BEAT_S": "0.5", **env}
            gw, env = node_home(tmp_path, pg_server, db, env, sources=[Source(**source)])
            ids = []
            for name in projects:
                approved(gw, name, [st.accession for st in corpus.studies])
                ids.append(jobs.submit(gw.core, "pull", name, user=gw.catalog.user("dan")).id)
            try:
                with worker(env, "NODEA", ports["NODEA"]), worker(env, "NODEB", ports["NODEB"]):
                    yield gw, proxy, ids
            finally:
                proxy.pass_again()

    return start


@pytest.mark.peers
def test_two_nodes_hold_the_source_to_one_association(two_nodes, corpus):
    # each node would open two associations: the cluster's limit is 1
    limits, env = {"cluster_limit": 1}, {"SPHERE_MAX_ASSOCIATIONS": "2"}
    with two_nodes("limited", ("one", "two"), limits, env) as (gw, proxy, ids):
        wait_for(lambda: jobs_ended(gw, ids), "the jobs", timeout_s=400)
    rows = [gw.catalog.job(i) for i in ids]
    assert [r.state for r in rows] == ["done", "done"], [r.outcome for r in rows]
    assert proxy.total > 2  # C-FINDs and C-MOVEs went through it...
    assert proxy.most == 1  # ...never more than one at once, across both nodes
    for name in ("one", "two"):
        every_instance_once(gw, name, corpus)
    assert gw.catalog.source_slots_held("pacs") == 0  # all given back


# -- the breaker --------------------------------------------------------------------------------


def breaker_gauge() -> float | None:
    """sphere_source_breaker_open of the source "pacs" in this process (the pull runs here)."""
    return metrics.get().registry.get_sample_value("sphere_source_breaker_open", {"source": "pacs"})


def pull_through_an_outage(home, pacs, port, corpus, breaker_after: int):
    """Pull while the proxy drops everything for a while, mid-pull: (report or error, proxy,
    the breaker's audit rows by state)."""
    import threading

    proxy = CountingProxy(pacs.dicom_port)
    source = Source(
        name="pacs",
        protocol="move",
        ae_title=pacs.aet,
        host="127.0.0.1",
        port=proxy.port,
        breaker_after=breaker_after,
        probe_s=0.3,
        max_rate=1e6,  # never waits; counts what was asked for
    )
    settings = Settings(
        home=home,
        sources=[source],
        ae_title="NODEA",
        port=port,
        max_associations=1,
        fsync=False,
        backoff_s=0.1,
        timeout_s=5,
    )
    gw = Gateway(settings)
    approved(gw, "flaky", [st.accession for st in corpus.studies])
    pid = gw.core.project("flaky").id
    result: dict[str, object] = {}

    def breaker(state: str) -> list:
        trail = gw.catalog.audit_trail("flaky")
        return [
            e for e in trail if e.action == "source.breaker" and f'"state": "{state}"' in e.detail
        ]

    def pulling() -> None:
        try:
            result["report"] = gw.pull("flaky")
        except Exception as e:  # noqa: BLE001 - the test says what it was
            result["error"] = e

    t = threading.Thread(target=pulling)
    t.start()
    try:
        wait_for(lambda: len(gw.catalog.series(pid, status="complete")) >= 1, "a first series")
        proxy.drop()
        # until the breaker has opened and probed a few times, or the pull gave up on its own
        wait_for(lambda: proxy.dropped >= 4 or not t.is_alive(), "a few probes", 120)
        result["gauge"] = breaker_gauge()  # /metrics' word while it is out
        proxy.pass_again()
        t.join(300)
    finally:
        proxy.pass_again()
        proxy.close()
    return gw, result, proxy, breaker


@pytest.mark.peers
def test_a_source_that_stops_answering_trips_the_breaker_and_the_pull_resumes(
    tmp_path, pacs, ports, corpus
):
    """Mid-pull the proxy drops everything: the breaker opens after `breaker_after` calls
    without an answer, then only its probes reach for the source (no series fails on its own
    retries); when the proxy passes again the pull goes on and completes."""
    gw, result, proxy, breaker = pull_through_an_outage(
        tmp_path, pacs, ports["NODEA"], corpus, breaker_after=2
    )
    assert "error" not in result, result
    report = result["report"]
    assert report.ok and report.count("failed") == 0, [s.error for s in report.series]
    every_instance_once(gw, "flaky", corpus)
    assert len(breaker("open")) == 1
    assert result["gauge"] == 1 and breaker_gauge() == 0  # open while out, closed after
    (closed,) = breaker("closed")
    probes = json.loads(closed.detail)["probes"]
    assert probes >= 3
    # every connection tried while it dropped was a probe or one of the calls that tripped it
    assert proxy.dropped <= 2 + probes


@pytest.mark.peers
def test_without_the_breaker_the_series_fail_on_their_own_retries(tmp_path, pacs, ports, corpus):
    """Control: a breaker that never trips (1000 misses) leaves each series to its retries,
    which the same outage exhausts: series fail."""
    gw, result, proxy, breaker = pull_through_an_outage(
        tmp_path, pacs, ports["NODEA"], corpus, breaker_after=1000
    )
    report = result.get("report") or result["error"].report
    assert report.count("failed") > 0
    assert breaker("open") == []
    assert result["gauge"] != 1
    # the rate cap counted each attempt: a series asked again is sent again whole
    rows = gw.catalog.series(gw.core.project("flaky").id)
    attempts = gw.settings.retries + 1
    failed = sum(r.expected for r in rows if r.status == "failed")
    complete = sum(r.expected for r in rows if r.status == "complete")
    assert failed and gw.catalog.source_bucket("pacs").taken >= complete + attempts * failed


class Outage:
    """A stand-in source for the breaker's own tests: a call gets no answer while `down`;
    each probe (C-ECHO) is timed."""

    def __init__(self) -> None:
        import threading

        self.down = False
        self.probes: list[float] = []
        self.span = 0.0  # from the breaker opening to its closing
        self._lock = threading.Lock()

    def fetch(self) -> str:
        if self.down:
            from gateway.pull.guard import SourceError

            raise SourceError("no answer", answered=False)
        return "ok"

    def echo(self) -> None:
        import time

        with self._lock:
            self.probes.append(time.monotonic())
        self.fetch()


def nodes_through_an_outage(catalogs, probe_s: float = 0.2):
    """Three callers on each node (a catalog each) keep calling through their node's breaker
    while the source is out, then back: (the outage, the openings and closings each node's
    breaker told)."""
    import threading
    import time

    from gateway.pull.guard import Breaker

    src = Source(name="pacs", breaker_after=2, probe_s=probe_s, give_up_s=60)
    out = Outage()
    told: list[str] = []
    when: dict[str, float] = {}

    def tell(state: str, detail: dict) -> None:
        told.append(state)
        when[state] = time.monotonic()

    breakers = [Breaker(src, out.echo, c, tell) for c in catalogs]
    ok: list[str] = []
    stop = threading.Event()

    def caller(b: Breaker) -> None:
        while not stop.is_set():
            try:
                ok.append(b.call(out.fetch))
            except Exception:  # noqa: BLE001 - a miss before the breaker opened: call again
                time.sleep(0.01)

    threads = [threading.Thread(target=caller, args=(b,)) for b in breakers for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: len(ok) > 20, "calls answered")
    out.down = True
    wait_for(lambda: len(out.probes) >= 6, "probes of the source", 60)
    out.down = False
    n = len(ok)
    wait_for(lambda: len(ok) > n + 20, "calls answered again", 60)
    stop.set()
    for t in threads:
        t.join(10)
    out.span = when.get("closed", 0.0) - when.get("open", 0.0)
    return out, told


@pytest.mark.peers
def test_every_node_sees_one_breaker_and_one_probe_per_interval(pg_server):
    """Two nodes (two catalogs on one PostgreSQL), three callers each: the source going out
    opens one breaker, audited once; one probe per interval across both nodes; once a probe is
    answered every caller goes on, and the closing is told once."""
    from storage.catalog import Catalog

    url = pg_server.create_database("breakers")
    nodes = [Catalog(url), Catalog(url)]
    out, told = nodes_through_an_outage(nodes, probe_s=0.2)
    assert told == ["open", "closed"]
    # one probe per interval, whichever node: the turns are probe_s apart in the catalog (a
    # probe may start late, under load, never early), so no more than the open time allows
    assert len(out.probes) <= out.span / 0.2 + 2, (len(out.probes), out.span)
    row = nodes[0].source_breaker("pacs")
    assert row.opened_at is None and row.opening == 1 and row.probes == len(out.probes)
    for c in nodes:
        c.dispose()


@pytest.mark.peers
def test_a_probe_turn_is_taken_by_one_node_per_interval(pg_server):
    """The breaker's probe turn is a compare-and-swap on `next_probe`: two nodes asking at the
    same instant get one turn; the next comes `probe_s` later, for one of them again."""
    from storage.catalog import Catalog

    url = pg_server.create_database("probe_turns")
    a, b = Catalog(url), Catalog(url)
    t0 = utcnow()
    assert a.breaker_probe_turn("pacs", 10, now=t0) is False  # closed: nothing to probe
    assert a.breaker_missed("pacs", 2, 10, now=t0) is None
    assert b.breaker_missed("pacs", 2, 10, now=t0) is True  # the second miss opens it
    assert a.breaker_missed("pacs", 2, 10, now=t0) is False  # open already
    assert not a.breaker_probe_turn("pacs", 10, now=t0 + timedelta(seconds=9))  # not yet
    at = t0 + timedelta(seconds=10)
    assert [a.breaker_probe_turn("pacs", 10, now=at), b.breaker_probe_turn("pacs", 10, now=at)] == [
        True,
        False,
    ]
    assert not a.breaker_probe_turn("pacs", 10, now=at + timedelta(seconds=5))
    assert b.breaker_probe_turn("pacs", 10, now=at + timedelta(seconds=10))
    opening = a.source_breaker("pacs").opening
    assert a.breaker_close("pacs", opening) is not None
    assert b.breaker_close("pacs", opening) is None  # closed once
    for c in (a, b):
        c.dispose()


@pytest.mark.parametrize("limit", [1, None])
def test_the_breaker_probes_within_the_source_limit(tmp_path, limit):
    """A probe is an association like any other: it holds one of the source's cluster slots
    while it runs (else it could be one more than the limit). Control: without a limit there
    is no slot to hold, and the check sees none."""
    from gateway.pull.guard import SourceError, guarded

    src = Source(name="pacs", cluster_limit=limit, breaker_after=1, probe_s=0.05)
    gw = Gateway(Settings(home=tmp_path, sources=[src]))
    held: list[int] = []

    class Flaky:
        name, protocol, max_concurrent = "pacs", "move", 1
        calls = 0

        def echo(self) -> None:
            held.append(gw.catalog.source_slots_held("pacs"))

        def retrieve(self, study_uid: str, series_uid: str) -> str:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise SourceError("no answer", answered=False)
            return "ok"

    g = guarded(gw.core, src, Flaky())
    assert g.retrieve("1", "2") == "ok"  # tripped, probed, asked again
    if g.slots is not None:
        g.slots.close()
    assert held == ([1] if limit else [0])
    assert gw.catalog.source_slots_held("pacs") == 0


def test_a_breaker_per_node_is_caught(tmp_path):
    """Control: nodes that do not share the breaker's row (a catalog each, as a breaker kept in
    each process) open it once each and probe on their own: the test above would fail."""
    from storage.catalog import Catalog

    nodes = [Catalog(f"sqlite:///{tmp_path}/a.db"), Catalog(f"sqlite:///{tmp_path}/b.db")]
    out, told = nodes_through_an_outage(nodes, probe_s=0.2)
    assert told.count("open") == 2 and told.count("closed") == 2
    for c in nodes:
        c.dispose()


@pytest.mark.peers
def test_two_nodes_pause_on_one_breaker_and_resume(two_nodes, corpus):
    """Two `sphere worker` nodes on one PostgreSQL catalog, each pulling a project through the
    proxy, which stops answering mid-pull: one opening audited (not one per node), only probes
    reach for the source meanwhile, and when it answers again both pulls complete."""
    # max_rate: both nodes still mid-pull when the source goes out
    limits = {"max_rate": 8, "breaker_after": 2, "probe_s": 0.5}
    env = {"SPHERE_MAX_ASSOCIATIONS": "1", "SPHERE_BACKOFF_S": "0.1", "SPHERE_TIMEOUT_S": "5"}
    with two_nodes("breaker_nodes", ("left", "right"), limits, env) as (gw, proxy, ids):

        def mid_pull(name: str) -> bool:
            return len(gw.catalog.series(gw.core.project(name).id, status="complete")) >= 1

        wait_for(lambda: mid_pull("left") and mid_pull("right"), "both pulls under way")
        proxy.drop()
        # both still pulling (else the outage would test nothing)
        assert [gw.catalog.job(i).state for i in ids] == ["running", "running"]
        wait_for(lambda: getattr(gw.catalog.source_breaker("pacs"), "probes", 0) >= 4, "probes")
        row = gw.catalog.source_breaker("pacs")
        assert row.opened_at is not None
        proxy.pass_again()
        wait_for(lambda: jobs_ended(gw, ids), "the jobs", timeout_s=300)
    rows = [gw.catalog.job(i) for i in ids]
    assert [r.state for r in rows] == ["done", "done"], [r.outcome for r in rows]
    for name in ("left", "right"):
        every_instance_once(gw, name, corpus)
    # the rate cap counted every instance of both nodes (a series' worth at a time, again for
    # a series asked again after the outage cut it)
    assert gw.catalog.source_bucket("pacs").taken >= 2 * len(corpus.files)

    def breaker_rows() -> list:
        return sorted(gw.catalog.audit_trail(action="source.breaker"), key=lambda e: e.id)

    states = [json.loads(e.detail)["state"] for e in breaker_rows()]
    assert states == ["open", "closed"], states  # once for the cluster, not once per node
    probes = json.loads(breaker_rows()[1].detail)["probes"]
    # what reached for the source while out: the probes, and at most the calls in flight on
    # each node (one association each) plus each one's retry before the breaker opened
    assert proxy.dropped <= probes + 4, (proxy.dropped, probes)
    assert gw.catalog.source_breaker("pacs").opened_at is None


# -- the rate cap -------------------------------------------------------------------------------


def test_the_rate_bucket_refills_by_time_and_makes_takers_wait(tmp_path):
    cat = Gateway(Settings(home=tmp_path)).catalog
    t0 = utcnow()
    assert cat.take_source_tokens("pacs", 10, rate=10, burst=10, now=t0) == 0  # the burst
    assert cat.take_source_tokens("pacs", 10, rate=10, burst=10, now=t0) == pytest.approx(1.0)
    # a second on, the 10 taken ahead are paid for: the next 5 wait half a second
    later = t0 + timedelta(seconds=1)
    assert cat.take_source_tokens("pacs", 5, rate=10, burst=10, now=later) == pytest.approx(0.5)
    # long idle: refilled to the burst, no more
    idle = later + timedelta(hours=1)
    assert cat.take_source_tokens("pacs", 10, rate=10, burst=10, now=idle) == 0
    assert cat.take_source_tokens("pacs", 1, rate=10, burst=10, now=idle) == pytest.approx(0.1)
    assert cat.source_bucket("pacs").taken == 36


@pytest.mark.peers
def test_a_pull_under_a_rate_cap_takes_every_instance_from_the_bucket(
    tmp_path, pacs, ports, corpus
):
    source = Source(
        name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, max_rate=5000
    )
    settings = Settings(
        home=tmp_path, sources=[source], ae_title="NODEA", port=ports["NODEA"], fsync=False
    )
    gw = Gateway(settings)
    approved(gw, "paced", [st.accession for st in corpus.studies])
    report = gw.pull("paced")
    assert report.ok
    assert gw.catalog.source_bucket("pacs").taken == len(corpus.files)  # a series at a time
    every_instance_once(gw, "paced", corpus)


@pytest.mark.peers
def test_nodes_taking_from_one_bucket_on_postgresql_lose_no_take(pg_server):
    """Eight threads over two catalogs take 20 each at the same instant: the bucket has paid
    for all 160 (no update lost between nodes)."""
    import threading

    from storage.catalog import Catalog

    url = pg_server.create_database("buckets")
    nodes = [Catalog(url), Catalog(url)]
    now = utcnow()
    start = threading.Barrier(8)

    def take(i: int) -> None:
        start.wait()
        for _ in range(20):
            nodes[i % 2].take_source_tokens("pacs", 1, rate=10, burst=10, now=now)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    row = nodes[0].source_bucket("pacs")
    assert row.taken == 160 and row.tokens == pytest.approx(10 - 160)
    for c in nodes:
        c.dispose()


# -- out of resources ---------------------------------------------------------------------------


def test_a_source_out_of_resources_is_asked_again_after_a_longer_wait(monkeypatch, tmp_path):
    """A C-MOVE answered 0xA702 is asked again after busy_backoff_s, doubling; other answers
    are handed to the pull as they are. (Orthanc does not answer 0xA702 on demand: a stand-in
    retriever answers here; the waits are what the guard was told to sleep, not a clock.)"""
    from gateway.pull import guard
    from gateway.pull.source import RetrieveResult

    class Busy:
        name, protocol, max_concurrent = "pacs", "move", 1

        def __init__(self, answers: list[int]) -> None:
            self.answers, self.calls = answers, 0

        def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
            self.calls += 1
            return RetrieveResult(status=self.answers.pop(0), completed=1)

        def echo(self) -> None:
            pass

    catalog = Gateway(Settings(home=tmp_path)).catalog
    slept: list[float] = []
    here, real_sleep = threading.get_ident(), time.sleep

    def sleep(s: float) -> None:  # time.sleep is process-wide: other threads keep their clock
        if threading.get_ident() == here:
            slept.append(s)
        else:
            real_sleep(s)

    monkeypatch.setattr(guard.time, "sleep", sleep)
    src = Source(busy_backoff_s=5, busy_retries=3)
    inner = Busy([0xA702, 0xA700, 0x0000])
    result = guard.Guarded(inner, guard.Breaker(src, inner.echo, catalog), None).retrieve("1", "2")
    assert result.status == 0 and inner.calls == 3 and slept == [5, 10]
    # at most busy_retries more: then the pull sees the failure (and counts an attempt)
    inner = Busy([0xA702] * 5)
    result = guard.Guarded(inner, guard.Breaker(src, inner.echo, catalog), None).retrieve("1", "2")
    assert result.status == 0xA702 and inner.calls == 4
    # control: another failure is not waited for
    slept.clear()
    inner = Busy([0xC000])
    result = guard.Guarded(inner, guard.Breaker(src, inner.echo, catalog), None).retrieve("1", "2")
    assert result.status == 0xC000 and inner.calls == 1 and slept == []
