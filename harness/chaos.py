"""The faults of issue 19 (point 6), each played against real peers on loopback: Orthanc behind
a TCP proxy (`harness.tcpproxy`: it drops, cuts, throttles), SeaweedFS S3 behind another,
PostgreSQL restarted, `sphere` processes SIGKILLed. A scenario pulls a cohort through its fault
and measures what the table of `make chaos` shows: instances expected, stored (distinct, read
from the store) and duplicated, and the seconds from the end of the fault until everything is
stored. What went wrong besides (a series left pending, "unexpected X", a missing `pull.end`
row, a half series visible) is listed in `problems`: the tests (tests/test_chaos.py) run the
same scenarios, shorter (`quick`), and assert there are none.

`python -m harness.chaos [NAME ...]` runs them (all by default) and prints the table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from core import access, users
from core.settings import JobOptions, S3Options, Settings, Source
from gateway.api import Gateway
from harness.busypacs import BusyPacs
from harness.localpacs import LocalOrthanc, free_port
from harness.postgres import PgServer
from harness.seaweed import SeaweedS3
from harness.synthetic import SyntheticCorpus, generate
from harness.tcpproxy import CountingProxy
from storage.catalog import IndexedInstance
from storage.series import SeriesReader, unreadable

SPHERE = [sys.executable, "-m", "gateway.cli"]
NODES = ("NODEA", "NODEB")
SOP_UID = "00080018"


@dataclass
class Outcome:
    """One row of the table."""

    fault: str
    expected: int
    stored: int = 0
    duplicated: int = 0
    recover_s: float | None = None  # from the end of the fault until all is stored
    problems: list[str] = field(default_factory=list)

    def row(self) -> str:
        rec = "-" if self.recover_s is None else f"{self.recover_s:.1f}"
        ok = "ok" if not self.problems else "; ".join(self.problems)
        return (
            f"{self.fault:<24} {self.expected:>8} {self.stored:>7} {self.duplicated:>10} "
            f"{rec:>10}  {ok}"
        )


HEADER = f"{'fault':<24} {'expected':>8} {'stored':>7} {'duplicated':>10} {'recover s':>10}  "


@dataclass
class Lab:
    """The peers the scenarios share: a corpus in an Orthanc that knows both nodes' SCPs
    (their AE titles and ports), PostgreSQL and S3 started when first asked for."""

    root: Path
    corpus: SyntheticCorpus
    pacs: LocalOrthanc
    ports: dict[str, int]
    pg: PgServer | None = None
    s3: SeaweedS3 | None = None
    _n: int = 0

    @classmethod
    @contextmanager
    def up(
        cls, root: Path, *, patients: int = 3, slices: int = 24, s3: SeaweedS3 | None = None
    ) -> Iterator[Lab]:
        """Start the corpus' Orthanc (S3, PostgreSQL: when asked for; `s3`: one running)."""
        corpus = generate(root / "corpus", n_patients=patients, slices=slices, size=64, seed=19)
        ports = {ae: free_port() for ae in NODES}
        modalities = {ae: (ae, "127.0.0.1", port) for ae, port in ports.items()}
        with LocalOrthanc(root / "orthanc", modalities=modalities) as pacs:
            assert pacs.upload(corpus.files) == len(corpus.files)
            lab = cls(root, corpus, pacs, ports, s3=s3)
            try:
                yield lab
            finally:
                if lab.s3 is not None and lab.s3 is not s3:
                    lab.s3.stop()
                if lab.pg is not None:
                    lab.pg.close()

    def postgres(self) -> PgServer:
        if self.pg is None:
            self.pg = PgServer().start()
        return self.pg

    def s3_server(self) -> SeaweedS3:
        if self.s3 is None:
            self.s3 = SeaweedS3(self.root / "seaweed").start()
        return self.s3

    def home(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{self._n:02d}-{name}"


@dataclass
class Site:
    """One scenario's sphere: its settings (the source behind `proxy`), a gateway on them, the
    `sphere` CLI's environment (a data manager's token) and the project, approved."""

    gw: Gateway
    env: dict[str, str]
    proxy: CountingProxy
    project: str = "chaos"

    @property
    def project_id(self) -> int:
        return self.gw.core.project(self.project).id

    def close(self) -> None:
        self.proxy.close()
        self.gw.core.close()


def site(
    lab: Lab,
    name: str,
    *,
    source: dict[str, Any] | None = None,
    upstream: int | None = None,
    **settings: Any,
) -> Site:
    """A sphere home for one scenario, pulling `lab.pacs` (or the peer at port `upstream`)
    through a proxy of its own."""
    proxy = CountingProxy(upstream or lab.pacs.dicom_port)
    src = {
        "name": "pacs",
        "ae_title": lab.pacs.aet,
        "host": "127.0.0.1",
        "port": proxy.port,
        "probe_s": 0.3,
        **(source or {}),
    }
    base: dict[str, Any] = {
        "home": lab.home(name),
        "ae_title": NODES[0],
        "port": lab.ports[NODES[0]],
        "sources": [Source(**src)],
        "max_associations": 1,
        "fsync": False,
        "backoff_s": 0.1,
        "timeout_s": 10,
        "jobs": JobOptions(lease_s=3, beat_s=0.3, poll_s=0.2, wait_s=0.5),
    }
    base.update(settings)
    gw = Gateway(Settings(**base))
    name_ = "chaos"
    today = date.today()
    gw.create_project(name_, title="chaos")
    gw.approve(
        name_,
        committee_ref="CHAOS-1",
        approved_on=today - timedelta(days=1),
        expires_on=today + timedelta(days=30),
    )
    gw.add_cohort(name_, "accession", [st.accession for st in lab.corpus.studies])
    token = users.add(gw.core, "dan")
    gw.catalog.add_user_role(gw.catalog.user("dan").id, access.DATA_MANAGER, "chaos")
    env = {**os.environ, **_environment(gw.settings), "SPHERE_TOKEN": token}
    return Site(gw, env, proxy)


def _environment(s: Settings) -> dict[str, str]:
    """The settings as `SPHERE_*` variables, for `sphere` processes."""
    env = {
        "SPHERE_HOME": str(s.home),
        "SPHERE_AE_TITLE": s.ae_title,
        "SPHERE_PORT": str(s.port),
        "SPHERE_SOURCES": json.dumps([src.model_dump(mode="json") for src in s.sources]),
        "SPHERE_MAX_ASSOCIATIONS": str(s.max_associations),
        "SPHERE_FSYNC": "true" if s.fsync else "false",
        "SPHERE_BACKOFF_S": str(s.backoff_s),
        "SPHERE_RETRIES": str(s.retries),
        "SPHERE_TIMEOUT_S": str(s.timeout_s),
        "SPHERE_STORE_WAIT_S": str(s.store_wait_s),
        "SPHERE_JOBS": s.jobs.model_dump_json(),
    }
    if s.catalog_url:
        env["SPHERE_CATALOG_URL"] = s.catalog_url
    if s.storage_url:
        env["SPHERE_STORAGE_URL"] = s.storage_url
        env["SPHERE_S3"] = s.s3.model_dump_json()
    return env


# -- what a scenario checks ---------------------------------------------------------------------


def count(out: Outcome, st: Site) -> Outcome:
    """Stored and duplicated instances, read from the store (each complete series' headers);
    the catalog's word checked against it: every series complete, none pending, the index
    (what QIDO-RS serves) holding each stored instance once."""
    gw = st.gw
    sops: list[str] = []
    rows = gw.catalog.series(st.project_id)
    for r in rows:
        if r.status != "complete":
            continue
        headers = SeriesReader(gw.store, r.storage_key).headers()
        sops += [h[SOP_UID]["Value"][0] for h in headers]
        if len(headers) != r.stored:
            out.problems.append(f"a series holds {len(headers)}, the catalog says {r.stored}")
    out.stored, out.duplicated = len(set(sops)), len(sops) - len(set(sops))
    states = sorted({r.status for r in rows if r.status != "complete"})
    if states:
        out.problems.append(f"series left {', '.join(states)}")
    with gw.catalog.session() as s:
        indexed = s.query(IndexedInstance).filter(IndexedInstance.project_id == st.project_id)
        if indexed.count() != out.stored:
            out.problems.append(f"the index holds {indexed.count()} instances")
    if out.stored != out.expected:
        out.problems.append(f"{out.expected - out.stored} instances missing")
    return out


def ended_cleanly(out: Outcome, st: Site, proc: subprocess.CompletedProcess[str], rc: int) -> None:
    """A failed `sphere pull`: exit `rc`, one `error:` line (never "unexpected X"), the summary
    on stdout when series were tried, and the `pull.end` audit row."""
    said = proc.stdout + proc.stderr
    if proc.returncode != rc:
        out.problems.append(f"exit {proc.returncode}, not {rc}")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    if rc == 2 and len(errors) != 1:
        out.problems.append(f"{len(errors)} error lines")
    if "unexpected" in said or "Traceback" in said:
        out.problems.append("an unexpected error: " + said.strip().splitlines()[-1][:120])
    ends = [e for e in st.gw.catalog.audit_trail(st.project) if e.action == "pull.end"]
    if not ends or ends[-1].outcome != "error":
        out.problems.append("no pull.end row saying error")


def pull_cli(st: Site, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SPHERE, "pull", st.project], capture_output=True, text=True, env=st.env, timeout=timeout_s
    )


