"""`sphere requests [P]`, `sphere requests approve ID`, `sphere requests decline ID --reason R`:
the data manager's side of study requests (`core.requests`); investigators make them on the
web (`gateway/web/routes/requests.py`). Approving adds the items to the cohort and queues a
pull (a job, run by a node)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from core import Core, SphereError, access
from core import requests as study_requests
from gateway import jobs
from storage.models import StudyRequest

WIDTH = 100


def request_line(c: Core, r: StudyRequest, project: str) -> str:
    """id, project, who, items, state, when, and what became of it: one line."""
    when = f"{r.requested_at:%Y-%m-%d %H:%M}"
    what = f"{r.n_items} {r.kinds.replace(',', '/')}"
    tail = ""
    if r.state == "declined":
        tail = f"declined: {r.reason}"
    elif r.state == "approved":
        out = study_requests.outcome(c, r)
        n = out.counts if out else {}
        tail = (
            f"job {r.job_id or '-'}; found {n.get('found', 0)}, not found "
            f"{n.get('not_found', 0)}, not looked up {n.get('not_looked_up', 0)}"
        )
    text = (
        f"{r.id:>4} {project:<16} {r.requested_by[:12]:<12} {what:<22} {r.state:<9} {when} {tail}"
    )
    return text.rstrip()[:WIDTH]


def register(app: typer.Typer, core: Any) -> None:
    """Add `sphere requests`; `core(ctx)` opens the command's core."""

    @app.command("requests")
    def requests_cmd(
        ctx: typer.Context,
        what: Annotated[
            str | None, typer.Argument(help="A project, or 'approve' / 'decline'.")
        ] = None,
        request_id: Annotated[int | None, typer.Argument(help="The request's id.")] = None,
        reason: Annotated[
            str, typer.Option(help="Why it is declined (the investigator reads it).")
        ] = "",
    ) -> None:
        """Study requests: list them (pending first), approve one, or decline one with a reason.

        An approved request's items join the cohort and a pull job is queued."""
        c: Core = core(ctx)
        if what in ("approve", "decline"):
            if request_id is None:
                raise SphereError(f"which request? sphere requests {what} ID")
            if what == "approve":
                _approve(c, request_id)
            else:
                study_requests.decline(c, request_id, reason)
                typer.echo(f"request {request_id} declined; the investigator sees why")
            return
        if what is not None:
            c.project(what)
            access.require(c, "request.read", what)
        elif not access.may(c, c.operator, "request.read"):
            access.require(c, "request.read")  # refused, audited
        if access.may(c, c.operator, "request.decide"):
            study_requests.publish_inbox(c)  # the web seals requests to it
        names = {p.id: p.name for p in c.catalog.projects()}
        pid = c.project(what).id if what else None
        rows = [
            r
            for r in c.catalog.requests(pid)
            if access.may(c, c.operator, "request.read", names[r.project_id])
        ]
        rows.sort(key=lambda r: (r.state != "pending", -r.id))
        c.catalog.audit(c.operator.name, "request.read", what, requests=len(rows))
        if not rows:
            typer.echo("no study requests")
            return
        typer.echo(
            f"{'id':>4} {'project':<16} {'by':<12} {'items':<22} {'state':<9} {'requested':<16} "
            "outcome"
        )
        for r in rows:
            typer.echo(request_line(c, r, names[r.project_id]))
        pending = sum(r.state == "pending" for r in rows)
        if pending:
            typer.echo(f"{pending} pending: sphere requests approve ID | decline ID --reason R")


def _approve(c: Core, request_id: int) -> None:
    row, project = study_requests.approve(c, request_id)
    typer.echo(f"request {request_id}: {row.n_items} item(s) joined {project}'s cohort")
    try:
        job = jobs.submit(c, "pull", project)
    except jobs.JobRefused as e:  # a pull queued or running: the next one takes them
        typer.echo(f"no new pull: {e}")
        return
    c.catalog.set_request_job(request_id, job.id)
    typer.echo(f"pull job {job.id} queued (`sphere jobs watch {job.id}`)")
