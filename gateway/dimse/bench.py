"""Receive throughput of the Storage SCP against dcmtk `storescp`, on the same C-MOVE from a local
Orthanc: `python -m gateway.dimse.bench --instances 200 --size 512`.

Each round retrieves the same series to every target in turn; `--parallel N` runs N retrieves at
once (one series each). storescp runs with --ignore (receives, stores nothing) and our on_store
only counts: both measure the network path. Reports instances/s and this process's CPU time
(user + system) per instance.
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
from pathlib import Path

from dicom.synthetic import generate
from gateway.dimse.scp import ReceivedInstance, StorageSCP
from gateway.dimse.scu import Peer, Scu
from gateway.localpacs import LocalOrthanc, free_port

LABELS = {
    "sphere": "C-MOVE -> StorageSCP on_store",
    "raw": "C-MOVE -> StorageSCP on_receive",
    "spool": "C-MOVE -> StorageSCP spool files",
    "storescp": "C-MOVE -> dcmtk storescp",
    "get": "C-GET by Scu, on_store",
    "get-raw": "C-GET by Scu, on_receive",
}


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("storescp did not start")


def _movescu(peer: Peer, study_uid: str, series_uid: str, dest: str) -> bool:
    cmd = ["movescu", "-S", "-aet", "SPHERE", "-aec", peer.ae_title, "-aem", dest,
           "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study_uid}",
           "-k", f"SeriesInstanceUID={series_uid}", peer.host, str(peer.port)]  # fmt: skip
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(cmd, env=env, capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=200, help="instances per series")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--parallel", type=int, default=1, help="concurrent C-MOVEs (one per series)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--targets",
        default="sphere,storescp",
        help="comma list of: sphere (C-MOVE to our SCP, decoded datasets), raw (same, encoded "
        "instances), spool (same, each written as a Part 10 file, no fsync), storescp (C-MOVE to "
        "dcmtk storescp), get / get-raw (C-GET by our SCU, decoded / encoded)",
    )
    ap.add_argument(
        "--mover",
        choices=["sphere", "movescu"],
        default="sphere",
        help="who issues the C-MOVE: our SCU (in this process) or dcmtk movescu (another one)",
    )
    ap.add_argument(
        "--storescp-writes",
        action="store_true",
        help="storescp writes each instance to a file (compare with 'spool') instead of --ignore",
    )
    args = ap.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sphere-dimse-bench-"))
    received = 0
    lock = threading.Lock()

    spool = workdir / "spool"

    def on_store(ds: object, calling_ae: str) -> int:
        nonlocal received
        with lock:
            received += 1
        return 0

    def on_receive(instance: ReceivedInstance, calling_ae: str) -> int:
        return on_store(instance, calling_ae)

    def spool_receive(instance: ReceivedInstance, calling_ae: str) -> int:
        with open(spool / f"{instance.sop_instance}.dcm", "wb") as fp:
            instance.write(fp)
        return on_store(instance, calling_ae)

    callbacks = {
        "sphere": {"on_store": on_store},
        "raw": {"on_receive": on_receive},
        "spool": {"on_receive": spool_receive},
        "get": {"on_store": on_store},
        "get-raw": {"on_receive": on_receive},
    }

    scp_port = free_port()
    storescp_port = free_port()
    env = {**os.environ, "TCP_NODELAY": "1"}
    storescp_out = workdir / "storescp"
    storescp_out.mkdir(parents=True, exist_ok=True)
    store = ["-od", str(storescp_out)] if args.storescp_writes else ["--ignore"]
    storescp = subprocess.Popen(
        ["storescp", "--aetitle", "STORESCP", "--max-pdu", "131072", *store, str(storescp_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        corpus = generate(
            workdir / "data",
            n_patients=args.parallel,
            studies_per_patient=1,
            series_per_study=1,
            slices=args.instances,
            size=args.size,
        )
        series = [(st.study_uid, se.series_uid) for st in corpus.studies for se in st.series]
        n_total = sum(st.n_instances for st in corpus.studies)
        modalities = {
            "sphere": ("SPHERE", "127.0.0.1", scp_port),
            "storescp": ("STORESCP", "127.0.0.1", storescp_port),
        }
        with (
            LocalOrthanc(workdir / "pacs", modalities=modalities, dicomweb=False) as pacs,
            StorageSCP("SPHERE", port=scp_port, on_store=on_store) as scp,
        ):
            pacs.upload(corpus.files)
            shutil.rmtree(workdir / "data")
            _wait_port(storescp_port)
            peer = Peer(pacs.aet, "127.0.0.1", pacs.dicom_port)
            scu = Scu("SPHERE", timeout_s=60)
            targets = args.targets.split(",")
            rates: dict[str, list[float]] = {k: [] for k in targets}
            cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in targets if k != "storescp"}

            def one(target: str, s: tuple[str, str]) -> bool:
                if target.startswith("get"):
                    return scu.get_series(peer, *s, **callbacks[target]).ok
                ae = "STORESCP" if target == "storescp" else "SPHERE"
                if args.mover == "movescu":
                    return _movescu(peer, *s, ae)
                return scu.move_series(peer, *s, ae).ok

            for _ in range(args.rounds):
                for target in targets:
                    received = 0
                    if target in ("sphere", "raw", "spool"):
                        scp.set_callback(**callbacks[target])
                    for folder in (spool, storescp_out):
                        shutil.rmtree(folder, ignore_errors=True)
                        folder.mkdir()
                    t0, c0 = time.perf_counter(), os.times()
                    with ThreadPoolExecutor(len(series)) as pool:
                        ok = all(pool.map(lambda s, t=target: one(t, s), series))
                    dt, c1 = time.perf_counter() - t0, os.times()
                    if not ok or (target != "storescp" and received != n_total):
                        raise RuntimeError(f"{target}: retrieve failed ({received}/{n_total})")
                    rates[target].append(n_total / dt)
                    if target in cpu:
                        user, system = c1.user - c0.user, c1.system - c0.system
                        cpu[target].append((user / n_total * 1000, system / n_total * 1000))
            print(
                f"{n_total} instances of {args.size}x{args.size} int16, {len(series)} "
                f"concurrent retrieve(s), {args.rounds} rounds, C-MOVE issued by {args.mover}"
            )
            for target, values in rates.items():
                line = (
                    f"  {LABELS[target]:30s} median {statistics.median(values):7.1f} inst/s "
                    f"(runs: {', '.join(f'{v:.0f}' for v in values)})"
                )
                if cpu.get(target):
                    user = statistics.median(u for u, _ in cpu[target])
                    system = statistics.median(s for _, s in cpu[target])
                    line += f"; this process, ms CPU/inst: {user:.2f} user + {system:.2f} system"
                print(line)
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
