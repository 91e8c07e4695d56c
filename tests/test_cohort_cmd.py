"""The data manager's view of a cohort, against a real Orthanc: `sphere pull P --plan` (what
would be pulled, nothing retrieved), `sphere status P --problems` (the items no source knows),
`sphere cohort list P` (digests and states; values for the trusted third party only) and
`sphere cohort remove P` (the next pull no longer asks; what is stored stays)."""

from __future__ import annotations

from datetime import date

import pytest
from typer.testing import CliRunner

from core import Core, Settings, users
from gateway.cli import app
from tests.test_pull import corpus, pacs, scp_port  # noqa: F401

pytestmark = pytest.mark.peers


def test_plan_list_problems_and_remove(tmp_path, pacs, scp_port, corpus):  # noqa: F811
    home = tmp_path / "home"
    known = [corpus.studies[0].accession, corpus.studies[1].accession]
    with Core(Settings(home=home, actor="setup"), create=True) as c:
        tokens = {}
        for name, role in (("dan", "data-manager"), ("tess", "trusted-third-party"), ("vic", "")):
            tokens[name] = users.add(c, name)
            if role:
                c.catalog.add_user_role(c.catalog.user(name).id, role, "setup")
    env = {
        "SPHERE_HOME": str(home),
        "SPHERE_PACS__AE_TITLE": pacs.aet,
        "SPHERE_PACS__PORT": str(pacs.dicom_port),
        "SPHERE_PORT": str(scp_port),
        "SPHERE_FSYNC": "false",
        "COLUMNS": "200",
    }
    runner = CliRunner()

    def sphere(who: str, *args: str, code: int = 0) -> str:
        r = runner.invoke(app, list(args), env={**env, "SPHERE_TOKEN": tokens[who]})
        assert r.exit_code == code, r.output
        return r.output

    sphere("dan", "project", "create", "dm")
    sphere("dan", "project", "approve", "dm", "--committee-ref", "C", "--expires-on",
           date(2099, 1, 1).isoformat())  # fmt: skip
    sphere("dan", "cohort", "add", "dm", "--accession", known[0], "--accession", known[1],
           "--accession", "NO-SUCH-ACC")  # fmt: skip

    listed = sphere("dan", "cohort", "list", "dm")
    assert listed.count("not looked up yet") == 3
    assert "NO-SUCH-ACC" not in listed and known[0] not in listed  # digests only

    plan = sphere("dan", "pull", "dm", "--plan")
    (row,) = [line for line in plan.splitlines() if line.startswith("pacs ")]
    studies, series, instances = (int(x) for x in row.split()[1:4])
    expected = [s for st in corpus.studies[:2] for s in st.series]
    assert (studies, series) == (2, len(expected))
    assert instances == sum(s.n_instances for s in expected)
    assert "estimate" in plan and "1 no source knows" in plan
    # sized from the PACS's own answer (64 x 64 x 16 bits an instance), not a typical image
    size = instances * 64 * 64 * 2
    assert row.split()[4] == (f"~{size / 1e6:,.0f}" if size >= 1e6 else f"~{size / 1e3:,.0f}")
    assert "typical" not in plan
    assert "NO-SUCH-ACC" not in plan
    with Core(Settings(home=home)) as c:  # nothing was retrieved
        assert c.catalog.series(c.project("dm").id) == []
        trail = c.catalog.audit_trail("dm", action="pull.plan")
        assert len(trail) == 1 and trail[0].actor == "dan"

    problems = sphere("dan", "status", "dm", "--problems")
    assert "1 cohort item(s) no source knows" in problems and "NO-SUCH-ACC" not in problems

    sphere("dan", "pull", "dm")
    listed = sphere("dan", "cohort", "list", "dm")
    assert listed.count("pulled (1 study)") == 2 and listed.count("missing") == 1
    values = sphere("tess", "cohort", "list", "dm")  # the trusted third party sees values
    assert "NO-SUCH-ACC" in values and known[0] in values
    assert "vic may not cohort.read" in sphere("vic", "cohort", "list", "dm", code=2)

    removed = sphere("dan", "cohort", "remove", "dm", "--accession", known[0])
    assert "1 accession item(s) taken out" in removed and "until the project is purged" in removed
    assert "vic may not cohort.remove" in sphere(
        "vic", "cohort", "remove", "dm", "--accession", known[1], code=2
    )
    listed = sphere("dan", "cohort", "list", "dm")
    assert "2 items" in listed
    plan = sphere("dan", "pull", "dm", "--plan")
    (row,) = [line for line in plan.splitlines() if line.startswith("pacs ")]
    assert row.split()[1:3] == ["0", "0"]  # the other study is stored already
    assert f"{len(corpus.studies[1].series)} series already stored" in plan
    with Core(Settings(home=home)) as c:  # what was pulled of the removed item stays
        assert len(c.catalog.complete_series(c.project("dm").id)) == len(expected)
        rows = c.catalog.audit_trail("dm", action="cohort.remove")
        assert {(e.actor, e.outcome) for e in rows} == {("dan", "ok"), ("vic", "refused")}
