"""sphere as a service (issue 19, points 8 and 9): figures printed, nothing asserted.

- serve: one node (`sphere serve --workers 2`, which runs its job node beside the web) serves
  a CT series' frames to 16 clients at once, idle and then while it pulls a cohort from Orthanc
  as a job: request latency p50/p99 and frames/s in each phase, the pull's instances/s, and the
  CPU seconds each kind of process spent meanwhile (what the pull takes from serving);
- nodes: the same cohort pulled by one `sphere worker` node, then by two sharing a PostgreSQL
  catalog (two projects, one job each), from one Orthanc behind a counting proxy, the source
  held to `cluster_limit` associations: instances/s of each and their ratio, and the most
  associations the proxy ever saw open at once, against the limit;
- queue: 10,000 queued jobs in the catalog (SQLite, PostgreSQL): the time to lease one.

The machine's cores are shared by Orthanc, the servers, the clients and the nodes, so the
figures compare phases of one run, not capacities.

    .venv/bin/python benchmarks/bench_service.py [--only serve nodes queue] [--patients 6]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import psutil

from core import users
from core.settings import PacsPeer, Settings, Source
from dicom.json_model import first
from gateway import jobs
from gateway.api import Gateway
from harness.localpacs import LocalOrthanc, free_port
from harness.postgres import PgServer
from harness.serve import SERVER, server_token, settings_env, sphere_worker, start_sphere
from harness.synthetic import generate
from storage.catalog import Catalog, Job
from tests.tcp_proxy import CountingProxy

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'


def approve(gw: Gateway, project: str, accessions: list[str]) -> None:
    gw.create_project(project, title="service benchmark")
    today = date.today()
    gw.approve(
        project,
        committee_ref="BENCH",
        approved_on=today - timedelta(days=1),
        expires_on=today + timedelta(days=30),
    )
    gw.add_cohort(project, "accession", accessions)


def wait(check, what: str, timeout_s: float = 900.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)


# -- serving while pulling ----------------------------------------------------------------------


class Clients:
    """`n` clients, each a thread on its own keep-alive connection, fetching frames in a loop;
    each request's latency is kept with the phase it fell in."""

    def __init__(self, port: int, path: str, sops: list[str], token: str, n: int) -> None:
        self.port, self.path, self.sops, self.n = port, path, sops, n
        self.headers = {"Authorization": f"Bearer {token}", "Accept": FRAME_ACCEPT}
        self.phase = ""
        self.seen: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        k = i * 7
        while not self._stop.is_set():
            sop = self.sops[k % len(self.sops)]
            k += 1
            t0 = time.perf_counter()
            conn.request("GET", f"{self.path}/instances/{sop}/frames/1", headers=self.headers)
            r = conn.getresponse()
            r.read()
            dt = time.perf_counter() - t0
            if r.status != 200:
                raise SystemExit(f"frame answered {r.status}")
            phase = self.phase
            if phase:
                with self._lock:
                    self.seen.setdefault(phase, []).append(dt)
        conn.close()

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def measure(self, phase: str) -> None:
        self.phase = phase

    def summary(self, phase: str, seconds: float) -> str:
        lat = sorted(self.seen.get(phase, []))
        if not lat:
            return f"{phase}: no request finished"
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        return (
            f"{phase:>12}: {len(lat) / seconds:6.0f} frames/s   p50 {p50 * 1000:6.1f} ms   "
            f"p99 {p99 * 1000:6.1f} ms   ({len(lat)} requests in {seconds:.1f} s)"
        )

    def p99(self, phase: str) -> float:
        lat = sorted(self.seen.get(phase, []))
        return lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")


def role(p: psutil.Process, server_pid: int, orthanc_pid: int) -> str:
    """What a process is to the benchmark, from its command line and its parents'."""
    if p.pid == orthanc_pid:
        return "orthanc"
    if p.pid == os.getpid():
        return "clients"
    if p.pid == server_pid:
        return "web (main)"
    chain = [" ".join(q.cmdline()) for q in [p, *p.parents()]]
    if "gateway.cli worker" in chain[0]:
        return "job node (plan, verify, commit)"
    if any("gateway.cli worker" in c for c in chain[1:]):
        return "receive workers (SCP, de-identify)"
    return "web workers"