def pull_here(out: Outcome, st: Site, what: str = "the pull") -> None:
    """A pull in this process (no process to start: the faster), which must end complete."""
    try:
        report = st.gw.pull(st.project)
    except Exception as e:  # noqa: BLE001 - the table says what
        out.problems.append(f"{what}: {type(e).__name__}: {e}")
        return
    if not report.ok:
        out.problems.append(f"{what}: {report.count('failed')} series failed")


class Pulling:
    """`pull_here` in a thread, for a fault to be played while it runs."""

    def __init__(self, out: Outcome, st: Site) -> None:
        self._t = threading.Thread(target=pull_here, args=(out, st), daemon=True)
        self._t.start()

    def poll(self) -> int | None:
        return None if self._t.is_alive() else 0

    def finish(self, timeout_s: float = 300) -> None:
        self._t.join(timeout_s)
        if self._t.is_alive():
            raise TimeoutError(f"the pull did not end in {timeout_s:.0f} s")


def pull_popen(st: Site) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*SPHERE, "pull", st.project],
        env=st.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.05)


def n_complete(st: Site) -> int:
    return len(st.gw.catalog.series(st.project_id, status="complete"))


# -- the scenarios ------------------------------------------------------------------------------


def pacs_down_at_start(lab: Lab, quick: bool) -> Outcome:
    """The PACS answers nothing when the pull starts: one line, exit 2, the `pull.end` row;
    back, the pull is run again and stores everything."""
    out = Outcome("PACS down at start", lab.corpus.n_instances)
    st = site(lab, "down-at-start")
    try:
        st.proxy.drop()
        ended_cleanly(out, st, pull_cli(st), rc=2)
        st.proxy.pass_again()
        t0 = time.monotonic()
        pull_here(out, st, "the re-run")
        out.recover_s = time.monotonic() - t0
        return count(out, st)
    finally:
        st.close()


