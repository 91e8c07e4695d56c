"""Receive throughput of the Storage SCP against dcmtk `storescp`, on the same C-MOVE from a local
Orthanc: `.venv/bin/python benchmarks/bench_scp.py --instances 200 --size 512`.

Each round retrieves the same series to every target in turn; `--parallel N` runs N retrieves at
once (one series each). storescp runs with --ignore (receives, stores nothing) and our on_store
only counts: both measure the network path. Reports instances/s and this process's CPU time
(user + system) per instance.

Target `scp` measures the SCP with a Handler, in threads and in worker processes: one run per
`--workers` x `--handlers` combination, e.g. `--targets scp,storescp --workers 0,2 --handlers
trivial,json2 --parallel 2`. CPU per instance then counts this process and its workers, and
Orthanc's CPU per instance is shown too (it shares the cores).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from dicom.json_model import to_json_dict
from dicom.received import ReceivedInstance
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import Peer, Scu
from harness.localpacs import LocalOrthanc, free_port, wait_port
from harness.synthetic import generate

LABELS = {
    "sphere": "C-MOVE -> StorageSCP on_store, dataset read",
    "raw": "C-MOVE -> StorageSCP on_store, still encoded",
    "spool": "C-MOVE -> StorageSCP spool files",
    "storescp": "C-MOVE -> dcmtk storescp",
    "get": "C-GET by Scu, on_store, dataset read",
    "get-raw": "C-GET by Scu, on_store, still encoded",
}


class TrivialHandler:
    """Receives and counts; the dataset is parsed lazily, so hardly touched."""

    def on_store(self, event: ReceivedInstance) -> int:
        return 0


class JsonHandler:
    """Realistic CPU work per instance: the DICOM JSON header, `repeat` times (~0.8 ms each
    for 512x512 CT here)."""

    def __init__(self, repeat: int = 1) -> None:
        self.repeat = repeat

    def on_store(self, event: ReceivedInstance) -> int:
        for _ in range(self.repeat):
            json.dumps(to_json_dict(event.dataset))
        return 0


class HandlerFactory:
    """Picklable handler factory by name: trivial, json, json2 (twice the JSON work)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> TrivialHandler | JsonHandler:
        if self.name == "trivial":
            return TrivialHandler()
        return JsonHandler(2 if self.name == "json2" else 1)


def _importable(name: str) -> type:
    """This module's class by its importable name (not __main__'s), so workers can unpickle it."""
    return getattr(importlib.import_module("bench_scp"), name)


