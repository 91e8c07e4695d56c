"""A local Orthanc as the stand-in hospital PACS, for the demo, the tests and the benchmarks.

Runs the Debian `Orthanc` binary as a plain child process on loopback, with its storage, index and
logs under a work directory. Seeding goes over REST (`POST /instances`) on keep-alive connections.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ORTHANC_BIN = os.environ.get("SPHERE_ORTHANC_BIN", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MAX_PDU = 131072  # the largest Orthanc accepts; fewer, larger PDUs per instance


class OrthancError(RuntimeError):
    """Orthanc did not start, or answered a REST call with an error."""


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """Stop a process started with `start_new_session=True`, and its children: SIGTERM to
    its group, SIGKILL after a minute."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free now, for peers that cannot bind port 0 themselves.

    It is drawn below the kernel's ephemeral range, so no `bind(0)` and no outgoing connection
    can take it before the peer binds it (a module-long SCP port is bound and released many
    times), and this process never hands the same port out twice."""
    low, high = 20000, _ephemeral_low() - 1
    rng = random.Random()
    for _ in range(200 if high - low > 1000 else 0):
        port = rng.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # an unusual port range
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on `port` (a peer we started)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise OrthancError(f"nothing listens on port {port} after {timeout_s:g}s")


def _modality(aet: str, host: str, port: int) -> dict[str, Any]:
    return {
        "AET": aet,
        "Host": host,
        "Port": port,
        "AllowEcho": True,
        "AllowFind": True,
        "AllowGet": True,
        "AllowMove": True,
        "AllowStore": True,
        "AllowTranscoding": True,
    }


class LocalOrthanc:
    """Start/stop a loopback Orthanc; also a context manager (`with LocalOrthanc(d) as pacs:`)."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        dicom_port: int = 0,
        http_port: int = 0,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        dicomweb: bool = True,
        dicom_threads: int = 8,
        timeout_s: float = 30.0,
        users: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.modalities = dict(modalities or {})
        self.dicomweb = dicomweb
        self.dicom_threads = dicom_threads
        self.timeout_s = timeout_s
        # HTTP basic authentication on REST and DICOMweb; our own calls use the first user.
        self.users = dict(users or {})
        self.extra = dict(extra or {})  # configuration over ours (a benchmark's tuning)
        self.process: subprocess.Popen[bytes] | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[http.client.HTTPConnection] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration this instance runs with."""
        cfg: dict[str, Any] = {
            "Name": "sphere-localpacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "StorageCompression": False,
            "SyncStorageArea": False,  # a throwaway test PACS: no fsync per instance
            "HttpPort": self.http_port,
            "HttpCompressionEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            # Orthanc 1.10 listens on all interfaces; a known AE must also come from its host.
            "DicomCheckModalityHost": True,
            "DicomModalities": {k: _modality(*v) for k, v in self.modalities.items()},
            "DicomModalitiesInDatabase": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "UnknownSopClassAccepted": False,
            "DicomScpTimeout": int(self.timeout_s),
            "DicomScuTimeout": int(self.timeout_s),
            "MaximumPduLength": MAX_PDU,
            # Each association is served by one of these threads; the gateway runs a few C-MOVEs at
            # once while also sending C-FIND and C-ECHO, so keep well above its parallelism.
            "DicomThreadsCount": self.dicom_threads,
            # Synchronous C-MOVE: the C-MOVE response reports the real sub-operation counts.
            "SynchronousCMove": True,
            "ConcurrentJobs": 4,
            "SaveJobs": False,
            "StorageAccessOnFind": "Always",
            "TranscodeDicomProtocol": True,
            "DeidentifyLogs": True,
            "MetricsEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
        }
        if self.dicomweb:
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        return {**cfg, **self.extra}

    def start(self) -> LocalOrthanc:
        """Write the config, launch Orthanc and wait until REST `/system` answers."""
        if self.process is not None:
            return self
        if not Path(ORTHANC_BIN).exists():
            raise OrthancError(f"Orthanc binary not found at {ORTHANC_BIN}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        pick_dicom, pick_http = self.dicom_port == 0, self.http_port == 0
        for _attempt in range(3):  # a picked port can be taken before Orthanc binds it
            if pick_dicom:
                self.dicom_port = free_port()
            if pick_http:
                self.http_port = free_port()
            if self._launch():
                return self
            if not (pick_dicom or pick_http):
                break
        raise OrthancError(f"Orthanc did not start; see logs in {self.log_dir}")

    def _launch(self) -> bool:
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        # Without TCP_NODELAY, DCMTK inside Orthanc waits ~40 ms per DIMSE message (Nagle + ACK).
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_dir / "stdout.txt", "ab") as out:
            self.process = subprocess.Popen(
                [ORTHANC_BIN, f"--logdir={self.log_dir}", str(cfg_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to forward
            )
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            try:
                self.get("/system")
                return True
            except (OSError, OrthancError, http.client.HTTPException):
                time.sleep(0.05)
        self.stop()
        return False

    def stop(self) -> None:
        """Terminate Orthanc (SIGTERM, then SIGKILL after a few seconds)."""
        proc, self.process = self.process, None
        self._close_connections()
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL Orthanc at once, as a crashed PACS would vanish (used by failure tests)."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self.process = None
        self._close_connections()

    def remove(self) -> None:
        """Stop and delete the work directory (storage, index, logs)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- REST -------------------------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn not in self._conns:  # new thread, or closed by _close_connections
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _close_connections(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    def request(
        self, method: str, path: str, body: bytes | None = None, ctype: str = "application/json"
    ) -> Any:
        """One REST call on this thread's keep-alive connection; the JSON answer (or None)."""
        headers = {"Content-Type": ctype} if body is not None else {}
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        conn = self._conn()
        for attempt in range(2):  # the server may have closed an idle keep-alive connection
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                if attempt:
                    raise
        if resp.status >= 400:
            raise OrthancError(f"Orthanc {method} {path.split('?')[0]} -> HTTP {resp.status}")
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, paths: Iterable[Path], threads: int = 2) -> int:
        """Store DICOM files via `POST /instances`; returns how many Orthanc accepted."""

        def one(path: Path) -> int:
            self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
            return 1

        if threads <= 1:
            return sum(one(p) for p in paths)
        try:
            with ThreadPoolExecutor(threads) as pool:
                return sum(pool.map(one, paths))
        finally:
            self._close_connections()  # the pool's threads are gone; so are their connections

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or update) a DICOM peer, e.g. a C-MOVE destination, while running."""
        self.modalities[name] = (aet, host, port)
        body = json.dumps(_modality(aet, host, port)).encode()
        self.request("PUT", f"/modalities/{name}", body)

    def echo_modality(self, name: str) -> bool:
        """Ask Orthanc to C-ECHO a declared modality; True if it answered."""
        try:
            self.request("POST", f"/modalities/{name}/echo", b"{}")
            return True
        except OrthancError:
            return False

    def counts(self) -> dict[str, int]:
        """Patients, studies, series and instances stored."""
        s = self.get("/statistics")
        levels = ("patients", "studies", "series", "instances")
        return {k: int(s[f"Count{k.title()}"]) for k in levels}

    def studies(self) -> list[dict[str, Any]]:
        """Stored studies with their main tags (`/studies?expand`)."""
        return self.get("/studies?expand")
