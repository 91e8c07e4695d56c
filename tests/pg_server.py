"""A real PostgreSQL server on loopback for the tests (Debian's `postgresql`, started here)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.localpacs import free_port, wait_port


@dataclass
class PgServer:
    port: int

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


def _as_postgres(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: drop to its own account when we are root.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    assert bins, "PostgreSQL is installed by scripts/setup.sh (Debian package postgresql)"
    bindir = Path(bins[-1])
    root = Path(tempfile.mkdtemp(prefix="sphere-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data = root / "data"
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    port = free_port()
    proc = subprocess.Popen(
        _as_postgres(
            [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-k",
                str(root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ]
        ),
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "wb"),  # noqa: SIM115 - lives as long as the server
    )
    try:
        wait_port(port, timeout_s=30)
        server = PgServer(port)
        server.connect().close()
        yield server
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)
