"""`sphere user ...` (web users and their tokens), `sphere project grant` (a role in a project),
`sphere project reindex` (the QIDO-RS index from the store) and `sphere serve` (the DICOMweb
server). Mounted on the CLI by `register(app, project_app)`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Annotated, Any

import typer

from core import Core, access, metrics, users, vaultkey
from gateway import logs
from gateway.operator import acting, core

user_app = typer.Typer(help="Sphere users, their roles and API tokens.", no_args_is_help=True)


def _show_token(name: str, token: str) -> None:
    typer.echo(f"token for {name} (shown once; keep it secret):")
    typer.echo(token)


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: str,
    role: Annotated[
        list[str] | None,
        typer.Option(help="A global role (repeatable): " + ", ".join(access.GLOBAL_ROLES)),
    ] = None,
    os_account: Annotated[
        str | None, typer.Option(help="The OS account whose CLI acts as this user.")
    ] = None,
) -> None:
    """Create a sphere user and print its API token (shown once, stored hashed)."""
    c = acting(ctx, "user.add", target=name)
    for r in role or []:  # checked before the user is made: a wrong role creates nothing
        users.check_global_role(r)
    token = users.add(c, name, os_account=os_account)
    for r in role or []:
        users.set_role(c, name, r, by_user=c.operator)
    _show_token(name, token)


@user_app.command("list")
def user_list(ctx: typer.Context) -> None:
    """List users: name, state, global roles, OS account, projects."""
    c = acting(ctx, "user.read")
    for u in c.catalog.users():
        roles = ",".join(sorted(c.catalog.user_roles(u.id))) or "-"
        member = ",".join(f"{p.name}:{r}" for p, r in c.catalog.user_projects(u.id)) or "-"
        state = "active" if u.active else "revoked"
        typer.echo(
            f"{u.name:<20} {state:<8} {roles:<20} {c.catalog.os_account(u.id) or '-':<12} {member}"
        )


@user_app.command("role")
def user_role(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Argument(help=", ".join(access.GLOBAL_ROLES))],
    remove: Annotated[bool, typer.Option("--remove", help="Take the role away.")] = False,
) -> None:
    """Give a user a global role, or take it away (admin; never to oneself)."""
    c = core(ctx)
    users.set_role(c, name, role, by_user=c.operator, remove=remove)
    typer.echo(f"{name} {'no longer holds' if remove else 'holds'} the {role} role")


@user_app.command("map")
def user_map(ctx: typer.Context, name: str, login: str) -> None:
    """Map an OS account to a user: the CLI run from that account acts as the user."""
    users.map_account(acting(ctx, "user.map", target=name), name, login)
    typer.echo(f"OS account {login} acts as {name}")


@user_app.command("token")
def user_token(ctx: typer.Context, name: str) -> None:
    """Give a user a new token: the old one and its sign-in sessions stop working."""
    _show_token(name, users.reissue(acting(ctx, "user.token", target=name), name))


@user_app.command("revoke")
def user_revoke(ctx: typer.Context, name: str) -> None:
    """Disable a user: its token and sessions stop working at once."""
    users.revoke(acting(ctx, "user.revoke", target=name), name)
    typer.echo(f"user {name} revoked")


@user_app.command("enable")
def user_enable(ctx: typer.Context, name: str) -> None:
    """Bring a revoked user back, with a new token."""
    _show_token(name, users.enable(acting(ctx, "user.enable", target=name), name))


def project_grant(
    ctx: typer.Context,
    project: str,
    user: str,
    role: Annotated[str, typer.Option(help="investigator or viewer.")] = "viewer",
) -> None:
    """Give a user a role in a project, by the role table (audited)."""
    c = core(ctx)
    if users.grant(c, project, user, role, by_user=c.operator):
        typer.echo(f"{user} is {role} of {project}")
    else:  # no such user: told only to who may manage users, as for a grant made
        typer.echo(f"{user} is {role} of {project} (if {user} is a sphere user)")


def project_reindex(ctx: typer.Context, project: str) -> None:
    """Rebuild a project's search index from its stored series.

    For series stored before the index existed: the pull indexes what it commits."""
    from core.index import reindex

    c = acting(ctx, "project.reindex", project)
    typer.echo(f"{reindex(c, project)} series indexed in {project}")


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: SPHERE_WEB__HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: SPHERE_WEB__PORT.")] = None,
    workers: Annotated[int | None, typer.Option(help="Default: SPHERE_WEB__WORKERS.")] = None,
    no_jobs: Annotated[
        bool, typer.Option("--no-jobs", help="Serve only: run no jobs on this node.")
    ] = False,
) -> None:
    """Serve the projects' de-identified series over DICOMweb (QIDO-RS, WADO-RS), per user.

    Also runs jobs (unless --no-jobs), in a `sphere worker` process of its own: the trusted
    side, which the web's processes are not."""
    settings = ctx.find_root().obj["settings"]
    c = Core(settings, research=True)  # the research side: the vault stays sealed
    access.require(c, "serve")  # and a wrong home is one clear line now, not in each worker
    metrics.clear_ended()  # counts start afresh with the server
    # The job node and the web worker processes log as this process does.
    os.environ["SPHERE_LOG_FORMAT"] = settings.log_format
    if ctx.find_root().obj["verbose"]:
        os.environ[logs.VERBOSE] = "1"
    node = None if no_jobs else _start_node(settings)
    vaultkey.keep_out_of_environment()  # nor do its worker processes inherit the key
    # uvicorn, stopped by SIGTERM, raises it again once it has shut down: end through the
    # `finally` below (the node stopped), not by the signal's default (this process killed).
    signal.signal(signal.SIGTERM, _stopped)
    try:
        _serve(c, settings, host, port, workers)
    finally:
        if node is not None:
            _stop_node(node, settings.jobs.lease_s)


