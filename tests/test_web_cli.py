"""`sphere user ...`, `sphere project grant` (in-process, through the CLI's own error handling)
and `sphere serve` (a subprocess, as a user would run it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import requests
from typer.testing import CliRunner

from core import Core, Settings, users
from gateway.cli import app
from harness.leaks import scan_database
from harness.localpacs import free_port
from tests.test_cli import SPHERE
from tests.web_server import wait_healthy


def sphere(*args: str, home, check: bool = True):
    env = {"SPHERE_HOME": str(home), "COLUMNS": "200"}
    out = CliRunner().invoke(app, list(args), env=env)
    if check:
        assert out.exit_code == 0, out.output
    return out


def token_of(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_users_tokens_and_grants(tmp_path):
    sphere("project", "create", "webp", home=tmp_path)
    first = token_of(sphere("user", "add", "alice", home=tmp_path).stdout)
    assert first.startswith("sph_") and len(first) > 40
    sphere("project", "grant", "webp", "alice", "--role", "investigator", home=tmp_path)
    core = Core(Settings(home=tmp_path))
    alice = users.authenticate(core, first)
    assert alice is not None and core.catalog.role(core.project("webp").id, alice.id) == (
        "investigator"
    )
    second = token_of(sphere("user", "token", "alice", home=tmp_path).stdout)
    assert users.authenticate(core, first) is None and users.authenticate(core, second)
    # Only a digest is kept: neither token is anywhere in the catalog's bytes.
    assert scan_database(Settings(home=tmp_path).resolved_catalog_url(), [first, second]) == []
    sphere("user", "revoke", "alice", home=tmp_path)
    assert users.authenticate(core, second) is None
    for args, says in [
        (("user", "add", "alice"), "already exists"),
        (("project", "grant", "webp", "nobody"), "no user named"),
        (("project", "grant", "webp", "alice", "--role", "owner"), "unknown role"),
        (("project", "grant", "nope", "alice"), "no project named"),
    ]:
        out = sphere(*args, home=tmp_path, check=False)
        assert out.exit_code == 2 and says in out.stderr and len(out.stderr.splitlines()) == 1
    assert "0 series indexed in webp" in sphere("project", "reindex", "webp", home=tmp_path).stdout
    trail = sphere("audit", home=tmp_path).stdout
    assert "user.add" in trail and "project.grant" in trail and "user.revoke" in trail
    core.close()


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: worker processes import the edge by name
def test_serve_answers_health_and_refuses_anonymous(tmp_path, workers):
    sphere("project", "create", "webp", home=tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "SPHERE_HOME": str(tmp_path),
        "SPHERE_WEB__PORT": str(port),
        "SPHERE_WEB__HEADER_TIMEOUT_S": "1",
        "SPHERE_WEB__WORKERS": workers,
    }
    proc = subprocess.Popen([*SPHERE, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        r = requests.get(f"http://127.0.0.1:{port}/projects/webp/dicom-web/studies")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.headers["X-Content-Type-Options"] == "nosniff"  # the web edge is in place
        # and so is its protocol: a connection that sends nothing is closed (1 s here).
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            assert idle.recv(10) == b""
    finally:
        proc.terminate()
        proc.wait(20)


def test_waiting_for_a_server_that_ended_fails_at_once_with_its_stderr():
    """wait_healthy's control: a server that exits is reported (exit code, stderr's tail), not
    waited for until the deadline."""
    exits = "import sys; sys.stderr.write('cannot bind'); sys.exit(3)"
    proc = subprocess.Popen([sys.executable, "-c", exits], stderr=subprocess.PIPE, text=True)
    proc.wait(30)
    with pytest.raises(AssertionError, match="exit 3:\\ncannot bind"):
        wait_healthy(f"http://127.0.0.1:{free_port()}", proc, timeout_s=3600)


def test_serve_on_a_wrong_home_is_one_line(tmp_path):
    out = sphere("serve", home=tmp_path / "missing", check=False)
    assert out.exit_code == 2 and "no catalog" in out.stderr
