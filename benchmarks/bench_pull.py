"""Pull throughput: Orthanc → sphere (C-MOVE, de-identify, Zarr) against Orthanc → dcmtk storescp.

Both receive the same C-MOVEs of the same series, with the same number of concurrent associations,
in the same run. storescp only writes each instance to disk; sphere also de-identifies, spools,
verifies counts and writes Zarr. Prints instances/s for each and the ratio sphere / storescp.

    .venv/bin/python benchmarks/bench_pull.py [--patients 4 --slices 250 --size 512 --rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from pathlib import Path

from core.settings import PacsPeer, Settings
from gateway.api import Gateway
from gateway.dimse.scu import Mover, Peer, Scu, SubOperations
from harness.localpacs import LocalOrthanc, free_port, wait_port
from harness.synthetic import generate


def storescp_round(
    pacs: LocalOrthanc,
    port: int,
    series: list[tuple[str, str]],
    assoc: int,
    out: Path,
    options: tuple[str, ...] = (),
) -> tuple[float, int]:
    """C-MOVE every series to a fresh dcmtk storescp (forking, to disk, with `options`);
    seconds and files."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(
        ["storescp", "--fork", *options, "-aet", "STORESCP", "-od", str(out), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        scu = Scu(calling_ae="SPHERE", timeout_s=120)  # a known AE to Orthanc
        peer = Peer(pacs.aet, "127.0.0.1", pacs.dicom_port)
        local, movers = threading.local(), []

        def move(s: tuple[str, str]) -> SubOperations:
            # As the pull does: each thread keeps its association for the next series.
            if not hasattr(local, "mover"):
                local.mover = Mover(scu, peer)
                movers.append(local.mover)
            return local.mover.move_series(s[0], s[1], "STORESCP")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(assoc) as pool:
            results = list(pool.map(move, series))
        seconds = time.perf_counter() - t0
        for m in movers:
            m.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert all(r.failed == 0 for r in results)
    return seconds, sum(1 for _ in out.rglob("*") if _.is_file())


def sphere_round(
    pacs: LocalOrthanc,
    port: int,
    accessions: list[str],
    assoc: int,
    home: Path,
    fsync_each: bool = False,
) -> tuple[float, int]:
    """The whole pull of the cohort with default settings; seconds and instances."""
    settings = Settings(
        home=home,
        port=port,
        max_associations=assoc,
        fsync=os.environ.get("BENCH_FSYNC", "1") == "1",
        fsync_each=fsync_each,
        pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port),
    )
    return timed_pull(settings, accessions)


def timed_pull(settings: Settings, accessions: list[str]) -> tuple[float, int]:
    """The whole pull of the cohort into a fresh home on `settings`; seconds and instances."""
    shutil.rmtree(settings.home, ignore_errors=True)
    gw = Gateway(settings, actor="bench")
    gw.create_project("bench")
    today = date.today()
    gw.approve(
        "bench", committee_ref="BENCH", approved_on=today, expires_on=today + timedelta(days=1)
    )
    gw.add_cohort("bench", "accession", accessions)
    t0 = time.perf_counter()
    report = gw.pull("bench")
    seconds = time.perf_counter() - t0
    assert report.ok, [s.error for s in report.series if s.error]
    gw.close()
    return seconds, report.instances


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--patients", type=int, default=4)
    ap.add_argument("--slices", type=int, default=250, help="slices of the thin series per study")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--associations", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--fsync-each",
        action="store_true",
        help="flush each instance before acknowledging it (SPHERE_FSYNC_EACH), not per association",
    )
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sphere-bench-"))
    corpus = generate(work / "corpus", n_patients=args.patients, slices=args.slices, size=args.size)
    n = corpus.n_instances
    series = [(st.study_uid, se.series_uid) for st in corpus.studies for se in st.series]
    sphere_port, scp_port = free_port(), free_port()
    mods = {
        "SPHERE": ("SPHERE", "127.0.0.1", sphere_port),
        "STORESCP": ("STORESCP", "127.0.0.1", scp_port),
    }
    with LocalOrthanc(work / "orthanc", modalities=mods) as pacs:
        pacs.upload(corpus.files)
        print(
            f"corpus: {n} CT instances of {args.size}x{args.size}, {len(series)} series; "
            f"{args.associations} concurrent associations; {args.rounds} rounds"
            + ("; sphere flushes every instance" if args.fsync_each else "")
        )
        ours, theirs = [], []
        for r in range(args.rounds):
            s_sec, s_n = storescp_round(pacs, scp_port, series, args.associations, work / "scp")
            g_sec, g_n = sphere_round(
                pacs,
                sphere_port,
                [st.accession for st in corpus.studies],
                args.associations,
                work / "gateway",
                args.fsync_each,
            )
            assert s_n == n and g_n == n, (s_n, g_n, n)
            theirs.append(n / s_sec)
            ours.append(n / g_sec)
            print(
                f"round {r + 1}: storescp {n / s_sec:6.0f} inst/s, sphere {n / g_sec:6.0f} inst/s"
                f"   ratio {s_sec / g_sec:.2f}"
            )
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"median: sphere pull {a:.0f} instances/s, dcmtk storescp {b:.0f} instances/s, "
        f"ratio sphere/storescp = {a / b:.2f}"
    )
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