def _stopped(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _stop_node(node: subprocess.Popen[bytes], wait_s: float) -> None:
    """SIGTERM: the node ends the series in hand and queues its job again for any node."""
    node.terminate()
    try:
        node.wait(max(wait_s, 60))
    except subprocess.TimeoutExpired:  # it still ends, queuing its job, once its series ends
        typer.echo(f"the job node (pid {node.pid}) is still stopping", err=True)


def _start_node(settings: Any) -> subprocess.Popen[bytes]:
    """`sphere worker` beside the server, with this process's environment (the vault key);
    it ends when the server does (`--parent`), however the server ends."""
    env = {**os.environ, "SPHERE_HOME": str(settings.home)}
    cmd = [sys.executable, "-m", "gateway.cli", "worker", "--parent", str(os.getpid())]
    if os.environ.get(logs.VERBOSE) == "1":
        cmd.insert(3, "-v")
    return subprocess.Popen(cmd, env=env)


def _serve(c: Core, settings: Any, host: str | None, port: int | None, workers: int | None) -> None:
    import uvicorn

    web = settings.web
    n = workers or web.workers
    from gateway.web.server import uvicorn_options

    options = uvicorn_options(web, workers=n)
    if n > 1:  # each worker process imports the app and opens its own core from SPHERE_*
        os.environ["SPHERE_HOME"] = str(settings.home)
        uvicorn.run(
            "gateway.web.app:from_environment",
            factory=True,
            host=host or web.host,
            port=port or web.port,
            workers=n,
            **options,
        )
        return
    from gateway.web.app import create_app

    uvicorn.run(create_app(c), host=host or web.host, port=port or web.port, **options)


def register(app: typer.Typer, project_app: typer.Typer) -> None:
    """Mount `user`, `project grant` and `serve` on the main CLI."""
    app.add_typer(user_app, name="user")
    project_app.command("grant")(project_grant)
    project_app.command("reindex")(project_reindex)
    app.command("serve")(serve)