def pacs_down_mid_pull(lab: Lab, quick: bool) -> Outcome:
    """The PACS stops answering after the first series, for longer than the breaker waits
    (`give_up_s`): the pull stops then, not after every series waited as long on each of its
    retries, with the summary (series failed, none pending), one line, exit 2, the `pull.end`
    row; back, the re-run completes."""
    out = Outcome("PACS down mid-pull", lab.corpus.n_instances)
    st = site(lab, "down-mid-pull", source={"give_up_s": 1.5 if quick else 5, "max_rate": 40})
    try:
        proc = pull_popen(st)
        wait_for(lambda: n_complete(st) >= 1 or proc.poll() is not None, "a first series")
        st.proxy.drop()
        stdout, stderr = proc.communicate(timeout=300)
        ended = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        ended_cleanly(out, st, ended, rc=2)
        if "failed" not in stdout:
            out.problems.append("no summary of the failed series")
        st.proxy.pass_again()
        t0 = time.monotonic()
        pull_here(out, st, "the re-run")
        out.recover_s = time.monotonic() - t0
        return count(out, st)
    finally:
        st.close()


def pacs_outage(lab: Lab, quick: bool) -> Outcome:
    """The PACS stops answering for a few seconds mid-pull: the breaker pauses the work, the
    pull resumes by itself when it answers and ends complete."""
    out = Outcome("PACS outage (breaker)", lab.corpus.n_instances)
    st = site(lab, "outage", source={"max_rate": 40})
    try:
        proc = Pulling(out, st)
        wait_for(lambda: n_complete(st) >= 1 or proc.poll() is not None, "a first series")
        st.proxy.drop()
        time.sleep(1.5 if quick else 4)
        st.proxy.pass_again()
        t0 = time.monotonic()
        proc.finish()
        out.recover_s = time.monotonic() - t0
        return count(out, st)
    finally:
        st.close()


