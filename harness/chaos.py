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

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.settings import S3Options
from harness.busypacs import BusyPacs
from harness.chaoslab import (
    HEADER,
    NODES,
    HalfSeriesWatch,
    IndexedInstance,
    Lab,
    Outcome,
    Pulling,
    Site,
    count,
    ended_cleanly,
    job_ended,
    job_ended_quietly,
    job_instances,
    job_row,
    n_complete,
    node_here,
    pull_cli,
    pull_here,
    pull_popen,
    site,
    stopped_cleanly,
    wait_for,
    worker,
)
from harness.localpacs import stop_group
from harness.tcpproxy import CountingProxy
from storage.catalog import Job

__all__ = ["SCENARIOS", "HalfSeriesWatch", "IndexedInstance", "Lab", "Outcome", "Site", "site"]


# -- what scenarios share ----------------------------------------------------------------------


@contextmanager
def recovering(out: Outcome) -> Iterator[None]:
    """Times the recovery, from now (the fault's end) until the block's end: `recover_s`."""
    t0 = time.monotonic()
    yield
    out.recover_s = time.monotonic() - t0


def rerun(out: Outcome, st: Site, peer: CountingProxy) -> None:
    """The peer answers again and the pull is run again here: it must store everything."""
    peer.pass_again()
    with recovering(out):
        pull_here(out, st, "the re-run")


def first_series(st: Site, proc: Pulling | subprocess.Popen[str]) -> None:
    """Until the pull has completed a series (or ended)."""
    wait_for(lambda: n_complete(st) >= 1 or proc.poll() is not None, "a first series")


def outage(out: Outcome, st: Site, peer: CountingProxy, down_s: float) -> None:
    """A pull here; after its first series the peer answers nothing for `down_s`, then
    answers again: the pull must go on by itself and end complete."""
    proc = Pulling(out, st)
    first_series(st, proc)
    peer.drop()
    time.sleep(down_s)
    peer.pass_again()
    with recovering(out):
        proc.finish()


def job_done(out: Outcome, st: Site, job_id: int) -> Job:
    """The job's row, which must say done."""
    row = job_row(st, job_id)
    if row.state != "done":
        out.problems.append(f"job {row.state}: {row.outcome}")
    return row


# -- the scenarios ------------------------------------------------------------------------------


def pacs_down_at_start(lab: Lab, quick: bool) -> Outcome:
    """The PACS answers nothing when the pull starts: one line, exit 2, the `pull.end` row;
    back, the pull is run again and stores everything."""
    out = Outcome("PACS down at start", lab.corpus.n_instances)
    with site(lab, "down-at-start") as st:
        st.proxy.drop()
        ended_cleanly(out, st, pull_cli(st), rc=2)
        rerun(out, st, st.proxy)
        return count(out, st)


def pacs_down_mid_pull(lab: Lab, quick: bool) -> Outcome:
    """The PACS stops answering after the first series, for longer than the breaker waits
    (`give_up_s`): the pull stops then, not after every series waited as long on each of its
    retries, with the summary (series failed, none pending), one line, exit 2, the `pull.end`
    row; back, the re-run completes."""
    out = Outcome("PACS down mid-pull", lab.corpus.n_instances)
    source = {"give_up_s": 1.5 if quick else 5, "max_rate": 40}
    with site(lab, "down-mid-pull", source=source) as st:
        if quick:  # in this process (no `sphere` to start): what the CLI would print
            here = Pulling(out, st, stops=True)
            first_series(st, here)
            st.proxy.drop()
            stopped_cleanly(out, st, here.finish())
        else:
            proc = pull_popen(st)
            first_series(st, proc)
            st.proxy.drop()
            stdout, stderr = proc.communicate(timeout=300)
            ended = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            ended_cleanly(out, st, ended, rc=2)
            if "failed" not in stdout:
                out.problems.append("no summary of the failed series")
        rerun(out, st, st.proxy)
        return count(out, st)


