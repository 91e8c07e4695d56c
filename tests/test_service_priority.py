"""Serving first (issue 19, point 8): a job node lowers its CPU priority by SPHERE_JOBS__NICE,
so that pulls and runs on a node that also serves take the CPU the web leaves (its receive
workers and pipeline runs inherit it). `benchmarks/bench_service.py` measures the effect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from core import access, users
from core.settings import Settings
from gateway.api import Gateway


def worker_nice(tmp_path, nice: str) -> int:
    """The niceness a `sphere worker` started with SPHERE_JOBS__NICE=`nice` runs at, once it
    takes jobs, less this process's."""
    gw = Gateway(Settings(home=tmp_path))
    token = users.add(gw.core, "dan")
    dan = gw.catalog.user("dan")
    assert dan is not None
    gw.catalog.add_user_role(dan.id, access.DATA_MANAGER, "t")
    gw.close()
    env = {
        **os.environ,
        "SPHERE_HOME": str(tmp_path),
        "SPHERE_TOKEN": token,
        "SPHERE_JOBS__NICE": nice,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # past the point where it set it
            if "takes jobs" in line:
                break
        return psutil.Process(proc.pid).nice() - os.nice(0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_a_job_node_yields_the_cpu_to_serving(tmp_path):
    base = os.nice(0)
    if base >= 19:
        pytest.skip("this process runs at the lowest priority already")
    assert worker_nice(tmp_path / "a", "10") == min(10, 19 - base)
    # control: 0 leaves it at the priority it was started with, the check sees the difference
    assert worker_nice(tmp_path / "b", "0") == 0