def association_aborted(lab: Lab, quick: bool) -> Outcome:
    """The association to the PACS is aborted mid-retrieve (the proxy cuts it), twice: the
    series is asked again, every instance stored once."""
    out = Outcome("association aborted", lab.corpus.n_instances)
    st = site(lab, "aborted", source={"max_rate": 60})
    expected = st.gw.settings.spool_dir / st.project / "expected"  # a series' marker: retrieving
    try:
        proc = Pulling(out, st)
        cuts = 0
        for _ in range(2):
            # mid-retrieve: the association open and instances arriving in the spool
            wait_for(
                lambda: (st.proxy.open and any(expected.glob("*.json"))) or proc.poll() is not None,
                "a retrieve under way",
            )
            cuts += st.proxy.cut()
            t0 = time.monotonic()
            time.sleep(0.5)
        proc.finish()
        out.recover_s = time.monotonic() - t0
        if not cuts:
            out.problems.append("nothing was cut")
        return count(out, st)
    finally:
        st.close()


def slow_pacs(lab: Lab, quick: bool) -> Outcome:
    """A slow PACS: C-GET (the instances come through the proxy) at 200 KB/s. Nothing times
    out, nothing fails, nothing is stored twice."""
    out = Outcome("slow PACS (200 KB/s)", lab.corpus.n_instances)
    st = site(lab, "slow", source={"protocol": "get"})
    try:
        st.proxy.throttle(200_000)
        pull_here(out, st)
        return count(out, st)
    finally:
        st.close()


def out_of_resources(lab: Lab, quick: bool, busy_retries: int = 3) -> Outcome:
    """The PACS answers the first three C-MOVEs 0xA702 (out of resources): each is asked again
    after a longer wait (busy_backoff_s, doubling), not spending the series' own retries (none
    here); every series completes."""
    out = Outcome("A702 out of resources", lab.corpus.n_instances)
    dests = {ae: ("127.0.0.1", port) for ae, port in lab.ports.items()}
    with BusyPacs(lab.pacs.aet, lab.pacs.dicom_port, dests, busy=3) as busy:
        retry = {"busy_backoff_s": 0.2, "busy_retries": busy_retries}
        st = site(
            lab, "a702", source={"ae_title": busy.aet, **retry}, upstream=busy.port, retries=0
        )
        try:
            pull_here(out, st)
            out.recover_s = time.monotonic() - busy.last_refused
            if busy.refused != 3 or not busy.relayed:
                out.problems.append(f"{busy.refused} refused, {busy.relayed} relayed")
            return count(out, st)
        finally:
            st.close()