def pacs_outage(lab: Lab, quick: bool) -> Outcome:
    """The PACS stops answering for a few seconds mid-pull: the breaker pauses the work, the
    pull resumes by itself when it answers and ends complete."""
    out = Outcome("PACS outage (breaker)", lab.corpus.n_instances)
    with site(lab, "outage", source={"max_rate": 40}) as st:
        outage(out, st, st.proxy, 1.5 if quick else 4)
        return count(out, st)


def association_aborted(lab: Lab, quick: bool) -> Outcome:
    """The association to the PACS is aborted mid-retrieve (the proxy cuts it), twice: the
    series is asked again, every instance stored once."""
    out = Outcome("association aborted", lab.corpus.n_instances)
    with site(lab, "aborted", source={"max_rate": 60}) as st:
        # a series' marker: retrieving
        expected = st.gw.settings.spool_dir / st.project / "expected"
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


def slow_pacs(lab: Lab, quick: bool) -> Outcome:
    """A slow PACS: C-GET (the instances come through the proxy) at 200 KB/s. Nothing times
    out, nothing fails, nothing is stored twice."""
    out = Outcome("slow PACS (200 KB/s)", lab.corpus.n_instances)
    with site(lab, "slow", source={"protocol": "get"}) as st:
        st.proxy.throttle(200_000)
        pull_here(out, st)
        return count(out, st)


def out_of_resources(lab: Lab, quick: bool, busy_retries: int = 3) -> Outcome:
    """The PACS answers the first three C-MOVEs 0xA702 (out of resources): each is asked again
    after a longer wait (busy_backoff_s, doubling), not spending the series' own retries (none
    here); every series completes."""
    out = Outcome("A702 out of resources", lab.corpus.n_instances)
    dests = {ae: ("127.0.0.1", port) for ae, port in lab.ports.items()}
    with BusyPacs(lab.pacs.aet, lab.pacs.dicom_port, dests, busy=3) as busy:
        retry = {"busy_backoff_s": 0.2, "busy_retries": busy_retries}
        source = {"ae_title": busy.aet, **retry}
        with site(lab, "a702", source=source, upstream=busy.port, retries=0) as st:
            pull_here(out, st)
            out.recover_s = time.monotonic() - busy.last_refused
            if busy.refused != 3 or not busy.relayed:
                out.problems.append(f"{busy.refused} refused, {busy.relayed} relayed")
            return count(out, st)


def s3_behind_proxy(lab: Lab) -> tuple[CountingProxy, dict[str, Any]]:
    """A proxy before the lab's S3 and the settings of a fresh bucket through it."""
    s3 = lab.s3_server()
    store = CountingProxy(s3.ports["s3"])
    opts = S3Options(
        endpoint=f"http://127.0.0.1:{store.port}",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
        allow_http=True,
    )
    return store, {"storage_url": s3.url(bucket=s3.new_bucket(), prefix="research"), "s3": opts}


def store_down_before(lab: Lab, quick: bool) -> Outcome:
    """The object store answers nothing when the pull starts: one line, exit 2, the
    `pull.end` row, and nothing asked of the PACS (its proxy saw no connection); back, the
    re-run stores everything."""
    out = Outcome("object store down before", lab.corpus.n_instances)
    store, settings = s3_behind_proxy(lab)
    with store, site(lab, "store-before", timeout_s=5, **settings) as st:
        store.drop()
        ended_cleanly(out, st, pull_cli(st), rc=2)
        if st.proxy.total:
            out.problems.append(f"the PACS was asked {st.proxy.total} times")
        rerun(out, st, store)
        return count(out, st)


def store_down_mid_commit(lab: Lab, quick: bool, store_wait_s: float = 60) -> Outcome:
    """The object store (S3) stops answering after the first series is stored: the commits
    wait (up to `store_wait_s`), the instances kept in the spool, and go on when it is back;
    the pull completes."""
    out = Outcome("object store down mid-commit", lab.corpus.n_instances)
    store, settings = s3_behind_proxy(lab)
    waits: dict[str, Any] = {"timeout_s": 5, "store_wait_s": store_wait_s}
    with store, site(lab, "store-down", source={"max_rate": 60}, **waits, **settings) as st:
        outage(out, st, store, 2 if quick else 5)
        if not store.dropped:
            out.problems.append("the store was not asked while it was down")
        return count(out, st)


