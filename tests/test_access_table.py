"""The role table, walked whole: every `sphere` command and every HTTP route, as every role,
is allowed or refused as `core.access.ACTIONS` says, and every refusal is in the audit trail.

A command or route that is not named here fails the test (new ones must say what they need),
and the controls show the walk catching a command or a route whose check was left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from core import Core, Settings, access, projects, users
from gateway.cli import app as cli_app
from harness.localpacs import free_port
from storage.models import Export

TODAY = date.today()
DAY = timedelta(days=1)  # approvals meant to be in date run to tomorrow: a run may cross midnight
TABLE = access.allows  # what the table says, kept from the controls that break the rule
# A sphere user for each role; "nobody" holds none, "gone" was revoked.
ROLE_USERS = {
    access.ADMIN: "ada",
    access.DATA_MANAGER: "dan",
    access.TRUSTED_THIRD_PARTY: "tess",
    access.INVESTIGATOR: "ivy",
    access.VIEWER: "val",
    "none": "nobody",
    "revoked": "gone",
}

# -- the command line -------------------------------------------------------------------------

# Commands that act on no home's data, so ask no role: why, each.
CLI_EXEMPT = {
    "init": "starts a home; makes its first admin only while it has none",
    "demo": "runs on a home of its own, which it creates",
    "train bone-density": "trains on synthetic phantoms; reads no home",
}


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]  # after the command's own words; {role} is the role's name
    actions: tuple[str, ...]  # allowed only when every one of these is
    project: str | None = None  # the project it acts on, when no argument names it (a job's)


# command -> what each try runs and which actions it needs ("pp": a declared project, so a
# command let through stops at the project's lifecycle, not at a PACS or a Dask cluster)
CLI_CASES: dict[str, list[Case]] = {
    "project create": [Case(("new-{role}",), ("project.create",))],
    "project approve": [
        Case(("qq", "--committee-ref", "C", "--expires-on", "2099-01-01"), ("project.approve",))
    ],
    "project revoke": [Case(("qq",), ("project.revoke",))],
    "project show": [Case(("pp",), ("project.read",))],
    "project list": [],  # lists what the operator may read: see test_project_list_is_filtered
    "project grant": [Case(("pp", "zed", "--role", "viewer"), ("project.grant",))],
    "project reindex": [Case(("pp",), ("project.reindex",))],
    "cohort add": [
        Case(("pp", "--accession", "A1"), ("cohort.add",)),
        Case(
            ("pp", "--omop", "postgresql://127.0.0.1:9/none", "--cohort-definition", "1"),
            ("cohort.add",),
        ),
    ],
    "omop export": [Case(("pp", "--to", "postgresql://127.0.0.1:9/none"), ("omop.export",))],
    "pull": [Case(("pp",), ("pull",)), Case(("pp", "--plan"), ("pull",))],
    "status": [Case(("pp",), ("project.read",))],
    "echo": [Case((), ("pacs.echo",))],
    "audit": [
        Case((), ("audit.read",)),
        Case(("pp",), ("audit.read",)),
        Case(("verify",), ("audit.verify",)),
    ],
    "deid": [Case(("{tmp}/none.dcm", "--project", "pp", "--out", "{tmp}/deid"), ("deid.files",))],
    "vault lookup": [Case(("PX", "--project", "pp"), ("vault.lookup",))],
    "vault audit": [Case((), ("vault.audit",))],
    "vault grant": [Case(("zed",), ("role.grant",))],
    "run bone-density": [Case(("pp",), ("pipeline.run",))],
    "results": [
        Case(("pp",), ("results.read",)),
        Case(("pp", "--csv", "{tmp}/r.csv"), ("results.read", "export")),
    ],
    "user add": [Case(("u-{role}",), ("user.add",))],
    "user list": [Case((), ("user.read",))],
    "user role": [Case(("zed", "data-manager"), ("role.grant",))],
    "user map": [Case(("zed", "login-zed"), ("user.map",))],
    "user token": [Case(("zed",), ("user.token",))],
    "user revoke": [Case(("zed",), ("user.revoke",))],
    "user enable": [Case(("zed",), ("user.enable",))],
    "serve": [Case((), ("serve",))],
    "project purge": [Case(("qq", "--yes"), ("project.purge",))],
    "project retain": [Case(("qq", "--until", "2099-01-01"), ("project.approve",))],
    "project purges": [Case((), ("audit.read",))],
    "optout add": [Case(("--patient-id", "X1"), ("optout.manage",))],
    "optout import": [Case(("{tmp}/no-such-file.csv",), ("optout.manage",))],
    "optout remove": [Case(("--patient-id", "X1"), ("optout.manage",))],
    "optout list": [Case((), ("optout.manage",))],
    "verify": [Case(("pp",), ("pull",))],
    "cohort list": [Case(("pp",), ("cohort.read",))],  # values only to cohort.values
    "cohort remove": [Case(("pp", "--accession", "A9"), ("cohort.remove",))],
    # job 1 (queued) and 2 (done) are pp's (the fixture); cancel, then watch, then a node
    "jobs submit": [Case(("pull", "pp"), ("jobs.submit",))],
    "jobs cancel": [Case(("1",), ("jobs.cancel",), "pp")],
    "jobs watch": [Case(("2",), ("jobs.read",), "pp")],
    "worker": [Case(("--once",), ("serve",))],  # who runs a node: as who serves
    # pp is declared: an export let through stops at its lifecycle; e1 is pp's (the fixture)
    "export create": [Case(("pp", "--format", "nifti"), ("export",))],
    "export link": [Case(("e1", "--hours", "1"), ("export",), "pp")],
    "export list": [Case(("pp",), ("export",))],
    "requests": [
        Case(("pp",), ("request.read",)),
        Case((), ("request.read",)),  # every project's: a global role's
        Case(("approve", "1"), ("request.decide",)),  # no request 1: refused or "no request"
        Case(("decline", "1", "--reason", "no"), ("request.decide",)),
    ],
}


def leaf_commands(command: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Every runnable command of a click tree, as "group sub"."""
    subs = getattr(command, "commands", None)
    if not subs:
        return [" ".join(path)]
    return [c for name, sub in subs.items() for c in leaf_commands(sub, (*path, name))]


