"""The `sphere` command line, run as a user would (a subprocess), including the demo."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SPHERE = [sys.executable, "-m", "gateway.cli"]


def sphere(
    *args: str, home: Path, check: bool = True, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPHERE_HOME": str(home), "COLUMNS": "200"}
    env.update(extra_env)
    out = subprocess.run([*SPHERE, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def first_admin(home: Path) -> None:
    """Make the OS account running the tests the home's admin (commands that check the role
    table, such as `sphere audit`, act as it)."""
    from core import Core, Settings, users

    with Core(Settings(home=home), create=True) as c:
        users.first_admin(c)


def test_help_explains_every_command(tmp_path):
    out = sphere("--help", home=tmp_path).stdout
    for cmd in ("project", "cohort", "pull", "status", "audit", "echo", "demo", "deid"):
        assert cmd in out


def wrapped_summaries(command: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Commands whose summary (the help's first paragraph) spans lines: `--help` would show
    the source's line breaks mid-sentence."""
    out = []
    for name, sub in (getattr(command, "commands", None) or {}).items():
        out += wrapped_summaries(sub, (*path, name))
    if "\n" in (command.help or "").strip().split("\n\n")[0]:
        out.append(" ".join(path))
    return out


def test_every_summary_is_one_line():
    import typer

    from gateway.cli import app

    assert wrapped_summaries(typer.main.get_command(app)) == []
    # Control: a command written as the three offenders were is caught.
    probe = typer.Typer()

    @probe.command()
    def first() -> None:
        """A summary that runs on
        to a second line."""

    @probe.command()
    def second() -> None:
        """One line."""

    assert wrapped_summaries(typer.main.get_command(probe)) == ["first"]


def test_project_lifecycle_from_the_command_line(tmp_path):
    sphere("project", "create", "cli-proj", "--title", "CLI test", home=tmp_path)
    first_admin(tmp_path)
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
    assert refused.returncode == 2 and "not approved" in refused.stderr
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
    assert wrong.returncode == 2 and "unknown de-identification option" in wrong.stderr
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
    assert bad.returncode == 2 and "no project named 'nope'" in bad.stderr


@pytest.mark.peers
def test_demo_runs_end_to_end(tmp_path, umask_022):
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
    lines = out.stdout.splitlines()
    assert "demo OK" in out.stdout and "pull OK" in out.stdout
    # bone density over the pulled project: the phantoms measured or refused, a 80-column table
    assert any(ln.startswith("patient") and "status" in ln for ln in lines)
    assert "bone-density:" in lines
    assert any(re.search(r" ok +\d+\.\d osteopenia$", ln) for ln in lines)
    assert sum(re.search(r" unmeasurable +[-\d]", ln) is not None for ln in lines) == 2
    head = next(i for i, ln in enumerate(lines) if ln.startswith("patient"))
    table = lines[head : next(i for i, ln in enumerate(lines) if "DICOMweb" in ln)]
    assert max(len(ln) for ln in table) <= 80
    # a viewer user, its token and URL; the server answered, then stopped (no terminal)
    assert any(re.fullmatch(r"token for demo-viewer: sph_\S+", ln) for ln in lines)
    assert any(re.fullmatch(r"viewer: http://127\.0\.0\.1:\d+/ \(sign in .*\)", ln) for ln in lines)
    assert "server check: /healthz ok" in lines
    assert "server check: QIDO-RS found 4 of 4 studies with the token" in lines
    # After a pull, a pipeline run and the server: nothing in the home for group or others.
    from core.home import loose

    assert loose(tmp_path / "demo" / "gateway") == []


# -- a user's mistakes: one clear line, a non-zero status, no traceback ------------------------

FRESH_HOME_COMMANDS = [
    ("status", "p"),
    ("project", "show", "p"),
    ("project", "list"),
    ("project", "approve", "p", "--committee-ref", "C", "--expires-on", "2099-01-01"),
    ("project", "revoke", "p"),
    ("cohort", "add", "p", "--accession", "A1"),
    ("pull", "p"),
    ("audit",),
    ("deid", "/etc/hostname", "--project", "p", "--out", "out"),
    ("vault", "audit"),
    ("vault", "lookup", "P123", "--project", "p"),
    ("vault", "grant", "ttp"),
]


