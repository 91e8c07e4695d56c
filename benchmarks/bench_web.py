"""DICOMweb serving: sphere against Orthanc's DICOMweb plugin and nginx, on one CT series.

One synthetic CT series (default 500 slices of 512 x 512) is loaded into Orthanc, pulled and
de-identified by sphere twice, into a local folder and into S3 (SeaweedFS on loopback), and its
frames are also written as static files (each frame's bytes in a one-part multipart/related
body, as a WADO-RS answer) that nginx serves: the floor for "bytes off a disk over HTTP".
sphere runs as `sphere serve` does (`--workers`, default 1). Then, in the same run:

- frames: 1 and 4 concurrent `dicomweb-client` clients (processes), each retrieving every frame
  of the series in order: frames/s over all clients, and the time until the last frame arrived;
- series /metadata: the first request after the server started (cold) and the median of the
  next five (warm), sphere (local folder and S3) against Orthanc.

Ratios are printed; nothing is asserted. The machine's cores are shared by the servers and the
clients, so the figures are for comparing in one run, not absolute capacities.

    .venv/bin/python benchmarks/bench_web.py [--slices 500 --size 512 --clients 1 4 --workers 1]

Set-up: installs Debian `nginx` with apt-get when it is missing (as root, or through sudo).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient

from core import users
from core.settings import PacsPeer, S3Options, Settings
from dicom.json_model import first
from gateway.api import Gateway
from harness.localpacs import LocalOrthanc, free_port, wait_port
from harness.seaweed import SeaweedS3
from harness.serve import start_sphere
from harness.synthetic import generate

PROJECT = "bench-web"
BOUNDARY = "sphere-static-frame"
FRAME_CONTENT_TYPE = f'multipart/related; type="application/octet-stream"; boundary={BOUNDARY}'
FRAME_TYPE = (("application/octet-stream", "*"),)  # Orthanc refuses the default type="*/*"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    """A DICOMweb service root and the series it holds (its own UIDs)."""

    name: str
    url: str
    study: str
    series: str
    sops: list[str]
    headers: dict[str, str] = field(default_factory=dict)


def ensure_nginx() -> str:
    """The nginx binary, installed with apt-get when missing (the benchmark's own set-up)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print("installing Debian nginx")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"],
        check=True,
        env=env,
    )
    # The system service the package may start is not ours.
    subprocess.run([*sudo, "systemctl", "disable", "--now", "nginx"], capture_output=True)
    return shutil.which("nginx") or "/usr/sbin/nginx"