def unnamed(app: typer.Typer) -> list[str]:
    """Commands the table here says nothing about."""
    known = set(CLI_CASES) | set(CLI_EXEMPT)
    return sorted(set(leaf_commands(typer.main.get_command(app))) - known)


@dataclass
class Home:
    settings: Settings
    tokens: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Home:
    tmp = tmp_path_factory.mktemp("table")
    settings = Settings(home=tmp / "home", fsync=False)
    with Core(settings, create=True, actor="setup") as c:
        users.first_admin(c)  # the OS account running the tests, as `sphere init` makes it
        for name in ("pp", "qq", "ww"):
            projects.create(c, name)
        projects.approve(c, "ww", committee_ref="C", approved_on=TODAY, expires_on=TODAY + DAY)
        tokens = {role: users.add(c, name) for role, name in ROLE_USERS.items()}
        users.add(c, "zed")
        for role in access.GLOBAL_ROLES:
            user = c.catalog.user(ROLE_USERS[role])
            assert user is not None
            c.catalog.add_user_role(user.id, role, "setup")
        for project in ("pp", "ww"):
            users.grant(c, project, "ivy", access.INVESTIGATOR)
            users.grant(c, project, "val", access.VIEWER)
        users.revoke(c, "gone")
        c.catalog.submit_job("pull", "pp", {}, "setup")
        c.catalog.submit_job("run", "pp", {"pipeline": "bone-density"}, "setup")
        c.catalog.lease_job("setup", "t", 60)  # job 1: running, then queued again
        c.catalog.end_job(1, "t", "queued", "requeued")
        c.catalog.lease_job("setup", "t2", 60, kinds=("run",))
        c.catalog.end_job(2, "t2", "done", "nothing to do")
        c.catalog.add_export(
            Export(id="e1", project="pp", actor="setup", format="dicom", key="x", state="done")
        )
    return Home(settings, tokens, tmp)