def one_error_line(out: Any) -> str:
    """The one line a failed command printed (a subprocess's result, or CliRunner's)."""
    code = getattr(out, "returncode", getattr(out, "exit_code", None))
    assert code == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("args", FRESH_HOME_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_a_wrong_home_is_one_clear_line_and_nothing_is_created(tmp_path, args):
    from typer.testing import CliRunner

    from gateway.cli import app

    home = tmp_path / "no-such-home"
    # In process (the same error handling as the executable, which the tests below run).
    out = CliRunner().invoke(app, list(args), env={"SPHERE_HOME": str(home)})
    line = one_error_line(out)
    assert "no-such-home" in line and "SPHERE_HOME" in line
    assert not home.exists()


def test_a_missing_project_is_one_clear_line(tmp_path):
    sphere("project", "create", "real", home=tmp_path)
    for args in [("status", "nope"), ("pull", "nope"), ("project", "show", "nope"),
                 ("deid", "/etc/hostname", "--project", "nope", "--out", str(tmp_path / "o")),
                 ("cohort", "add", "nope", "--accession", "A")]:  # fmt: skip
        assert "no project named 'nope'" in one_error_line(
            sphere(*args, home=tmp_path, check=False)
        )
    bad_date = sphere("project", "approve", "real", "--committee-ref", "C", "--expires-on",
                      "next year", home=tmp_path, check=False)  # fmt: skip
    assert "YYYY-MM-DD" in one_error_line(bad_date)


def test_a_pacs_that_is_down_is_one_clear_line(tmp_path, monkeypatch):
    from harness.localpacs import free_port

    monkeypatch.setenv("SPHERE_PACS__PORT", str(free_port()))  # nobody listens there
    monkeypatch.setenv("SPHERE_TIMEOUT_S", "3")
    sphere("init", home=tmp_path)  # a home, whose admin (this OS account) may ask
    down = sphere("echo", home=tmp_path, check=False)
    assert "pacs: no answer to C-ECHO" in down.stdout and "Connection refused" in down.stdout
    assert "pacs did not answer" in one_error_line(down)
    sphere("project", "create", "pp", home=tmp_path)
    first_admin(tmp_path)
    sphere("project", "approve", "pp", "--committee-ref", "C", "--expires-on", "2099-01-01",
           home=tmp_path)  # fmt: skip
    sphere("cohort", "add", "pp", "--accession", "ACC-1", home=tmp_path)
    line = one_error_line(sphere("pull", "pp", home=tmp_path, check=False))
    assert "cannot be queried" in line and "ACC-1" not in line
    assert "pull.end" in sphere("audit", "pp", home=tmp_path).stdout


def test_a_corrupt_catalog_is_one_clear_line(tmp_path):
    (tmp_path / "catalog.db").write_text("not a database")
    line = one_error_line(sphere("status", "p", home=tmp_path, check=False))
    assert "catalog database cannot be opened" in line and "SPHERE_CATALOG_URL" in line


def test_an_unexpected_error_is_one_line_without_its_message_unless_verbose(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from core import Core
    from gateway.cli import app

    def broken(self, name):
        raise RuntimeError("a message that could quote DUPONT^JEANNE")

    monkeypatch.setattr(Core, "project", broken)
    env = {"SPHERE_HOME": str(tmp_path)}
    CliRunner().invoke(app, ["project", "create", "pp"], env=env)
    quiet = CliRunner().invoke(app, ["status", "pp"], env=env)
    assert quiet.exit_code == 1 and quiet.stderr.strip().splitlines() == [
        "error: unexpected RuntimeError; run with --verbose to see where"
    ]
    assert "DUPONT" not in quiet.stdout + quiet.stderr
    loud = CliRunner().invoke(app, ["--verbose", "status", "pp"], env=env)
    assert isinstance(loud.exception, RuntimeError)  # the traceback is there when asked


def test_status_fits_80_columns_a_line_per_study(tmp_path):
    from core import Core, Settings

    sphere("project", "create", "wide", home=tmp_path)
    core = Core(Settings(home=tmp_path))
    pid = core.project("wide").id
    keys = core.keys("wide")
    for study in range(3):
        for series in range(4):
            core.catalog.upsert_series(
                pid,
                keys.uid(f"1.2.3.{study}.{series}"),
                study_uid=keys.uid(f"1.2.3.{study}"),
                modality="CT",
                expected=500,
                stored=500 if series else 120,
                status="complete" if series else "failed",
                error=None if series else "received 120 of 500 instances " * 4,
            )
    core.close()
    env_columns = {"COLUMNS": "80"}
    short = sphere("status", "wide", home=tmp_path, **env_columns).stdout.splitlines()
    assert len(short) == 3 + 3  # project line, counts, header, a line per study
    assert all(len(line) <= 80 for line in short), short
    assert short[1] == "3 studies: 3 failed"
    assert all(line.endswith(" 1620/2000  1 failed") for line in short[3:])
    long = sphere("status", "wide", "--series", home=tmp_path).stdout.splitlines()
    assert len(long) > 3 + 3 + 12 and all(len(line) <= 80 for line in long), long
    # One study made whole: counted as complete, and left out of --problems.
    core = Core(Settings(home=tmp_path))
    core.catalog.upsert_series(pid, keys.uid("1.2.3.0.0"), stored=500, status="complete",
                               error=None)  # fmt: skip
    core.close()
    now = sphere("status", "wide", home=tmp_path).stdout.splitlines()
    assert now[1] == "3 studies: 1 complete, 2 failed" and len(now) == 6
    only = sphere("status", "wide", "--problems", home=tmp_path).stdout.splitlines()
    assert len(only) == 3 + 2 and keys.uid("1.2.3.0") not in "\n".join(only)
    assert keys.uid("1.2.3.1") in "\n".join(only)