class CpuWatch:
    """CPU seconds of the server's processes (and Orthanc, and this one) from `start()` on,
    sampled twice a second so that processes which end meanwhile still count."""

    def __init__(self, server_pid: int, orthanc_pid: int) -> None:
        self.pids = server_pid, orthanc_pid
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[int, tuple[str, float]]:
        server, orthanc = self.pids
        procs = [psutil.Process(server), psutil.Process(orthanc), psutil.Process()]
        procs += psutil.Process(server).children(recursive=True)
        out = {}
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = (role(p, server, orthanc), t.user + t.system)
            except psutil.Error:
                continue
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.last.update(self.sample())

    def start(self) -> None:
        self.first = self.sample()
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.last.update(self.sample())
        spent: dict[str, float] = {}
        for pid, (r, t) in self.last.items():
            spent[r] = spent.get(r, 0.0) + t - self.first.get(pid, (r, 0.0))[1]
        return spent


def serve_bench(work: Path, args: argparse.Namespace) -> None:
    served = generate(work / "served", n_patients=1, series_per_study=1, slices=120, size=512)
    cohort = generate(
        work / "cohort", n_patients=args.patients, slices=args.slices, size=512, seed=3
    )
    scp_port = free_port()
    mods = {"SPHERE": ("SPHERE", "127.0.0.1", scp_port)}
    with LocalOrthanc(work / "orthanc", modalities=mods) as pacs:
        pacs.upload(served.files + cohort.files)
        os.environ.update(
            {
                "SPHERE_PORT": str(scp_port),
                "SPHERE_PACS__AE_TITLE": pacs.aet,
                "SPHERE_PACS__PORT": str(pacs.dicom_port),
                "SPHERE_FSYNC": "false",
                "SPHERE_JOBS__POLL_S": "0.2",
            }
        )
        settings = Settings(
            home=work / "home",
            port=scp_port,
            pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port),
            fsync=False,
        )
        gw = Gateway(settings)
        approve(gw, "served", [st.accession for st in served.studies])
        gw.pull("served")
        token = users.add(gw.core, "reader")
        users.grant(gw.core, "served", "reader", "viewer")
        study = served.studies[0]
        pseudo_study = gw.core.keys("served").uid(study.study_uid)
        pseudo_series = gw.core.keys("served").uid(study.series[0].series_uid)
        path = f"/projects/served/dicom-web/studies/{pseudo_study}/series/{pseudo_series}"
        print(
            f"serve: {args.clients} clients fetching the frames of a 120-slice 512x512 series "
            f"from `sphere serve --workers {args.workers}`, idle for {args.idle_s:.0f} s, then "
            f"while its job node pulls {cohort.n_instances} instances; the job node at each "
            f"SPHERE_JOBS__NICE of {args.nice}, {args.rounds} round(s)"
        )
        ratios: dict[int, list[float]] = {}
        for r in range(args.rounds):
            for nice in args.nice:
                project = f"pulled-{r}-{nice}"
                approve(gw, project, [st.accession for st in cohort.studies])
                os.environ["SPHERE_JOBS__NICE"] = str(nice)
                print(f"round {r + 1}, nice {nice}:")
                ratio = serve_round(gw, settings, args, pacs, path, token, project)
                ratios.setdefault(nice, []).append(ratio)
        for nice, rs in ratios.items():
            print(
                f"nice {nice:>2}: p99 under pull / idle = "
                f"{', '.join(f'{x:.2f}' for x in rs)} (median {statistics.median(rs):.2f})"
            )
        gw.core.close()


