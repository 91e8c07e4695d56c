"""What sphere writes on stderr (issue 19, point 4): `--log-format json` is one JSON object a
line for a pull (its SCP worker processes included) and a server (its worker processes and
uvicorn included); at the default verbosity Dask's chatter and library warnings stay out of a
pipeline run, and `-v` shows them. Real `sphere` processes, real Orthanc, a real Dask cluster."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import date, timedelta

import pytest
import requests

from core import Core, Settings, access, projects, users
from harness.localpacs import free_port
from tests.processing_data import body_volume, ct_series, new_project, store_series
from tests.test_cli import SPHERE
from tests.test_pull import approved, corpus, make_gateway, pacs, scp_port  # noqa: F401
from tests.test_pull_faults import env_for
from tests.web_server import wait_healthy

KEYS = {"time", "level", "logger", "message"}


def not_json(text: str) -> list[str]:
    """The lines of `text` that are not one JSON object with time, level, logger, message."""
    bad = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(obj, dict) or not obj.keys() >= KEYS:
            bad.append(line)
    return bad


@pytest.mark.peers
def test_a_pulls_log_is_json_lines(tmp_path, pacs, scp_port, corpus):  # noqa: F811
    gw = make_gateway(tmp_path, pacs, scp_port)
    approved(gw, "logs", [corpus.studies[0].accession])
    env = {**env_for(gw, pacs, scp_port), "SPHERE_RECEIVE_WORKERS": "2"}
    args = [*SPHERE, "--log-format", "json", "-v", "pull", "logs"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(ln) for ln in done.stderr.splitlines() if ln.strip()]
    assert not_json(done.stderr) == [] and len(lines) >= 3
    assert {ln["logger"].split(".")[0] for ln in lines} >= {"gateway"}
    pids = {ln["pid"] for ln in lines}
    assert len(pids) >= 2  # the pull's process and its SCP worker processes, all in JSON
    # Control: the same pull as text is caught by the same check.
    done = subprocess.run(
        [*SPHERE, "-v", "pull", "logs"], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and not_json(done.stderr)


def test_a_servers_log_is_json_lines(tmp_path):
    port = free_port()
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_WEB__PORT": str(port)}
    subprocess.run([*SPHERE, "init"], env=env, capture_output=True, check=True, timeout=60)
    args = [*SPHERE, "--log-format", "json", "-v", "serve", "--workers", "2", "--no-jobs"]
    proc = subprocess.Popen(
        args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    got: list[str] = []  # stderr as it comes: the server is healthy once one worker is up
    reader = threading.Thread(target=lambda: got.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        assert requests.get(f"http://127.0.0.1:{port}/nothing/here").status_code == 404
        until = time.monotonic() + 60.0  # the second worker may still be starting (a busy host)
        while sum("Started server process" in ln for ln in got) < 2 and time.monotonic() < until:
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    err = "".join(got)
    assert not_json(err) == []
    lines = [json.loads(ln) for ln in err.splitlines() if ln.strip()]
    said = " ".join(ln["message"] for ln in lines)
    assert "Started server process" in said  # uvicorn's own lines, in the same format
    assert len({ln["pid"] for ln in lines}) >= 3  # the server and its two worker processes


CHATTER = ("distributed.", "Port 8787", "nvImageCodec", "Warning", "INFO")


def test_dask_and_library_chatter_stay_out_unless_verbose(tmp_path):
    settings = Settings(home=tmp_path, fsync=False)
    new_project(settings, "quiet")
    with Core(settings) as core:
        projects.approve(
            core,
            "quiet",
            committee_ref="T-1",
            approved_on=date.today() - timedelta(days=1),
            expires_on=date.today() + timedelta(days=30),
        )
        token = users.add(core, "dan")
        core.catalog.add_user_role(core.catalog.user("dan").id, access.DATA_MANAGER, "tester")
    store_series(settings, "quiet", ct_series(body_volume(seed=1), seed=1), tmp_path / "sp")
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_TOKEN": token}
    for name in ("PYTHONWARNINGS", "DASK_LOGGING"):
        env.pop(name, None)
    run = ["run", "bone-density", "quiet", "--workers", "1"]
    done = subprocess.run([*SPHERE, *run], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [ln for ln in done.stderr.splitlines() if any(c in ln for c in CHATTER)] == []
    # Control: with -v the same run shows Dask's lines (what the check above looks for).
    done = subprocess.run(
        [*SPHERE, "-v", *run, "--force"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "distributed." in done.stderr
