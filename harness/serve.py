"""`sphere serve` in a process of its own, on a given home and store: what the benchmarks
measure is the server as a user starts it. `sphere worker` nodes likewise, for the tests and
`make chaos`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core import Core, access, users
from core.settings import Settings
from harness.localpacs import free_port, stop_group, wait_port

ROOT = Path(__file__).resolve().parents[1]
SERVER = "server"  # the sphere user the server process acts as


def start_sphere(settings: Settings, port: int, workers: int = 1) -> subprocess.Popen[bytes]:
    """`sphere serve --port --workers` on the settings' home and store; returns once it listens."""
    env = {**os.environ, **settings_env(settings), "SPHERE_TOKEN": server_token(settings)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--workers",
         str(workers)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # uvicorn's start and stop lines
    )  # fmt: skip
    wait_port(port, timeout_s=60)
    return proc


@contextmanager
def sphere_serving(settings: Settings, workers: int = 1) -> Iterator[str]:
    """`start_sphere` on a free port; yields its base URL; stops it on leaving."""
    port = free_port()
    proc = start_sphere(settings, port, workers)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def sphere_worker(
    env: dict[str, str], ae: str, port: int, log: Path | None = None
) -> Iterator[subprocess.Popen[str]]:
    """`sphere worker` with `env` as node `ae` (its own SCP port), in a process group of its own
    (its SCP workers with it), what it says appended to `log` (None: dropped); stopped
    (SIGTERM to the group, SIGKILL after a minute) on leaving."""
    node_env = {**env, "SPHERE_AE_TITLE": ae, "SPHERE_PORT": str(port)}
    with open(log or os.devnull, "a") as said:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "worker"],
            env=node_env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=said,
            text=True,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def server_token(settings: Settings) -> str:
    """A token of a data manager for the server: `sphere serve` acts as a known operator, as a
    deployment's service account does (mapped to a user, or given its token)."""
    with Core(settings) as core:
        if core.catalog.user(SERVER) is None:
            token = users.add(core, SERVER, actor="harness")
        else:
            token = users.enable(core, SERVER, actor="harness")
        user = core.catalog.user(SERVER)
        assert user is not None
        core.catalog.add_user_role(user.id, access.DATA_MANAGER, "harness")
    return token


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a `sphere` process these settings' home and store."""
    env = {"SPHERE_HOME": str(settings.home)}
    if settings.storage_url:
        env["SPHERE_STORAGE_URL"] = settings.storage_url
        for name, value in settings.s3.model_dump().items():
            if value is not None:
                env[f"SPHERE_S3__{name.upper()}"] = str(value)
    return env