def store_down_mid_commit(lab: Lab, quick: bool, store_wait_s: float = 60) -> Outcome:
    """The object store (S3) stops answering after the first series is stored: the commits
    wait (up to `store_wait_s`), the instances kept in the spool, and go on when it is back;
    the pull completes."""
    out = Outcome("object store down", lab.corpus.n_instances)
    s3 = lab.s3_server()
    store = CountingProxy(s3.ports["s3"])
    opts = S3Options(
        endpoint=f"http://127.0.0.1:{store.port}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
        allow_http=True,
    )
    url = s3.url(bucket=s3.new_bucket(), prefix="research")
    st = site(
        lab,
        "store-down",
        source={"max_rate": 60},
        storage_url=url,
        s3=opts,
        timeout_s=5,
        store_wait_s=store_wait_s,
    )
    try:
        proc = Pulling(out, st)
        wait_for(lambda: n_complete(st) >= 1 or proc.poll() is not None, "a first series")
        store.drop()
        time.sleep(2 if quick else 5)
        store.pass_again()
        t0 = time.monotonic()
        proc.finish()
        out.recover_s = time.monotonic() - t0
        if not store.dropped:
            out.problems.append("the store was not asked while it was down")
        return count(out, st)
    finally:
        st.close()
        store.close()


@contextmanager
def worker(st: Site, ae: str, lab: Lab) -> Iterator[subprocess.Popen[str]]:
    """`sphere worker` as node `ae` (its own SCP port), in a process group of its own."""
    env = {**st.env, "SPHERE_AE_TITLE": ae, "SPHERE_PORT": str(lab.ports[ae])}
    with open(st.gw.settings.home / f"worker-{ae}.log", "a") as log:  # what it said, to read
        proc = subprocess.Popen(
            [*SPHERE, "worker"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@contextmanager
def node_here(st: Site) -> Iterator[Any]:
    """A job node (`sphere worker`'s) in a thread of this process: no process to start."""
    from gateway import jobs

    node = jobs.Node(st.gw.settings, name=f"{st.gw.settings.ae_title}@here")
    t = threading.Thread(target=node.run, daemon=True)
    t.start()
    try:
        yield node
    finally:
        node.stop()
        t.join(120)


class HalfSeriesWatch:
    """While it runs, looks again and again for a half series where a reader would see one:
    a series in the index (what QIDO-RS serves) with fewer or more instances than the PACS
    holds of it, or one the catalog calls complete that does not read back whole."""

    def __init__(self, st: Site) -> None:
        self.st = st
        self.seen: list[str] = []
        self.looks = 0
        self._read: set[str] = set()  # complete series read back already
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> HalfSeriesWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.look()
            except Exception:  # noqa: BLE001 - the catalog restarting: look again
                continue

    def look(self) -> None:
        from sqlalchemy import func, select

        cat, store = self.st.gw.catalog, self.st.gw.store
        rows = {r.series_uid: r for r in cat.series(self.st.project_id)}
        with cat.session() as s:
            q = (
                select(IndexedInstance.series_uid, func.count())
                .where(IndexedInstance.project_id == self.st.project_id)
                .group_by(IndexedInstance.series_uid)
            )
            indexed = dict(s.execute(q).all())
        self.looks += 1
        for uid, n in indexed.items():
            expected = rows[uid].expected if uid in rows else None
            if n != expected:
                self.seen.append(f"a series indexed with {n} instances of {expected}")
        for uid, r in rows.items():
            if r.status == "complete" and uid not in self._read:
                problem = unreadable(store, r.storage_key, r.stored)
                if problem:
                    self.seen.append(f"a complete series does not read back: {problem}")
                self._read.add(uid)


def node_killed(lab: Lab, quick: bool) -> Outcome:
    """A node SIGKILLed mid-job five times in a row (its SCP workers with it), another node
    started each time: the job is taken up again each time and ends done; every instance
    stored once; no half series ever visible."""
    kills = 2 if quick else 5
    out = Outcome(f"node SIGKILLed x{kills}", lab.corpus.n_instances)
    url = lab.postgres().create_database(f"killed{lab._n}")
    st = site(lab, "killed", source={"max_rate": 10 if quick else 8}, catalog_url=url)
    from gateway import jobs

    try:
        job = jobs.submit(st.gw.core, "pull", st.project, user=st.gw.catalog.user("dan"))
        got = 0
        t0 = time.monotonic()
        with HalfSeriesWatch(st) as watch:
            for i in range(kills):
                with worker(st, NODES[i % 2], lab) as node:
                    wait_for(
                        lambda got=got: _instances(st, job.id) > got or _ended(st, job.id),
                        "the node to receive",
                    )
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait(30)
                    t0 = time.monotonic()
                got = _instances(st, job.id)
                if _ended(st, job.id):
                    out.problems.append(f"the job ended before kill {i + 1}")
                    break
            with worker(st, NODES[kills % 2], lab):
                wait_for(lambda: _ended(st, job.id), "the job's end", 300)
        out.recover_s = time.monotonic() - t0
        row = st.gw.catalog.job(job.id)
        if row.state != "done":
            out.problems.append(f"job {row.state}: {row.outcome}")
        if row.attempts != kills + 1:
            out.problems.append(f"{row.attempts} leases for {kills + 1} nodes")
        out.problems += sorted(set(watch.seen))
        return count(out, st)
    finally:
        st.close()


def _instances(st: Site, job_id: int) -> int:
    return int((st.gw.catalog.job(job_id).progress or {}).get("instances", 0))


def _ended(st: Site, job_id: int) -> bool:
    return st.gw.catalog.job(job_id).state in ("done", "failed", "cancelled")


def postgres_restarted(lab: Lab, quick: bool) -> Outcome:
    """PostgreSQL (the catalog) restarted mid-job, down a moment: the job and every series
    finish, none left pending."""
    out = Outcome("PostgreSQL restarted", lab.corpus.n_instances)
    pg = lab.postgres()
    url = pg.create_database(f"restarted{lab._n}")
    st = site(lab, "pg-restart", source={"max_rate": 40}, catalog_url=url)
    from gateway import jobs

    try:
        job = jobs.submit(st.gw.core, "pull", st.project, user=st.gw.catalog.user("dan"))
        with HalfSeriesWatch(st) as watch, node_here(st):
            wait_for(lambda: n_complete(st) >= 1 or _ended(st, job.id), "a first series")
            pg.restart(down_s=1 if quick else 3)
            t0 = time.monotonic()
            wait_for(lambda: _ended_quietly(st, job.id), "the job's end", 300)
            out.recover_s = time.monotonic() - t0
        row = st.gw.catalog.job(job.id)
        if row.state != "done":
            out.problems.append(f"job {row.state}: {row.outcome}")
        out.problems += sorted(set(watch.seen))
        return count(out, st)
    finally:
        st.close()


def _ended_quietly(st: Site, job_id: int) -> bool:
    try:
        return _ended(st, job_id)
    except Exception:  # noqa: BLE001 - the catalog is restarting
        return False


FULL_SPOOL = """
set -e
mount -t tmpfs -o size=200k tmpfs "$SPOOL"
"$PYTHON" -m gateway.cli worker &
while [ ! -e "$ROOM" ]; do sleep 0.1; done
mount -o remount,size=64m "$SPOOL"
wait
"""


def spool_disk_full(lab: Lab, quick: bool) -> Outcome:
    """The spool's disk full mid-job (a 200 KB tmpfs, in a mount namespace of its own): the
    receivers answer 0xA700, the pull stops cleanly (no `.tmp` left, no series pending, the
    `pull.end` row) and the job waits; given room, it resumes and completes."""
    out = Outcome("spool disk full", lab.corpus.n_instances)
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        out.problems.append("skipped: no mount namespaces here (unshare -rm)")
        return out
    st = site(lab, "spool-full")
    spool, room = st.gw.settings.spool_dir, st.gw.settings.home / "room"
    spool.mkdir(parents=True, exist_ok=True)
    env = {**st.env, "SPOOL": str(spool), "ROOM": str(room), "PYTHON": sys.executable}
    env["SPHERE_SPOOL_MIN_FREE_MB"] = "0.05"
    from gateway import jobs

    job = jobs.submit(st.gw.core, "pull", st.project, user=st.gw.catalog.user("dan"))
    log = open(st.gw.settings.home / "worker.log", "a")  # noqa: SIM115 - closed below
    node = subprocess.Popen(
        ["unshare", "-rm", "sh", "-c", FULL_SPOOL],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    try:
        wait_for(lambda: st.gw.catalog.job(job.id).state == "waiting", "the job to wait")
        row = st.gw.catalog.job(job.id)
        if "no space left" not in (row.outcome or ""):
            out.problems.append(f"the job waits for: {row.outcome}")
        ends = [e for e in st.gw.catalog.audit_trail(st.project) if e.action == "pull.end"]
        if not ends or "no space left" not in ends[-1].detail:
            out.problems.append("no pull.end row saying the disk is full")
        leftover = [str(p) for p in spool.rglob("*.tmp")]
        if leftover:
            out.problems.append(f"{len(leftover)} .tmp files left")
        room.touch()
        t0 = time.monotonic()
        wait_for(lambda: _ended(st, job.id), "the job's end", 300)
        out.recover_s = time.monotonic() - t0
        row = st.gw.catalog.job(job.id)
        if row.state != "done":
            out.problems.append(f"job {row.state}: {row.outcome}")
        return count(out, st)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(10)
        log.close()
        st.close()


SCENARIOS: dict[str, Callable[[Lab, bool], Outcome]] = {
    "pacs-down-at-start": pacs_down_at_start,
    "pacs-down-mid-pull": pacs_down_mid_pull,
    "pacs-outage": pacs_outage,
    "association-aborted": association_aborted,
    "out-of-resources": out_of_resources,
    "slow-pacs": slow_pacs,
    "store-down-mid-commit": store_down_mid_commit,
    "spool-disk-full": spool_disk_full,
    "node-killed": node_killed,
    "postgres-restarted": postgres_restarted,
}


def run(names: list[str], root: Path, quick: bool = False) -> list[Outcome]:
    """Run the scenarios named (all: empty), printing the table as they end."""
    chosen = names or list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        raise SystemExit(f"no scenario {', '.join(unknown)}; there are: {', '.join(SCENARIOS)}")
    outcomes = []
    with Lab.up(root) as lab:
        print(HEADER, flush=True)
        for name in chosen:
            t0 = time.monotonic()
            try:
                o = SCENARIOS[name](lab, quick)
            except Exception as e:  # noqa: BLE001 - the table says which one broke
                o = Outcome(name, lab.corpus.n_instances, problems=[f"{type(e).__name__}: {e}"])
            outcomes.append(o)
            print(o.row(), f"({time.monotonic() - t0:.0f} s)", flush=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"scenarios (default all): {', '.join(SCENARIOS)}")
    parser.add_argument("--quick", action="store_true", help="the tests' shorter versions")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sphere-chaos-") as tmp:
        outcomes = run(args.names, Path(tmp), args.quick)
    return 1 if any(o.problems for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
