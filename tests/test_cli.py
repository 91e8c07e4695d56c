"""The `sphere` command line, run as a user would (a subprocess), including the demo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SPHERE = [sys.executable, "-m", "gateway.cli"]


def sphere(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPHERE_HOME": str(home), "SPHERE_ACTOR": "tester", "COLUMNS": "200"}
    out = subprocess.run([*SPHERE, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_help_explains_every_command(tmp_path):
    out = sphere("--help", home=tmp_path).stdout
    for cmd in ("project", "cohort", "pull", "status", "audit", "echo", "demo", "deid"):
        assert cmd in out


def test_project_lifecycle_from_the_command_line(tmp_path):
    sphere("project", "create", "cli-proj", "--title", "CLI test", home=tmp_path)
    (tmp_path / "c.csv").write_text("accession\nA1\nA2\n")
    sphere(
        "cohort",
        "add",
        "cli-proj",
        "--csv",
        str(tmp_path / "c.csv"),
        "--patient-id",
        "P1",
        home=tmp_path,
    )
    refused = sphere("pull", "cli-proj", home=tmp_path, check=False)
    assert refused.returncode == 2 and "not approved" in refused.stdout
    sphere(
        "project",
        "approve",
        "cli-proj",
        "--committee-ref",
        "CSE-9",
        "--expires-on",
        "2099-01-01",
        home=tmp_path,
    )
    shown = sphere("project", "show", "cli-proj", home=tmp_path).stdout
    assert "approved" in shown and "CSE-9" in shown and "2 accession" in shown
    trail = sphere("audit", "cli-proj", home=tmp_path).stdout
    for action in ("project.create", "cohort.add", "pull", "project.approve"):
        assert action in trail
    opts = sphere(
        "project",
        "create",
        "uids-kept",
        "--option",
        "113110",
        "--option",
        "Retain Patient Characteristics Option",
        home=tmp_path,
    )
    assert opts.returncode == 0
    shown = sphere("project", "show", "uids-kept", home=tmp_path).stdout
    assert "Retain UIDs Option" in shown and "Clean Descriptors" not in shown
    wrong = sphere(
        "project", "create", "bad-opt", "--option", "Retain Everything", home=tmp_path, check=False
    )
    assert wrong.returncode == 2 and "unknown de-identification option" in wrong.stdout
    bad = sphere(
        "project",
        "approve",
        "nope",
        "--committee-ref",
        "x",
        "--expires-on",
        "2099-01-01",
        home=tmp_path,
        check=False,
    )
    assert bad.returncode == 2 and "no project named 'nope'" in bad.stdout


@pytest.mark.peers
def test_demo_runs_end_to_end(tmp_path):
    out = sphere(
        "demo",
        "--patients",
        "2",
        "--slices",
        "6",
        "--size",
        "64",
        "--workdir",
        str(tmp_path / "demo"),
        home=tmp_path,
    )
    assert "demo OK" in out.stdout
