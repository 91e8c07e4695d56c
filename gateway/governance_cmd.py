"""`sphere project purge|retain|purges` (retention) and `sphere optout ...` (patient
opposition). Mounted on the CLI by `register(app, project_app)`."""

from __future__ import annotations

import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from core import Core, SphereError, optout
from core.retention import set_retention
from gateway import purge
from gateway.operator import acting

optout_app = typer.Typer(
    help="Patients who object: never pulled again, and what is stored of them purged.",
    no_args_is_help=True,
)
WIDTH = 80


def _confirm(question: str, yes: bool) -> None:
    """Ask at a terminal; without one, `--yes` must say it."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise SphereError("no terminal to confirm at: give --yes")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)


def _purged_line(p: purge.Purged) -> str:
    return (
        f"{p.project}: {p.series} series, {p.objects} objects ({p.nbytes / 1e6:.1f} MB), "
        f"{p.rows} catalog rows, {p.spool_files} spool files removed"
    )[:WIDTH]


# -- retention --------------------------------------------------------------------------------


def project_purge(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="The project (or --expired).")] = None,
    expired: Annotated[
        bool, typer.Option("--expired", help="Every project past its retention end (daily).")
    ] = False,
    now: Annotated[
        bool, typer.Option("--now", help="Before the retention end (needs --reason).")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask (scripts, the service).")] = False,
) -> None:
    """Delete a project's data: store, index, results, reports and spool.

    Its audit trail and a purge record stay; it can never be pulled again."""
    if expired == (name is not None):
        raise SphereError("give a project, or --expired (not both)")
    core = acting(ctx, "project.purge", name)
    if expired:
        _confirm("purge every project past its retention end?", yes)
        done = purge.purge_expired(core)
        for p in done:
            typer.echo(_purged_line(p))
        typer.echo(f"{len(done)} project(s) purged")
        return
    assert name is not None
    core.project(name)  # an unknown project says so before anything is asked
    _confirm(f"delete every image, index row and result of {name}? It cannot be undone", yes)
    typer.echo(_purged_line(purge.purge_project(core, name, now=now, reason=reason)))


def project_retain(
    ctx: typer.Context,
    name: str,
    until: Annotated[str, typer.Option(help="Last day its data is kept (YYYY-MM-DD).")],
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
) -> None:
    """Set a project's retention end (default: approval expiry plus the grace period)."""
    try:
        day = date.fromisoformat(until)
    except ValueError:
        raise SphereError("--until must be a date as YYYY-MM-DD") from None
    set_retention(acting(ctx, "project.approve", name), name, day, reason=reason)
    typer.echo(f"{name}: data kept until {day.isoformat()}")


def project_purges(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Project (default: all).")] = None,
) -> None:
    """Show the purge records: when, by whom, what and how much was removed."""
    rows = acting(ctx, "audit.read", name).catalog.purge_records(name)
    if not rows:
        typer.echo("no purges")
    for r in rows:
        when = r.at.isoformat(timespec="seconds")
        typer.echo(
            f"{when}  {r.actor}  {r.project}  {r.scope}  {r.series} series  "
            f"{r.objects} objects  {r.nbytes} bytes  {r.rows} rows  {r.reason}"
        )


# -- patient opposition -----------------------------------------------------------------------


@optout_app.command("add")
def optout_add(
    ctx: typer.Context,
    patient_id: Annotated[list[str], typer.Option(help="Patient ID (repeatable).")],
) -> None:
    """Register patients' objection and purge what is stored of them, in every project."""
    _opt_out(acting(ctx, "optout.manage"), patient_id)


@optout_app.command("import")
def optout_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with a patient ID column, or one ID a line.")],
) -> None:
    """Register the objection of every patient in a file, and purge what is stored of them."""
    core = acting(ctx, "optout.manage")
    try:
        ids = optout.read_ids(file)
    except OSError as e:
        raise SphereError(f"cannot read {file.name}: {e.strerror}") from None
    _opt_out(core, ids)


@optout_app.command("remove")
def optout_remove(
    ctx: typer.Context,
    patient_id: Annotated[list[str], typer.Option(help="Patient ID (repeatable).")],
) -> None:
    """Withdraw objections: those patients may be pulled again (nothing purged comes back)."""
    n = optout.remove(acting(ctx, "optout.manage"), patient_id)
    typer.echo(f"{n} patient(s) taken off the register")


@optout_app.command("list")
def optout_list(ctx: typer.Context) -> None:
    """How many patients have opted out (the register holds keyed digests, never IDs)."""
    rows = acting(ctx, "optout.manage").catalog.optouts()
    typer.echo(f"{len(rows)} patient(s) opted out")
    if rows:
        first, last = rows[0].added_at.date(), rows[-1].added_at.date()
        typer.echo(f"registered from {first.isoformat()} to {last.isoformat()}")


def _opt_out(core: Core, ids: list[str]) -> None:
    if not [i for i in ids if i.strip()]:
        raise SphereError("no patient ID given")
    done = purge.opt_out(core, ids)
    typer.echo(f"{len(set(i.strip() for i in ids if i.strip()))} patient(s) on the register")
    for p in done:
        typer.echo(_purged_line(p))
    if not done:
        typer.echo("nothing of theirs was stored")


def register(app: typer.Typer, project_app: typer.Typer) -> None:
    """Mount `project purge|retain|purges` and `optout ...`."""
    project_app.command("purge")(project_purge)
    project_app.command("retain")(project_retain)
    project_app.command("purges")(project_purges)
    app.add_typer(optout_app, name="optout")
