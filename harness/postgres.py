"""A real PostgreSQL server on loopback (Debian's `postgresql`, started here) for the tests
(`tests/pg_server.py` makes it a fixture) and `make chaos`, which restarts it mid-job."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from harness.localpacs import free_port, wait_port


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: drop to its own account when we are root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PgServer:
    """`PgServer().start()`: a fresh cluster on a free port; `restart()` stops it (fast
    shutdown: sessions cut) and starts it again on the same port and data; `stop()`."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        assert bins, "PostgreSQL is installed by scripts/setup.sh (Debian package postgresql)"
        self.bindir = Path(bins[-1])
        self.root = Path(tempfile.mkdtemp(prefix="sphere-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        with self.connect() as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def connect(self, timeout_s: float = 30.0):  # noqa: ANN201 - psycopg is imported lazily
        """A connection to the server, once it accepts them: it listens a moment before its
        start-up is done ("the database system is starting up")."""
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return psycopg.connect(
                    f"host=127.0.0.1 port={self.port} user=postgres", autocommit=True
                )
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def start(self) -> PgServer:
        self.root.chmod(0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        data = self.data
        if not data.exists():
            cmd = [str(self.bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
            subprocess.run(_as_postgres(cmd), check=True, capture_output=True)
        cmd = [
            str(self.bindir / "postgres"),
            *("-D", str(data), "-p", str(self.port), "-k", str(self.root)),
            *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - handed to the server
        try:
            self._proc = subprocess.Popen(_as_postgres(cmd), stdout=subprocess.DEVNULL, stderr=log)
        finally:
            log.close()
        wait_port(self.port, timeout_s=30)
        self.connect().close()
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions are cut, as at a restart."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            pg_ctl = [str(self.bindir / "pg_ctl"), "stop", "-m", "fast", "-D", str(self.data)]
            subprocess.run(_as_postgres(pg_ctl), capture_output=True, timeout=60)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s`, start again (the same port and data)."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