def node_killed(lab: Lab, quick: bool) -> Outcome:
    """A node SIGKILLed mid-job five times in a row (its SCP workers with it), another node
    started each time: the job is taken up again each time and ends done; every instance
    stored once; no half series ever visible."""
    kills = 2 if quick else 5
    out = Outcome(f"node SIGKILLed x{kills}", lab.corpus.n_instances)
    url = lab.postgres().create_database(f"killed{lab._n}")
    from gateway import jobs

    with site(lab, "killed", source={"max_rate": 10 if quick else 8}, catalog_url=url) as st:
        job = jobs.submit(st.gw.core, "pull", st.project, user=st.gw.catalog.user("dan"))
        got = 0
        t0 = time.monotonic()
        with HalfSeriesWatch(st) as watch:
            for i in range(kills):
                with worker(st, NODES[i % 2], lab) as node:

                    def received(got: int = got) -> bool:
                        return job_instances(st, job.id) > got or job_ended(st, job.id)

                    wait_for(received, "the node to receive")
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait(30)
                    t0 = time.monotonic()
                got = job_instances(st, job.id)
                if job_ended(st, job.id):
                    out.problems.append(f"the job ended before kill {i + 1}")
                    break
            with worker(st, NODES[kills % 2], lab):
                wait_for(lambda: job_ended(st, job.id), "the job's end", 300)
        out.recover_s = time.monotonic() - t0
        row = job_done(out, st, job.id)
        if row.attempts != kills + 1:
            out.problems.append(f"{row.attempts} leases for {kills + 1} nodes")
        out.problems += sorted(set(watch.seen))
        return count(out, st)


def postgres_restarted(lab: Lab, quick: bool) -> Outcome:
    """PostgreSQL (the catalog) restarted mid-job, down a moment: the job and every series
    finish, none left pending."""
    out = Outcome("PostgreSQL restarted", lab.corpus.n_instances)
    pg = lab.postgres()
    url = pg.create_database(f"restarted{lab._n}")
    from gateway import jobs

    with site(lab, "pg-restart", source={"max_rate": 40}, catalog_url=url) as st:
        job = jobs.submit(st.gw.core, "pull", st.project, user=st.gw.catalog.user("dan"))
        with HalfSeriesWatch(st) as watch, node_here(st):
            wait_for(lambda: n_complete(st) >= 1 or job_ended(st, job.id), "a first series")
            pg.restart(down_s=1 if quick else 3)
            with recovering(out):
                wait_for(lambda: job_ended_quietly(st, job.id), "the job's end", 300)
        job_done(out, st, job.id)
        out.problems += sorted(set(watch.seen))
        return count(out, st)


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
        wait_for(lambda: job_row(st, job.id).state == "waiting", "the job to wait")
        row = job_row(st, job.id)
        if "no space left" not in (row.outcome or ""):
            out.problems.append(f"the job waits for: {row.outcome}")
        ends = [e for e in st.gw.catalog.audit_trail(st.project) if e.action == "pull.end"]
        if not ends or "no space left" not in ends[-1].detail:
            out.problems.append("no pull.end row saying the disk is full")
        leftover = [str(p) for p in spool.rglob("*.tmp")]
        if leftover:
            out.problems.append(f"{len(leftover)} .tmp files left")
        room.touch()
        with recovering(out):
            wait_for(lambda: job_ended(st, job.id), "the job's end", 300)
        job_done(out, st, job.id)
        return count(out, st)
    finally:
        stop_group(node)
        log.close()
        st.close()


SCENARIOS: dict[str, Callable[[Lab, bool], Outcome]] = {
    "pacs-down-at-start": pacs_down_at_start,
    "pacs-down-mid-pull": pacs_down_mid_pull,
    "pacs-outage": pacs_outage,
    "association-aborted": association_aborted,
    "out-of-resources": out_of_resources,
    "slow-pacs": slow_pacs,
    "store-down-before": store_down_before,
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
