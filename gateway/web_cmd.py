"""`sphere user ...` (web users and their tokens), `sphere project grant` (a role in a project),
`sphere project reindex` (the QIDO-RS index from the store) and `sphere serve` (the DICOMweb
server). Mounted on the CLI by `register(app, project_app)`."""

from __future__ import annotations

from typing import Annotated

import typer

from core import Core, users, vaultkey

user_app = typer.Typer(help="Web users and their API tokens.", no_args_is_help=True)


def _core(ctx: typer.Context) -> Core:
    return Core(ctx.find_root().obj["settings"])


def _show_token(name: str, token: str) -> None:
    typer.echo(f"token for {name} (shown once; keep it secret):")
    typer.echo(token)


@user_app.command("add")
def user_add(ctx: typer.Context, name: str) -> None:
    """Create a web user and print its API token (shown once, stored hashed)."""
    _show_token(name, users.add(_core(ctx), name))


@user_app.command("token")
def user_token(ctx: typer.Context, name: str) -> None:
    """Give a user a new token: the old one and its sign-in sessions stop working."""
    _show_token(name, users.reissue(_core(ctx), name))


@user_app.command("revoke")
def user_revoke(ctx: typer.Context, name: str) -> None:
    """Disable a user: its token and sessions stop working at once."""
    users.revoke(_core(ctx), name)
    typer.echo(f"user {name} revoked")


def project_grant(
    ctx: typer.Context,
    project: str,
    user: str,
    role: Annotated[str, typer.Option(help="investigator or viewer.")] = "viewer",
) -> None:
    """Give a web user a role in a project (as the data manager; audited)."""
    users.grant(_core(ctx), project, user, role)
    typer.echo(f"{user} is {role} of {project}")


def project_reindex(ctx: typer.Context, project: str) -> None:
    """Rebuild a project's search index from its stored series.

    For series stored before the index existed: the pull indexes what it commits."""
    from core.index import reindex

    typer.echo(f"{reindex(_core(ctx), project)} series indexed in {project}")


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Default: SPHERE_WEB__HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: SPHERE_WEB__PORT.")] = None,
    workers: Annotated[int | None, typer.Option(help="Default: SPHERE_WEB__WORKERS.")] = None,
) -> None:
    """Serve the projects' de-identified series over DICOMweb (QIDO-RS, WADO-RS), per user."""
    import uvicorn

    settings = ctx.find_root().obj["settings"]
    core = Core(settings, research=True)  # the research side: the vault stays sealed
    vaultkey.keep_out_of_environment()  # nor do its worker processes inherit the key
    core.catalog  # noqa: B018 - a wrong home is one clear line now, not in each worker
    web = settings.web
    n = workers or web.workers
    from gateway.web.server import uvicorn_options

    options = uvicorn_options(web, workers=n)
    if n > 1:  # each worker process imports the app and opens its own core from SPHERE_*
        import os

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

    uvicorn.run(create_app(core), host=host or web.host, port=port or web.port, **options)


def register(app: typer.Typer, project_app: typer.Typer) -> None:
    """Mount `user`, `project grant` and `serve` on the main CLI."""
    app.add_typer(user_app, name="user")
    project_app.command("grant")(project_grant)
    project_app.command("reindex")(project_reindex)
    app.command("serve")(serve)