def run_cli(home: Home, role: str, words: list[str], monkeypatch) -> Any:
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)  # `serve` allowed: not served
    env = {
        "SPHERE_HOME": str(home.settings.home),
        "SPHERE_TOKEN": home.tokens[role],
        "SPHERE_PACS__PORT": str(free_port()),  # `echo` allowed: nobody answers, at once
        "SPHERE_TIMEOUT_S": "2",
        "SPHERE_FSYNC": "false",
        "COLUMNS": "200",
    }
    return CliRunner().invoke(cli_app, words, env=env)


def refused_rows(home: Home, since: int) -> list[Any]:
    with Core(home.settings) as c:
        rows = c.catalog.audit_trail(None, 100_000)
    return [r for r in rows if r.id > since and r.outcome == "refused"]


def last_audit_id(home: Home) -> int:
    with Core(home.settings) as c:
        rows = c.catalog.audit_trail(None, 1)
    return rows[0].id if rows else 0


def expected_cli(role: str, actions: tuple[str, ...], project: str | None) -> bool:
    if role == "revoked":
        return False
    held = {role} if role != "none" else set()
    if role in access.PROJECT_ROLES and project != "pp":
        held = set()  # ivy and val hold their roles in p and w only
    return all(TABLE(a, held) for a in actions)


def walk_cli(home: Home, cases: dict[str, list[Case]], monkeypatch) -> list[str]:
    """Run every case as every role; the wrongs found (an empty list: the table holds)."""
    wrong = []
    for command, tries in cases.items():
        for case in tries:
            for role, name in ROLE_USERS.items():
                args = [a.format(role=role.replace("-", ""), tmp=home.tmp) for a in case.args]
                words = [*command.split(), *args]
                project = case.project or ("pp" if "pp" in args else None)
                since = last_audit_id(home)
                out = run_cli(home, role, words, monkeypatch)
                refused = out.exit_code == 2 and (
                    " may not " in out.output or "SPHERE_TOKEN" in out.output
                )
                allowed = expected_cli(role, case.actions, project)
                rows = refused_rows(home, since)
                mine = [r for r in rows if r.actor in (name, "os:" + _login())]
                if allowed and refused:
                    wrong.append(f"{' '.join(words)} as {role}: refused ({out.output.strip()})")
                elif not allowed and not refused:
                    wrong.append(f"{' '.join(words)} as {role}: let through ({out.exit_code})")
                elif refused and not any(
                    r.action in (*case.actions, "operator", "role.grant") for r in mine
                ):
                    wrong.append(f"{' '.join(words)} as {role}: refusal not audited")
                if out.exception and not isinstance(out.exception, SystemExit):
                    wrong.append(f"{' '.join(words)} as {role}: {out.exception!r}")
    return wrong


def _login() -> str:
    import getpass

    return getpass.getuser()


def test_every_command_is_in_the_table():
    assert unnamed(cli_app) == []
    # Control: a command added without saying what it needs is caught.
    probe = typer.Typer()

    @probe.command()
    def pull() -> None:
        """In the table."""

    @probe.command()
    def sneaky() -> None:
        """New, and not in the table."""

    assert unnamed(probe) == ["sneaky"]


def test_every_command_as_every_role(home, monkeypatch):
    assert walk_cli(home, CLI_CASES, monkeypatch) == []


def test_a_command_without_its_check_is_caught(home, monkeypatch):
    # Control: `project show` with its check taken out lets every role through.
    monkeypatch.setattr(access, "require", lambda core, *a, **k: core.operator)
    wrong = walk_cli(home, {"project show": CLI_CASES["project show"]}, monkeypatch)
    assert any("as viewer" not in w and "let through" in w for w in wrong), wrong