def start_nginx(binary: str, work: Path, www: Path, port: int) -> subprocess.Popen[bytes]:
    """nginx in the foreground on loopback, serving `www` with the frames' multipart type."""
    for d in ("tmp", "logs"):
        (work / d).mkdir(parents=True, exist_ok=True)
    temps = "".join(
        f"  {kind}_temp_path {work / 'tmp' / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = work / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + textwrap.dedent(
            f"""\
            worker_processes 2;
            daemon off;
            pid {work / "nginx.pid"};
            error_log {work / "logs" / "error.log"} warn;
            events {{ worker_connections 1024; }}
            http {{
              access_log off;
              sendfile on;
              tcp_nodelay on;
              keepalive_requests 100000;
              types {{ }}
              default_type '{FRAME_CONTENT_TYPE}';
            """
        )
        + temps
        + f"  server {{ listen 127.0.0.1:{port}; root {www}; location / {{ }} }}\n}}\n"
    )
    proc = subprocess.Popen(
        [binary, "-p", str(work), "-e", str(work / "logs" / "error.log"), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def client(server: Server) -> DICOMwebClient:
    return DICOMwebClient(url=server.url, headers=server.headers)


def fetch_all(server: Server, start: Event, done: Queue[tuple[float, int]]) -> None:
    """One client: every frame of the series in order; reports when the last one arrived."""
    c = client(server)
    c.retrieve_instance_frames(
        server.study, server.series, server.sops[0], frame_numbers=[1], media_types=FRAME_TYPE
    )  # connection open, as a viewer's would be
    start.wait()
    nbytes = 0
    for sop in server.sops:
        (frame,) = c.retrieve_instance_frames(
            server.study, server.series, sop, frame_numbers=[1], media_types=FRAME_TYPE
        )
        nbytes += len(frame)
    done.put((time.perf_counter(), nbytes))


def fetch_all_raw(server: Server, start: Event, done: Queue[tuple[float, int]]) -> None:
    """One lean client: the same requests on one keep-alive connection, each body read whole
    and not parsed, so the server's own cost shows (dicomweb-client's parsing bounds the rest)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port)
    headers = {**server.headers, "Accept": FRAME_ACCEPT}

    def get(sop: str) -> int:
        path = f"{url.path}/studies/{server.study}/series/{server.series}/instances/{sop}/frames/1"
        try:
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            conn.close()  # an idle keep-alive closed (Orthanc's lasts 1 s): reconnect, as
            conn.request("GET", path, headers=headers)  # requests does for dicomweb-client
            r = conn.getresponse()
        body = r.read()
        assert r.status == 200, r.status
        return len(body)

    get(server.sops[0])
    start.wait()
    nbytes = sum(get(sop) for sop in server.sops)
    done.put((time.perf_counter(), nbytes))


def frames_run(server: Server, n_clients: int, lean: bool = False) -> tuple[float, float]:
    """(frames/s over all clients, seconds until the last frame arrived)."""
    ctx = mp.get_context("fork")
    start, done = ctx.Event(), ctx.Queue()
    target = fetch_all_raw if lean else fetch_all
    procs = [ctx.Process(target=target, args=(server, start, done)) for _ in range(n_clients)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # every client connected and waiting
    t0 = time.perf_counter()
    start.set()
    ends = [done.get(timeout=600)[0] for _ in procs]
    for p in procs:
        p.join()
    last = max(ends) - t0
    return n_clients * len(server.sops) / last, last


def metadata_latency(server: Server) -> tuple[float, float]:
    """(cold seconds: the first request, warm: the median of the next five)."""
    url = f"{server.url}/studies/{server.study}/series/{server.series}/metadata"
    headers = {**server.headers, "Accept": "application/dicom+json"}
    times = []
    with requests.Session() as s:
        for _ in range(6):
            t0 = time.perf_counter()
            r = s.get(url, headers=headers)
            r.raise_for_status()
            assert len(r.json()) == len(server.sops)
            times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def static_frames(source: Server, www: Path, target: Server) -> None:
    """Write each frame, as `source` serves it, to the static tree under `target`'s UIDs."""
    c = client(source)
    base = www / "dicom-web" / "studies" / target.study / "series" / target.series / "instances"
    for sop in source.sops:
        (frame,) = c.retrieve_instance_frames(
            source.study, source.series, sop, frame_numbers=[1], media_types=FRAME_TYPE
        )
        path = base / sop / "frames" / "1"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = f"--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        path.write_bytes(head + frame + f"\r\n--{BOUNDARY}--\r\n".encode())


def sop_uids(server: Server) -> list[str]:
    found = client(server).search_for_instances(server.study, server.series)
    return sorted(first(d, "00080018") for d in found)


def pull(
    home: Path, pacs: LocalOrthanc, accession: str, s3: SeaweedS3 | None = None
) -> tuple[Settings, str]:
    """The series pulled and de-identified into a fresh home (its store in S3 when given);
    a viewer's token."""
    scp_port = free_port()
    pacs.add_modality("SPHERE", "SPHERE", "127.0.0.1", scp_port)
    settings = Settings(
        home=home,
        port=scp_port,
        pacs=PacsPeer(ae_title=pacs.aet, port=pacs.dicom_port),
        fsync=False,
    )
    if s3 is not None:
        settings.storage_url = s3.url(prefix="bench-web")
        settings.s3 = S3Options(**vars(s3.options()))
    gw = Gateway(settings)
    gw.create_project(PROJECT, title="web benchmark")
    today = date.today()
    gw.approve(
        PROJECT,
        committee_ref="BENCH",
        approved_on=today - timedelta(days=1),
        expires_on=today + timedelta(days=30),
    )
    gw.add_cohort(PROJECT, "accession", [accession])
    t0 = time.perf_counter()
    gw.pull(PROJECT)
    where = "S3" if s3 is not None else "a local folder"
    print(f"pulled into {where} in {time.perf_counter() - t0:.1f} s")
    token = users.add(gw.core, "bench")
    users.grant(gw.core, PROJECT, "bench", "viewer")
    gw.core.close()
    return settings, token


def sphere_server(name: str, settings: Settings, token: str, workers: int) -> tuple[Server, Any]:
    port = free_port()
    proc = start_sphere(settings, port, workers)
    server = Server(name, f"http://127.0.0.1:{port}/projects/{PROJECT}/dicom-web", "", "", [])
    server.headers = {"Authorization": f"Bearer {token}"}
    (found,) = client(server).search_for_series()
    server.study = first(found, "0020000D")
    server.series = first(found, "0020000E")
    server.sops = sop_uids(server)
    return server, proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=500)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workers", type=int, default=1, help="sphere serve --workers")
    ap.add_argument("--no-s3", action="store_true", help="the local folder only")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    nginx = ensure_nginx()
    tmp = Path(tempfile.mkdtemp(prefix="sphere-bench-web-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.perf_counter()
        corpus = generate(
            tmp / "corpus",
            n_patients=1,
            series_per_study=1,
            slices=args.slices,
            size=args.size,
            seed=5,
        )
        took = time.perf_counter() - t0
        print(f"{args.slices} slices of {args.size}² CT written in {took:.1f} s")
        with LocalOrthanc(tmp / "orthanc") as pacs, contextlib.ExitStack() as stack:
            pacs.upload(corpus.files)
            study = corpus.studies[0]
            homes = [("sphere", pull(tmp / "home", pacs, study.accession))]
            if not args.no_s3:
                s3 = stack.enter_context(SeaweedS3(tmp / "s3"))
                homes.append(("sphere S3", pull(tmp / "home-s3", pacs, study.accession, s3)))
            spheres = []
            for name, (settings, token) in homes:
                server, proc = sphere_server(name, settings, token, args.workers)
                spheres.append(server)
                procs.append(proc)
            sphere = spheres[0]
            orthanc = Server(
                "Orthanc",
                f"{pacs.url}/dicom-web",
                study.study_uid,
                study.series[0].series_uid,
                [],
            )
            orthanc.sops = sop_uids(orthanc)
            assert all(len(s.sops) == len(orthanc.sops) == args.slices for s in spheres)

            # Series metadata first: nothing has asked either server for it yet.
            meta = {s.name: metadata_latency(s) for s in (*spheres, orthanc)}

            nginx_port = free_port()
            static = Server("nginx", f"http://127.0.0.1:{nginx_port}/dicom-web", "", "", [])
            static.study, static.series, static.sops = sphere.study, sphere.series, sphere.sops
            static_frames(sphere, tmp / "www", static)
            procs.append(start_nginx(nginx, tmp / "nginx", tmp / "www", nginx_port))
            servers = (*spheres, orthanc, static)
            same = [
                client(s).retrieve_instance_frames(
                    s.study, s.series, s.sops[0], frame_numbers=[1], media_types=FRAME_TYPE
                )[0]
                for s in servers
            ]
            # Each home has its own pseudonymous UIDs, so only sphere and nginx hold the same
            # frame at the same place: the rest are compared by size.
            assert {len(f) for f in same} == {args.size * args.size * 2}
            assert bytes(same[0]) == bytes(same[-1])

            results: dict[tuple[str, int], tuple[float, float]] = {}
            lean: dict[tuple[str, int], tuple[float, float]] = {}
            for n in args.clients:
                for s in servers:
                    results[(s.name, n)] = frames_run(s, n)
                for s in servers:
                    lean[(s.name, n)] = frames_run(s, n, lean=True)
            report(args, results, meta, "dicomweb-client")
            report(args, lean, None, "a lean HTTP client (bodies read, not parsed)")
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, int], tuple[float, float]],
    meta: dict[str, tuple[float, float]] | None,
    clients: str,
) -> None:
    mb = args.size * args.size * 2 / 1e6
    print(f"\nframes: {args.slices} frames of {mb:.2f} MB each, per client, in order, by {clients}")
    print(f"sphere serve --workers {args.workers}")
    print(f"{'server':10} {'clients':>7} {'frames/s':>9} {'MB/s':>7} {'last frame s':>13}")
    for (name, n), (fps, last) in results.items():
        print(f"{name:10} {n:7d} {fps:9.0f} {fps * mb:7.0f} {last:13.2f}")
    spheres = list(dict.fromkeys(name for name, _ in results if name.startswith("sphere")))
    for n in args.clients:
        o, g = results[("Orthanc", n)][0], results[("nginx", n)][0]
        print(f"{n} client(s): nginx / Orthanc = {g / o:.2f}x (the ceiling of any server's ratio)")
        for name in spheres:
            s = results[(name, n)][0]
            print(f"{n} client(s): {name} / Orthanc = {s / o:.2f}x   / nginx = {s / g:.2f}x")
    if meta is None:
        return
    print("\nseries metadata (application/dicom+json)")
    print(f"{'server':10} {'cold ms':>9} {'warm ms':>9}")
    for name, (cold, warm) in meta.items():
        print(f"{name:10} {cold * 1e3:9.1f} {warm * 1e3:9.1f}")
    oc, ow = meta["Orthanc"]
    for name in spheres:
        sc, sw = meta[name]
        print(f"Orthanc / {name}: cold {oc / sc:.1f}x, warm {ow / sw:.1f}x (higher: sphere faster)")


if __name__ == "__main__":
    main()
