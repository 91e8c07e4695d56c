"""`sphere audit [P] [--user U --action A --since D --until D]` and `sphere audit verify`."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

import typer

from core import Core, SphereError, access


def parse_when(text: str, option: str, *, end: bool = False) -> datetime:
    """A date (YYYY-MM-DD: the day's start, or with `end` the next day's) or an ISO datetime
    (UTC unless it says its offset), as the naive UTC the trail is kept in."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime.combine(day + timedelta(days=1) if end else day, time())
        at = datetime.fromisoformat(text)
    except ValueError:
        raise SphereError(
            f"{option} must be a date (YYYY-MM-DD) or an ISO date and time (YYYY-MM-DDTHH:MM)"
        ) from None
    return at.astimezone(UTC).replace(tzinfo=None) if at.tzinfo else at


def register(app: typer.Typer, core: Any) -> None:
    """Add `sphere audit` to the CLI; `core(ctx)` opens the command's core."""

    @app.command()
    def audit(
        ctx: typer.Context,
        name: Annotated[
            str | None,
            typer.Argument(help="Project (default: all), or `verify` to check the chain."),
        ] = None,
        user: Annotated[str | None, typer.Option(help="Rows of this actor only.")] = None,
        action: Annotated[
            str | None,
            typer.Option(help="Rows of this action only; `wado.*` for those starting so."),
        ] = None,
        since: Annotated[
            str | None, typer.Option(help="From this date or ISO datetime (UTC).")
        ] = None,
        until: Annotated[
            str | None, typer.Option(help="Up to this date (included) or ISO datetime (UTC).")
        ] = None,
        limit: Annotated[int, typer.Option(help="Most recent rows.")] = 50,
    ) -> None:
        """Show the audit trail: who did what, when, from where; `sphere audit verify` checks it."""
        start = parse_when(since, "--since") if since else None
        end = parse_when(until, "--until", end=True) if until else None
        c: Core = core(ctx)
        if name == "verify":
            verify(c)
            return
        known = name is None or c.catalog.project(name) or c.catalog.audited_project(name)
        if not known:  # (a project gone whose trail is kept is still shown)
            raise SphereError(f"no project named '{name}' (see `sphere project list`)")
        access.require(c, "audit.read", name)
        rows = c.catalog.audit_trail(name, limit, actor=user, action=action, since=start, until=end)
        for e in rows:
            when = e.at.isoformat(timespec="seconds")
            typer.echo(
                f"{when}  {e.actor}  {e.action}  {e.project or '-'}  {e.outcome}  {e.detail}"
            )


def verify(c: Core) -> None:
    """Walk the chain: one line, exit 1 at the first row edited, inserted or deleted."""
    access.require(c, "audit.verify")
    check = c.catalog.verify_audit()
    if check.problem:
        typer.echo(check.line(), err=True)
        raise typer.Exit(1)
    typer.echo(check.line())
