"""The bench `harness.chaos` plays its faults on: the peers (`Lab`: a corpus in Orthanc, which
knows two nodes' Storage SCPs; PostgreSQL and S3 when asked for), a sphere home per scenario
(`site`: its source behind a TCP proxy of its own), the ways to pull (the CLI, in this process,
as jobs on nodes) and what is checked after (`count`, `ended_cleanly`, `HalfSeriesWatch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from core import access, users
from core.settings import JobOptions, Settings, Source
from dicom.json_model import first
from gateway.api import Gateway
from harness.localpacs import LocalOrthanc, free_port
from harness.postgres import PgServer
from harness.seaweed import SeaweedS3
from harness.serve import sphere_worker
from harness.synthetic import SyntheticCorpus, generate
from harness.tcpproxy import CountingProxy
from storage.catalog import IndexedInstance, Job
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
            f"{self.fault:<30} {self.expected:>8} {self.stored:>7} {self.duplicated:>10} "
            f"{rec:>10}  {ok}"
        )


HEADER = f"{'fault':<30} {'expected':>8} {'stored':>7} {'duplicated':>10} {'recover s':>10}  "


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

    def __enter__(self) -> Site:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    dan = gw.catalog.user("dan")
    assert dan is not None  # just added
    gw.catalog.add_user_role(dan.id, access.DATA_MANAGER, "chaos")
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
        if r.status != "complete" or not r.storage_key:
            continue
        headers = SeriesReader(gw.store, r.storage_key).headers()
        sops += [first(h, SOP_UID) for h in headers]
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
    """`pull_here` in a thread, for a fault to be played while it runs; `stops`: the pull is
    expected to stop, its error kept for `stopped_cleanly`."""

    def __init__(self, out: Outcome, st: Site, *, stops: bool = False) -> None:
        self.error: BaseException | None = None

        def go() -> None:
            if not stops:
                pull_here(out, st)
                return
            try:
                st.gw.pull(st.project)
            except Exception as e:  # noqa: BLE001 - judged by stopped_cleanly
                self.error = e

        self._t = threading.Thread(target=go, daemon=True)
        self._t.start()

    def poll(self) -> int | None:
        return None if self._t.is_alive() else 0

    def finish(self, timeout_s: float = 300) -> BaseException | None:
        self._t.join(timeout_s)
        if self._t.is_alive():
            raise TimeoutError(f"the pull did not end in {timeout_s:.0f} s")
        return self.error


def stopped_cleanly(out: Outcome, st: Site, error: BaseException | None) -> None:
    """A pull in this process that had to stop: `PullStopped`, one line (never "unexpected
    X"), the summary (its report) with the series failed, the `pull.end` row. (The CLI prints
    that report and line, exit 2: `ended_cleanly` checks it where the CLI is run.)"""
    from gateway.pull.stops import PullStopped

    if not isinstance(error, PullStopped):
        out.problems.append(f"the pull ended with {type(error).__name__ if error else 'no error'}")
        return
    if "\n" in str(error) or "unexpected" in str(error):
        out.problems.append(f"not one line: {str(error)[:120]}")
    if not error.report.count("failed"):
        out.problems.append("no failed series in the summary")
    ends = [e for e in st.gw.catalog.audit_trail(st.project) if e.action == "pull.end"]
    if not ends or ends[-1].outcome != "error":
        out.problems.append("no pull.end row saying error")


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


def worker(st: Site, ae: str, lab: Lab) -> AbstractContextManager[subprocess.Popen[str]]:
    """`sphere worker` as node `ae` (its own SCP port), what it said in the home to read."""
    log = st.gw.settings.home / f"worker-{ae}.log"
    return sphere_worker(st.env, ae, lab.ports[ae], log)


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
            if r.status == "complete" and r.storage_key and uid not in self._read:
                problem = unreadable(store, r.storage_key, r.stored)
                if problem:
                    self.seen.append(f"a complete series does not read back: {problem}")
                self._read.add(uid)


def job_row(st: Site, job_id: int) -> Job:
    """The job's catalog row (the lab submitted it: it is there)."""
    row = st.gw.catalog.job(job_id)
    if row is None:
        raise LookupError(f"job {job_id} is not in the catalog")
    return row


def job_instances(st: Site, job_id: int) -> int:
    return int((job_row(st, job_id).progress or {}).get("instances", 0))


def job_ended(st: Site, job_id: int) -> bool:
    return job_row(st, job_id).state in ("done", "failed", "cancelled")


def job_ended_quietly(st: Site, job_id: int) -> bool:
    try:
        return job_ended(st, job_id)
    except Exception:  # noqa: BLE001 - the catalog is restarting
        return False