def test_project_list_is_filtered(home, monkeypatch):
    for role in ROLE_USERS:
        out = run_cli(home, role, ["project", "list"], monkeypatch)
        if role == "revoked":
            assert out.exit_code == 2
            continue
        listed = {line.split()[0] for line in out.output.splitlines() if line[:1].isalpha()}
        listed.discard("no")
        may = {n for n in ("pp", "qq", "ww") if expected_cli(role, ("project.read",), "pp")}
        if role in access.PROJECT_ROLES:
            may = {"pp", "ww"}
        assert {n for n in listed if n in ("pp", "qq", "ww")} == may, (role, out.output)


# -- the web ----------------------------------------------------------------------------------

WEB_PUBLIC = {"/healthz", "/readyz", "/signin", "/signout"}  # no user needed
# Its own rule, no role's: the metrics token or an allowed address (tests/test_metrics.py).
WEB_SCRAPER = {"/metrics"}
# Any signed-in user, whose own projects only are listed; the viewer's static files.
WEB_SIGNED_IN = {"/", "/viewer", "/viewer/app-config.js", "/viewer/{path:path}"}
# A signed link is its own credential (its signature and time, and the project still open:
# tests/test_export.py); no user, every download audited.
WEB_SIGNED_LINK = {"/exports/{export_id}/download"}
DICOMWEB = "/projects/{project}/dicom-web"
WEB_ACTIONS = {  # else study.read
    ("POST", "/projects/{project}/members"): "project.grant",
    ("POST", "/api/projects/{project}/jobs"): "jobs.submit",
    ("GET", "/api/projects/{project}/jobs"): "jobs.read",
    ("GET", "/projects/{project}/jobs"): "jobs.read",  # the page of the same list
    ("GET", "/projects/{project}/results"): "results.read",
    ("GET", "/projects/{project}/results/{series}/{pipeline}.png"): "results.read",
    ("GET", "/api/projects/{project}/results.{fmt}"): "export",  # as `sphere results --csv`
    ("GET", "/api/projects/{project}/series"): "study.read",  # the remote dataset
    ("GET", "/api/projects/{project}/series/{series}"): "study.read",
    ("GET", "/api/projects/{project}/series/{series}/volume"): "study.read",
    ("GET", "/projects/{project}/exports"): "export",
    ("POST", "/projects/{project}/exports"): "export",
    ("POST", "/projects/{project}/exports/{export_id}/link"): "export",
    ("POST", "/api/projects/{project}/requests"): "request.submit",
    ("GET", "/api/projects/{project}/requests"): "request.read",
    ("POST", "/projects/{project}/requests"): "request.submit",  # the page's form
    ("GET", "/projects/{project}/requests"): "request.read",
}


