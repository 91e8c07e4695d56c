"""`sphere jobs [--project P]`, `sphere jobs submit|watch|cancel`, `sphere worker` (a node that
runs jobs only). The jobs themselves: `gateway.jobs`."""

from __future__ import annotations

import os
import signal
import time
from typing import Annotated, Any

import typer

from core import Core, SphereError, access
from gateway import jobs
from gateway.progress import Display, line
from storage.catalog import Job

jobs_app = typer.Typer(help="Pulls and pipeline runs queued for the nodes.")
WIDTH = 100


def _when(t: Any) -> str:
    return f"{t:%m-%d %H:%M:%S}" if t else "-"


def job_line(j: Job) -> str:
    """id, kind, project, state, progress, node, started, finished, outcome: one line."""
    p = j.progress or {}
    done = f"{p.get('instances', 0)}/{p.get('total', 0)}" if "total" in p else "-"
    what = j.kind + (f":{j.params['pipeline']}" if j.params.get("pipeline") else "")
    text = (
        f"{j.id:>5} {what:<18} {j.project:<16} {j.state:<9} {done:>11} "
        f"{(j.node or '-')[:24]:<24} {_when(j.started_at)} {_when(j.finished_at)} "
        f"{j.outcome or ''}"
    )
    return text.rstrip()


HEADER = (
    f"{'id':>5} {'kind':<18} {'project':<16} {'state':<9} {'instances':>11} {'node':<24} "
    f"{'started':<14} {'finished':<14} outcome"
)


def register(app: typer.Typer, core: Any) -> None:
    """Add `sphere jobs ...` and `sphere worker`; `core(ctx)` opens the command's core."""
    app.add_typer(jobs_app, name="jobs")

    @jobs_app.callback(invoke_without_command=True)
    def jobs_list(
        ctx: typer.Context,
        project: Annotated[str | None, typer.Option(help="Only this project's jobs.")] = None,
        limit: Annotated[int, typer.Option(help="The latest this many.")] = 50,
    ) -> None:
        """The latest jobs: kind, state, progress, node, started, finished, outcome."""
        if ctx.invoked_subcommand is not None:
            return
        c: Core = core(ctx)
        if project is not None:
            c.project(project)
            access.require(c, "jobs.read", project)
        rows = [
            j
            for j in c.catalog.jobs(project, limit=limit)
            if project is not None or access.may(c, c.operator, "jobs.read", j.project)
        ]
        if not rows:
            typer.echo("no jobs: `sphere jobs submit pull PROJECT` queues one")
            return
        typer.echo(HEADER)
        for j in rows:
            typer.echo(job_line(j))

    @jobs_app.command("submit")
    def jobs_submit(
        ctx: typer.Context,
        kind: Annotated[str, typer.Argument(help="pull or run.")],
        project: str,
        pipeline: Annotated[
            str | None, typer.Option(help="For run: the pipeline (bone-density).")
        ] = None,
        level_rule: Annotated[
            str | None,
            typer.Option(help="For run: both (default) or ribs-if-no-sacrum (`sphere run`)."),
        ] = None,
    ) -> None:
        """Queue a pull or a pipeline run for the nodes (`sphere worker`, `sphere serve`)."""
        job = jobs.submit(core(ctx), kind, project, pipeline=pipeline, level_rule=level_rule)
        typer.echo(f"job {job.id} queued: {kind} {project} (`sphere jobs watch {job.id}`)")

    @jobs_app.command("cancel")
    def jobs_cancel(ctx: typer.Context, job_id: int) -> None:
        """Cancel a job: a running one stops at its next heartbeat; what it stored stays."""
        typer.echo(jobs.cancel(core(ctx), job_id))

    @jobs_app.command("watch")
    def jobs_watch(
        ctx: typer.Context,
        job_id: int,
        interval: Annotated[float, typer.Option(help="Seconds between looks.")] = 1.0,
    ) -> None:
        """Follow a job until it ends: a live bar at a terminal, else a line on each change.

        Exit 1 when it failed or was cancelled."""
        c: Core = core(ctx)
        job = _job(c, job_id)
        access.require(c, "jobs.read", job.project, job=job_id)
        display = Display(f"job {job.id} {job.kind} {job.project}")
        state = ""
        try:
            while True:
                job = _job(c, job_id)
                display.update(job.progress or {})
                if job.state != state:
                    state = job.state
                    if not display.live:
                        typer.echo(f"job {job.id}: {state} {job.outcome or ''}".rstrip())
                if state in ("done", "failed", "cancelled"):
                    break
                time.sleep(interval)
        finally:
            display.close()
        if display.live:
            typer.echo(f"job {job.id}: {job.state}: {job.outcome or ''}")
        if job.progress:
            typer.echo(line(job.progress))
        if job.state != "done":
            raise typer.Exit(1)

    @app.command("worker")
    def worker(
        ctx: typer.Context,
        once: Annotated[
            bool, typer.Option("--once", help="Run the queued jobs, then end.")
        ] = False,
        parent: Annotated[
            int | None, typer.Option(hidden=True, help="End when this process ends (serve).")
        ] = None,
    ) -> None:
        """Run jobs on this node, without the web server.

        This node's Storage SCP is SPHERE_AE_TITLE at SPHERE_PORT, which the PACS must know as
        a C-MOVE destination. SIGTERM: the job in hand is queued again."""
        c: Core = core(ctx)
        access.require(c, "serve")  # a node runs what was submitted: who may serve
        if c.settings.jobs.nice:
            os.nice(c.settings.jobs.nice)  # serving first (SPHERE_JOBS__NICE)
        node = jobs.Node(c.settings, parent=parent)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: node.stop())
        typer.echo(f"node {node.name} takes jobs (Ctrl-C to stop)", err=True)
        node.run(once=once)


def _job(c: Core, job_id: int) -> Job:
    job = c.catalog.job(job_id)
    if job is None:
        raise SphereError(f"no job {job_id} (see `sphere jobs`)")
    return job