def serve_round(
    gw: Gateway,
    settings: Settings,
    args: argparse.Namespace,
    pacs: LocalOrthanc,
    path: str,
    token: str,
    project: str,
) -> float:
    """One server started, idle then pulling `project` as a job; returns p99 pulling / idle."""
    port = free_port()
    assert pacs.process is not None
    orthanc = pacs.process.pid
    server = start_sphere(settings, port, workers=args.workers)
    try:
        sops = frame_sops(port, path, token)
        with Clients(port, path, sops, token, args.clients) as clients:
            time.sleep(2)  # connected, warm
            cpu = CpuWatch(server.pid, orthanc)
            cpu.start()
            t0 = time.perf_counter()
            clients.measure("idle")
            time.sleep(args.idle_s)
            idle_s = time.perf_counter() - t0
            idle_cpu = cpu.stop()
            cpu = CpuWatch(server.pid, orthanc)
            cpu.start()
            job = jobs.submit(gw.core, "pull", project, user=gw.catalog.user("server"))
            wait(lambda: job_row(gw, job.id).state != "queued", "the job to start")
            t1 = time.perf_counter()
            clients.measure("under pull")
            wait(lambda: ended(gw, [job.id]), "the pull")
            pull_s = time.perf_counter() - t1
            clients.measure("")
            spent = cpu.stop()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    row = job_row(gw, job.id)
    n = row.progress.get("instances") or row.progress.get("total") or 0
    print(clients.summary("idle", idle_s))
    print(clients.summary("under pull", pull_s))
    ratio = clients.p99("under pull") / clients.p99("idle")
    print(
        f"  p99 under pull / idle = {ratio:.2f}; the pull: {row.state}, "
        f"{n / pull_s:.0f} instances/s ({pull_s:.1f} s)"
    )
    print("  CPU, in cores, by process:        idle   pulling")
    for r, sec in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"    {r:<34} {idle_cpu.get(r, 0.0) / idle_s:5.2f}   {sec / pull_s:5.2f}")
    return ratio


# -- one node against two ------------------------------------------------------------------------


def nodes_bench(work: Path, args: argparse.Namespace) -> None:
    cohort = generate(
        work / "cohort", n_patients=args.patients, slices=args.slices, size=512, seed=5
    )
    ports = {"NODEA": free_port(), "NODEB": free_port()}
    mods = {ae: (ae, "127.0.0.1", port) for ae, port in ports.items()}
    projects = ("one", "two")
    print(
        f"nodes: {len(projects)} projects of {cohort.n_instances} instances each, pulled as jobs "
        f"by `sphere worker` nodes on one PostgreSQL catalog, from one Orthanc through a "
        f"counting proxy, the source's cluster_limit {args.limit} (each node's "
        f"SPHERE_MAX_ASSOCIATIONS 2)"
    )
    with PgServer() as pgs, LocalOrthanc(work / "orthanc", modalities=mods) as pacs:
        pacs.upload(cohort.files)
        proxy = CountingProxy(pacs.dicom_port)
        rounds = [(1, None), (2, None)] + ([(2, args.rate)] if args.rate else [])
        rates = {}
        try:
            for k, (n_nodes, rate) in enumerate(rounds):
                source = {
                    "name": "pacs",
                    "ae_title": pacs.aet,
                    "port": proxy.port,
                    "cluster_limit": args.limit,
                    "max_rate": rate,
                }
                url = pgs.create_database(f"nodes{k}")
                settings = Settings(
                    home=work / f"home{k}",
                    catalog_url=url,
                    sources=[Source(**source)],
                    fsync=False,
                )
                gw = Gateway(settings)
                for name in projects:
                    approve(gw, name, [st.accession for st in cohort.studies])
                env = {
                    **os.environ,
                    **settings_env(settings),
                    "SPHERE_CATALOG_URL": url,
                    "SPHERE_TOKEN": server_token(settings),
                    "SPHERE_SOURCES": json.dumps([source]),
                    "SPHERE_MAX_ASSOCIATIONS": "2",
                    "SPHERE_FSYNC": "false",
                    "SPHERE_JOBS__POLL_S": "0.2",
                    "SPHERE_JOBS__BEAT_S": "1",
                }
                with contextlib.ExitStack() as nodes:
                    for ae in list(ports)[:n_nodes]:
                        nodes.enter_context(sphere_worker(env, ae, ports[ae]))
                    time.sleep(3)  # the nodes up and polling
                    proxy.most = proxy.open
                    user = gw.catalog.user(SERVER)
                    t0 = time.perf_counter()
                    ids = [jobs.submit(gw.core, "pull", p, user=user).id for p in projects]
                    wait(lambda g=gw, js=ids: ended(g, js), "the jobs")
                    seconds = time.perf_counter() - t0
                states = [job_row(gw, i).state for i in ids]
                n = len(projects) * cohort.n_instances
                rates[(n_nodes, rate)] = n / seconds
                cap = f", max_rate {rate:.0f}/s" if rate else ""
                print(
                    f"  {n_nodes} node(s){cap}: {n / seconds:6.1f} instances/s ({seconds:.1f} s, "
                    f"jobs {', '.join(states)}); most associations open at once: "
                    f"{proxy.most} (limit {args.limit})"
                )
                gw.core.close()
        finally:
            proxy.close()
    print(f"  two nodes / one node: {rates[(2, None)] / rates[(1, None)]:.2f}")