def web_routes(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route of an app, included routers flattened."""
    out = []
    for r in routes:
        inner = getattr(r, "original_router", None)  # FastAPI's included router
        if inner is not None:
            out += web_routes(inner.routes, prefix + (r.include_context.prefix or ""))
        elif hasattr(r, "routes") and not hasattr(r, "methods"):  # a mount
            out += web_routes(r.routes, prefix + getattr(r, "path", ""))
        else:
            out += [(m, prefix + r.path) for m in sorted(r.methods or {"GET"}) if m != "HEAD"]
    return out


def web_action(method: str, path: str) -> str | None:
    """The action a route needs; None for the public and signed-in-only ones."""
    if path in WEB_PUBLIC | WEB_SIGNED_IN | WEB_SCRAPER | WEB_SIGNED_LINK:
        return None
    if (method, path) in WEB_ACTIONS:
        return WEB_ACTIONS[(method, path)]
    if path.startswith(DICOMWEB + "/"):
        return "study.read"
    raise AssertionError(f"{method} {path} is not in the table")


def concrete(path: str) -> str:
    for name, value in {
        "{project}": "ww",
        "{study}": "1.2.3",
        "{series}": "1.2.3.4",
        "{sop}": "1.2.3.4.5",
        "{frame}": "1",
        "{frames}": "1",
        "{tag}": "7FE00010",
        "{pipeline}": "bone-density",
        "{fmt}": "csv",
        "{export_id}": "e1",
    }.items():
        path = path.replace(name, value)
    return path


def walk_web(home: Home) -> list[str]:
    """Every project route as every role, then the trail: the wrongs found."""
    from gateway.web.app import create_app

    core = Core(home.settings)
    app = create_app(core)
    # The revoked token fails on every route: the per-client limit on failures is not what
    # this walks (tests/test_web_edge.py does), so it is lifted here.
    app.state.failures = type(app.state.failures)(10**6, 60.0)
    tries = []
    since = last_audit_id(home)
    with TestClient(app) as client:
        for method, path in web_routes(app.routes):
            action = web_action(method, path)
            if action is None:
                continue
            for role, name in ROLE_USERS.items():
                headers = {"Authorization": f"Bearer {home.tokens[role]}"}
                body = {"user": "zed", "role": "viewer"} if method == "POST" else None
                r = client.request(method, concrete(path), headers=headers, json=body)
                tries.append((method, path, role, name, action, r.status_code))
    core.close()  # the app's audit buffer was written when the client closed
    with Core(home.settings) as c:
        rows = [r for r in reversed(c.catalog.audit_trail(None, 100_000)) if r.id > since]
    rows = [r for r in rows if "method" in json.loads(r.detail)]  # the requests' own rows
    wrong = []
    if len(rows) != len(tries):
        return [f"{len(tries)} requests, {len(rows)} audit rows"]
    for (method, path, role, name, action, status), row in zip(tries, rows, strict=True):
        held = {role} if role in access.ROLES else set()
        allowed = role != "revoked" and TABLE(action, held)
        marked = json.loads(row.detail).get("refused") == action
        refused = status in (401, 403, 404) and (marked or role == "revoked")
        what = f"{method} {path} as {role} ({status})"
        if allowed and refused:
            wrong.append(f"{what}: refused")
        elif not allowed and not refused:
            wrong.append(f"{what}: let through")
        elif refused and (row.outcome != "refused" or (role != "revoked" and row.actor != name)):
            wrong.append(f"{what}: refusal not audited ({row.actor}, {row.outcome})")
    return wrong


def test_every_route_as_every_role(home):
    assert walk_web(home) == []


def test_a_route_without_its_check_is_caught(home, monkeypatch):
    # Control: the web's rule answering yes to everything lets the viewer grant.
    monkeypatch.setattr(access, "allows", lambda action, roles: True)
    wrong = walk_web(home)
    assert any("members as viewer" in w and "let through" in w for w in wrong), wrong
    assert any("dicom-web" in w and "as none" in w for w in wrong), wrong


def test_unknown_routes_fail_the_walk():
    with pytest.raises(AssertionError, match="not in the table"):
        web_action("GET", "/admin/secrets")


def test_init_makes_the_first_admin_once_and_strangers_get_one_line(tmp_path, monkeypatch):
    env = {"SPHERE_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    first = CliRunner().invoke(cli_app, ["init"], env=env)
    assert first.exit_code == 0 and "first admin" in first.output
    token = first.output.strip().splitlines()[-1]
    again = CliRunner().invoke(cli_app, ["init"], env=env)
    assert again.exit_code == 0 and "has an admin already" in again.output
    # The token works from anywhere (no OS account needed) ...
    with_token = {**env, "SPHERE_TOKEN": token}
    assert CliRunner().invoke(cli_app, ["user", "list"], env=with_token).exit_code == 0
    # ... and an OS account mapped to nobody is told so, in one line, exit 2.
    import getpass

    monkeypatch.setattr(getpass, "getuser", lambda: "stranger")
    out = CliRunner().invoke(cli_app, ["project", "list"], env=env)
    assert out.exit_code == 2 and "you are not a sphere user" in out.output
    assert len(out.output.strip().splitlines()) == 1
    # A token that is no user's is refused the same way.
    bad = CliRunner().invoke(cli_app, ["project", "list"], env={**env, "SPHERE_TOKEN": "sph_x"})
    assert bad.exit_code == 2 and "SPHERE_TOKEN" in bad.output
