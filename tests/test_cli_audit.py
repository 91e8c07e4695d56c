"""`sphere audit` as a user runs it: filters, an unknown project, a bad date, a reader that
stops early (`| head -1`), and `sphere audit verify` on an intact and an edited trail."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess

from core import Core, Settings
from tests.test_cli import SPHERE, first_admin, one_error_line, sphere


def test_filters_and_mistakes(tmp_path):
    sphere("project", "create", "aud", home=tmp_path)
    first_admin(tmp_path)
    with Core(Settings(home=tmp_path)) as c:
        n = len(c.catalog.audit_trail(limit=1000))
        c.catalog.audit("zoe", "cohort.add", "aud", added=1)
        c.catalog.audit("zoe", "cohort.add", "other", added=2)
        c.catalog.audit("ann", "cohort.remove", "aud", removed=1)
    rows = sphere("audit", "aud", home=tmp_path).stdout.splitlines()
    assert len(rows) == 3 and all("  aud  " in r for r in rows)
    by_zoe = sphere("audit", "--user", "zoe", home=tmp_path).stdout.splitlines()
    assert len(by_zoe) == 2 and all("cohort.add" in r for r in by_zoe)
    zoe_aud = sphere("audit", "aud", "--user", "zoe", home=tmp_path).stdout.splitlines()
    assert len(zoe_aud) == 1 and '"added": 1' in zoe_aud[0]
    cohort = sphere("audit", "--action", "cohort.*", home=tmp_path).stdout.splitlines()
    assert len(cohort) == 3
    assert sphere("audit", "--since", "2999-01-01", home=tmp_path).stdout == ""
    everything = sphere("audit", "--until", "2999-01-01", "--limit", "1000", home=tmp_path)
    assert len(everything.stdout.splitlines()) == n + 3
    window = sphere("audit", "--since", "2000-01-01T00:00", "--until", "2999-12-31",
                    "--user", "ann", home=tmp_path)  # fmt: skip
    assert len(window.stdout.splitlines()) == 1
    assert "no project named 'nope'" in one_error_line(
        sphere("audit", "nope", home=tmp_path, check=False)
    )
    for option in ("--since", "--until"):
        line = one_error_line(sphere("audit", option, "last week", home=tmp_path, check=False))
        assert option in line and "YYYY-MM-DD" in line


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    sphere("project", "create", "long", home=tmp_path)
    first_admin(tmp_path)
    with Core(Settings(home=tmp_path)) as c:  # enough rows to fill the pipe
        c.catalog.audit_many(
            [
                {
                    "actor": "x",
                    "action": "y",
                    "project": "long",
                    "detail": {"i": i, "pad": "z" * 300},
                }
                for i in range(2000)
            ]  # fmt: skip
        )
    env = {**os.environ, "SPHERE_HOME": str(tmp_path), "SPHERE_ACTOR": "tester"}
    cmd = " ".join(SPHERE) + " audit --limit 5000 | head -1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                         env=env, timeout=120)  # fmt: skip
    assert out.stderr == "" and len(out.stdout.splitlines()) == 1
    assert out.returncode == 0


def test_verify_an_intact_trail_then_an_edited_row(tmp_path):
    sphere("project", "create", "chain", home=tmp_path)
    first_admin(tmp_path)
    sphere("cohort", "add", "chain", "--accession", "A1", home=tmp_path)
    ok = sphere("audit", "verify", home=tmp_path)
    assert re.match(r"\d+ rows, chain intact \(head [0-9a-f]{64}\)$", ok.stdout.strip())
    with sqlite3.connect(tmp_path / "catalog.db") as db:
        db.execute("UPDATE audit SET detail = '{\"added\": 0}' WHERE id = 2")
    bad = sphere("audit", "verify", home=tmp_path, check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "audit row 2: edited: its content no longer matches its hash"


def test_reading_or_verifying_the_trail_is_refused_to_a_viewer(tmp_path):
    from core import users

    sphere("project", "create", "closed", home=tmp_path)
    first_admin(tmp_path)
    with Core(Settings(home=tmp_path)) as c:
        token = users.add(c, "vic")
    for args in (("audit",), ("audit", "closed"), ("audit", "verify")):
        out = sphere(*args, home=tmp_path, check=False, SPHERE_TOKEN=token)
        assert "vic may not audit." in one_error_line(out)
    trail = sphere("audit", "--user", "vic", "--action", "audit.*", home=tmp_path).stdout
    assert trail.count("refused") == 3