def _ae(target: str) -> str:
    return target.replace("scp-", "").replace("-", "").upper()[:16]


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


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
        "dcmtk storescp), get / get-raw (C-GET by our SCU, decoded / encoded), scp (C-MOVE to "
        "our SCP with a handler, for each --workers and --handlers)",
    )
    ap.add_argument("--workers", default="0,2", help="for target scp: comma list of worker counts")
    ap.add_argument(
        "--handlers", default="trivial,json2", help="for target scp: trivial, json, json2"
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

    def on_receive(instance: ReceivedInstance) -> int:
        nonlocal received
        with lock:
            received += 1
        return 0

    def on_store(instance: ReceivedInstance) -> int:
        _ = instance.dataset  # decoded, as a handler that reads it pays
        return on_receive(instance)

    def spool_receive(instance: ReceivedInstance) -> int:
        with open(spool / f"{instance.sop_instance}.dcm", "wb") as fp:
            instance.write(fp)
        return on_receive(instance)

    callbacks: dict[str, dict[str, Any]] = {
        "sphere": {"on_store": on_store},
        "raw": {"on_store": on_receive},
        "spool": {"on_store": spool_receive},
        "get": {"on_store": on_store},
        "get-raw": {"on_store": on_receive},
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
        targets = []
        combos: dict[str, tuple[int, str]] = {}  # scp target -> (workers, handler)
        for target in args.targets.split(","):
            if target != "scp":
                targets.append(target)
                continue
            for w in (int(x) for x in args.workers.split(",")):
                for h in args.handlers.split(","):
                    name = f"scp-w{w}-{h}"
                    combos[name] = (w, h)
                    LABELS[name] = f"C-MOVE -> SCP {w} workers, {h}"
                    targets.append(name)
        ports = {name: free_port() for name in combos}
        modalities = {
            "sphere": ("SPHERE", "127.0.0.1", scp_port),
            "storescp": ("STORESCP", "127.0.0.1", storescp_port),
        }
        modalities |= {name: (_ae(name), "127.0.0.1", ports[name]) for name in combos}
        factory = _importable("HandlerFactory")
        with contextlib.ExitStack() as stack:
            pacs = stack.enter_context(
                LocalOrthanc(workdir / "pacs", modalities=modalities, dicomweb=False)
            )
            scp = stack.enter_context(StorageSCP("SPHERE", port=scp_port, on_store=on_store))
            scps: dict[str, StorageSCP] = {}
            for name, (w, h) in combos.items():
                scps[name] = stack.enter_context(
                    StorageSCP(_ae(name), port=ports[name], handler_factory=factory(h), workers=w)
                )
                print(f"{LABELS[name]}: started in {scps[name].start_seconds:.2f}s")
            pacs.upload(corpus.files)
            shutil.rmtree(workdir / "data")
            wait_port(storescp_port)
            peer = Peer(pacs.aet, "127.0.0.1", pacs.dicom_port)
            scu = Scu("SPHERE", timeout_s=60)
            rates: dict[str, list[float]] = {k: [] for k in targets}
            cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
            orthanc = [pacs.process.pid] if pacs.process else []

            def one(target: str, s: tuple[str, str]) -> bool:
                if target.startswith("get"):
                    return scu.get_series(peer, *s, **callbacks[target]).ok
                ae = {"storescp": "STORESCP"}.get(target) or (
                    _ae(target) if target in combos else "SPHERE"
                )
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
                    target_scp = scps.get(target)
                    before = target_scp.received if target_scp else 0
                    workers = target_scp.worker_pids if target_scp else []
                    t0, c0 = time.perf_counter(), os.times()
                    w0, o0 = _cpu_s(workers), _cpu_s(orthanc)
                    with ThreadPoolExecutor(len(series)) as pool:
                        ok = all(pool.map(lambda s, t=target: one(t, s), series))
                    dt, c1 = time.perf_counter() - t0, os.times()
                    w1, o1 = _cpu_s(workers), _cpu_s(orthanc)
                    if target_scp:
                        received = target_scp.received - before
                    if not ok or (target != "storescp" and received != n_total):
                        raise RuntimeError(f"{target}: retrieve failed ({received}/{n_total})")
                    rates[target].append(n_total / dt)
                    ours = c1.user - c0.user + c1.system - c0.system + w1 - w0
                    if target == "storescp":
                        ours = float("nan")  # another process; not measured
                    cpu[target].append((ours / n_total * 1000, (o1 - o0) / n_total * 1000))
            print(
                f"{n_total} instances of {args.size}x{args.size} int16, {len(series)} "
                f"concurrent retrieve(s), {args.rounds} rounds, C-MOVE issued by {args.mover}"
            )
            for target, values in rates.items():
                ours = statistics.median(u for u, _ in cpu[target])
                pacs_cpu = statistics.median(o for _, o in cpu[target])
                line = (
                    f"  {LABELS[target]:36s} median {statistics.median(values):7.1f} inst/s "
                    f"(runs: {', '.join(f'{v:.0f}' for v in values)}); ms CPU/inst: "
                )
                if ours == ours:  # not NaN
                    line += f"ours {ours:.2f} (this process + workers), "
                print(line + f"Orthanc {pacs_cpu:.2f}")
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