def job_row(gw: Gateway, job_id: int) -> Job:
    row = gw.catalog.job(job_id)
    assert row is not None
    return row


def ended(gw: Gateway, ids: list[int]) -> bool:
    return all(job_row(gw, i).state in ("done", "failed") for i in ids)


# -- the job queue ------------------------------------------------------------------------------


def queue_bench(work: Path, args: argparse.Namespace) -> None:
    print(f"queue: {args.queued} queued jobs; the time to lease one (the oldest), 20 times")
    with PgServer() as pgs:
        for name, url in (
            ("SQLite", f"sqlite:///{work / 'queue.db'}"),
            ("PostgreSQL", pgs.create_database("queue")),
        ):
            work.mkdir(parents=True, exist_ok=True)
            catalog = Catalog(url)
            with catalog.session() as s:
                s.add_all(
                    Job(kind="pull", project=f"p{i}", params={}, submitted_by="bench")
                    for i in range(args.queued)
                )
            took = []
            for _ in range(20):
                t0 = time.perf_counter()
                job = catalog.lease_job("bench", uuid.uuid4().hex, 60.0)
                took.append(time.perf_counter() - t0)
                assert job is not None
            print(
                f"  {name:<10}: first {took[0] * 1000:6.1f} ms, median of the next 19 "
                f"{statistics.median(took[1:]) * 1000:6.1f} ms"
            )
            catalog.dispose()


def frame_sops(port: int, path: str, token: str) -> list[str]:
    """The series' SOP Instance UIDs, from QIDO-RS."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/dicom+json"}
    conn.request("GET", f"{path}/instances", headers=headers)
    r = conn.getresponse()
    found = json.loads(r.read())
    conn.close()
    return sorted(first(d, "00080018") for d in found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["serve", "nodes", "queue"], default=None)
    ap.add_argument("--patients", type=int, default=4, help="studies of the cohort pulled")
    ap.add_argument("--slices", type=int, default=250, help="slices of its thin series")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="sphere serve --workers")
    ap.add_argument("--idle-s", type=float, default=15.0)
    ap.add_argument("--nice", type=int, nargs="+", default=[0, 10], help="SPHERE_JOBS__NICE")
    ap.add_argument("--rounds", type=int, default=1, help="of serve, each nice in turn")
    ap.add_argument("--limit", type=int, default=2, help="the source's cluster_limit (nodes)")
    ap.add_argument("--rate", type=float, default=None, help="also two nodes under this max_rate")
    ap.add_argument("--queued", type=int, default=10_000, help="jobs queued (queue)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    only = set(args.only or ["serve", "nodes", "queue"])
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sphere-service-"))
    try:
        if "serve" in only:
            serve_bench(work / "serve", args)
        if "nodes" in only:
            nodes_bench(work / "nodes", args)
        if "queue" in only:
            queue_bench(work / "queue", args)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
