"""The `sphere` command line. Settings come from SPHERE_* environment variables (see README).

A problem the user can act on (`core.SphereError`: a wrong home, a missing project, a PACS that is
down) is one line on stderr and exit status 2; anything else is one line and status 1, with the
traceback only under `--verbose`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from core import Core, SphereError, Unavailable, access, metrics, projects, users
from core import home as home_files
from core.settings import load_settings
from deid.sealing import Tampered
from gateway import (
    audit_cmd,
    cohort_cmd,
    deid_cmd,
    export_cmd,
    governance_cmd,
    jobs_cmd,
    logs,
    omop_cmd,
    requests_cmd,
    run_cmd,
    views,
    web_cmd,
)
from gateway.operator import acting, core

# `sphere demo` runs this development module (harness/ is the test harness, not shipped).
DEMO_MODULE = "harness.demo"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class _Commands(TyperGroup):
    """Turns errors into one line each, for every command and sub-command."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        # `sphere status P --verbose` as `sphere --verbose status P`: it is the root's option.
        cut = args.index("--") if "--" in args else len(args)
        verbose = [a for a in args[:cut] if a in _VERBOSE]
        rest = [a for a in args[:cut] if a not in _VERBOSE] + args[cut:]
        return super().parse_args(ctx, verbose[:1] + rest)

    def invoke(self, ctx: Any) -> Any:
        try:
            result = super().invoke(ctx)
            sys.stdout.flush()  # here, so a reader gone (`| head -1`) is caught below
            return result
        except BrokenPipeError:
            # The reader has all it wanted: stop quietly, and let nothing flush to it again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, TyperException, KeyboardInterrupt):
            raise
        except SphereError as e:
            _error(str(e))
            raise typer.Exit(2) from None
        except Tampered as e:  # a vault row altered or moved: say so, no traceback
            _error(f"the vault: {e}")
            raise typer.Exit(2) from None
        except Exception as e:
            if _verbose(ctx):
                raise
            _error(f"unexpected {type(e).__name__}; run with --verbose to see where")
            raise typer.Exit(1) from None


_VERBOSE = ("--verbose", "-v")

app = typer.Typer(
    cls=_Commands,
    help="sphere: pull approved research cohorts from a PACS, de-identify and store them as Zarr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
project_app = typer.Typer(
    help="Declare, approve and inspect research projects.", no_args_is_help=True
)
cohort_app = typer.Typer(help="Define a project's cohort.", no_args_is_help=True)
app.add_typer(project_app, name="project")
app.add_typer(cohort_app, name="cohort")


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(help="Gateway data folder (catalog, vault, spool, default store)."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress; tracebacks on errors.")
    ] = False,
    log_format: Annotated[
        LogFormat | None,
        typer.Option(help="Log lines as text or one JSON object each. Default: SPHERE_LOG_FORMAT."),
    ] = None,
) -> None:
    """Settings come from SPHERE_* environment variables; --home overrides SPHERE_HOME."""
    home_files.owner_only()  # all this process and its children write: the owner's only
    settings = load_settings(home)  # one line naming a variable that cannot be read
    if log_format is not None:
        settings.log_format = log_format.value  # and so for the SCP's worker processes
    ctx.call_on_close(logs.setup(verbose, settings.log_format))
    ctx.obj = {"settings": settings, "verbose": verbose}
    # This process and those it starts (SCP workers, web workers) count in the home's folder.
    ctx.call_on_close(metrics.share(settings.home))


def _first_admin(c: Core) -> None:
    made = users.first_admin(c)
    if made is not None:
        name, token = made
        typer.echo(f"this home's first admin is {name} (your OS account); its API token,")
        typer.echo("shown once (keep it secret):")
        typer.echo(token)


def _verbose(ctx: Any) -> bool:
    obj = ctx.find_root().obj
    return bool(obj and obj.get("verbose"))


def _error(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


def _echo_lines(lines: list[str]) -> None:
    for line in lines:
        typer.echo(line)


# -- projects ---------------------------------------------------------------------------------


@app.command()
def init(ctx: typer.Context) -> None:
    """Start a new home: its catalog and vault, and your OS account as its first admin."""
    c = core(ctx, create=True)
    if c.catalog.role_holders(access.ADMIN):
        typer.echo(f"{ctx.obj['settings'].home} has an admin already: nothing to do")
        return
    _first_admin(c)


@project_app.command("create")
def project_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Short name: lower-case letters, digits, - and _.")],
    title: Annotated[str, typer.Option(help="Human title of the study.")] = "",
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="PS3.15 option (repeatable), by name or CID 7050 code, e.g. 113107 or "
            "'Retain UIDs Option'. Replaces the default set: Basic + Retain Longitudinal Modified "
            "Dates + Retain Patient Characteristics + Clean Descriptors."
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(help="De-identification profile JSON (options, safe_private, burned_in)."),
    ] = None,
) -> None:
    """Declare a research project (not yet approved: nothing can be pulled)."""
    from deid.profile import Profile

    try:
        data = json.loads(profile.read_text()) if profile else {}
        if option:
            data["options"] = option
        chosen = Profile.from_json(data)
    except (ValueError, OSError) as e:
        raise SphereError(f"profile: {e}") from None
    c = core(ctx, create=True)
    if not c.catalog.users():  # a new home, as `sphere init` makes it
        _first_admin(c)
    access.require(c, "project.create", name)
    projects.create(c, name, title=title, profile=chosen)
    typer.echo(f"project {name} declared; approve it before pulling")


@project_app.command("approve")
def project_approve(
    ctx: typer.Context,
    name: str,
    committee_ref: Annotated[str, typer.Option(help="Ethics/scientific committee reference.")],
    expires_on: Annotated[str, typer.Option(help="Last day pulls are allowed (YYYY-MM-DD).")],
    approved_on: Annotated[str | None, typer.Option(help="Approval date, default today.")] = None,
) -> None:
    """Record the committee's approval, with its reference and validity period."""
    until = _date(expires_on, "--expires-on")
    projects.approve(
        acting(ctx, "project.approve", name),
        name,
        committee_ref=committee_ref,
        expires_on=until,
        approved_on=_date(approved_on, "--approved-on") if approved_on else date.today(),
    )
    typer.echo(f"project {name} approved until {until.isoformat()}")


@project_app.command("revoke")
def project_revoke(
    ctx: typer.Context,
    name: str,
    reason: Annotated[str, typer.Option(help="Why, for the audit trail.")] = "",
) -> None:
    """Withdraw a project's approval: no further pulls."""
    projects.revoke(acting(ctx, "project.revoke", name), name, reason=reason)
    typer.echo(f"project {name} revoked")


@project_app.command("show")
def project_show(ctx: typer.Context, name: str) -> None:
    """Show a project: approval, cohort size, series by status, de-identification profile."""
    _echo_lines(_project_lines(projects.summary(acting(ctx, "project.read", name), name)))


@project_app.command("list")
def project_list(ctx: typer.Context) -> None:
    """List the projects you may read: name, state (expired included), expiry, title."""
    c = core(ctx)
    me = c.operator
    rows = [p for p in c.catalog.projects() if access.may(c, me, "project.read", p)]
    if not rows:
        typer.echo("no projects yet (that you may read): `sphere project create` declares one")
    today = date.today()
    for p in rows:
        state, until = p.state(today), str(p.expires_on or "-")
        typer.echo(f"{p.name:<24} {state:<9} {until:<10}  {p.title}"[:80])


def _project_lines(p: projects.ProjectSummary) -> list[str]:
    return [
        line
        for k, v in [
            ("name", p.name),
            ("title", p.title),
            ("status", p.status),
            ("committee", p.committee_ref or "-"),
            ("approved on", p.approved_on or "-"),
            ("expires on", p.expires_on or "-"),
            ("kept until", p.retention_end or "-"),
            ("cohort", ", ".join(f"{n} {k}" for k, n in p.cohort.items()) or "empty"),
            ("series", ", ".join(f"{n} {k}" for k, n in p.series.items()) or "none"),
            ("de-identification", ", ".join(p.deid_profile.get("options", [])) or "basic"),
        ]
        for line in views.field(k, str(v))
    ]


def _date(text: str, option: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise SphereError(f"{option} must be a date as YYYY-MM-DD") from None


# -- cohorts ----------------------------------------------------------------------------------


@cohort_app.command("add")
def cohort_add(
    ctx: typer.Context,
    name: str,
    accession: Annotated[
        list[str] | None, typer.Option(help="Accession number (repeatable).")
    ] = None,
    patient_id: Annotated[list[str] | None, typer.Option(help="Patient ID (repeatable).")] = None,
    study_uid: Annotated[
        list[str] | None, typer.Option(help="Study Instance UID (repeatable).")
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(help="CSV file with columns accession, patient_id and/or study_uid."),
    ] = None,
    omop: Annotated[
        str | None, typer.Option(help="An OMOP CDM warehouse (PostgreSQL URL) to read from.")
    ] = None,
    cohort_definition: Annotated[
        int | None, typer.Option(help="With --omop: the cohort table's cohort_definition_id.")
    ] = None,
    omop_sql: Annotated[
        Path | None,
        typer.Option(help="With --omop: a query returning study UIDs or accession numbers."),
    ] = None,
    omop_schema: Annotated[
        str, typer.Option(envvar=omop_cmd.SCHEMA_ENV, help="With --omop: the CDM schema.")
    ] = "public",
    omop_accession_column: Annotated[
        str | None,
        typer.Option(help="With --omop: the column holding the accession number."),
    ] = None,
    omop_procedure_concept: Annotated[
        list[int] | None,
        typer.Option(help="With --omop, no image_occurrence: procedure concepts (repeatable)."),
    ] = None,
) -> None:
    """Add studies to a project's cohort: typed values, a CSV file or an OMOP warehouse.

    By accession number, patient ID or study UID, or from an OMOP warehouse's cohort (--omop
    URL --cohort-definition N, or --omop-sql FILE). The values are kept in the vault; the
    catalog holds only keyed digests of them."""
    if (cohort_definition is not None or omop_sql) and not omop:
        raise SphereError("--cohort-definition and --omop-sql read an OMOP warehouse: give --omop")
    if omop:
        omop_cmd.cohort_add(
            ctx,
            name,
            omop,
            definition=cohort_definition,
            sql_file=omop_sql,
            schema=omop_schema,
            accession_column=omop_accession_column,
            procedure_concepts=omop_procedure_concept or [],
        )
        return
    given = {
        "accession": accession or [],
        "patient_id": patient_id or [],
        "study_uid": study_uid or [],
    }
    if csv:
        try:
            for kind, values in projects.read_cohort_csv(csv).items():
                given[kind] += values
        except OSError as e:
            raise SphereError(f"cannot read {csv}: {e.strerror}") from None
    if not any(given.values()):
        raise SphereError("nothing to add: give --accession, --patient-id, --study-uid or --csv")
    c = acting(ctx, "cohort.add", name)
    for kind, values in given.items():
        if values:
            n = projects.add_cohort(c, name, kind, values)
            typer.echo(f"{n} new {kind} item(s) in {name}'s cohort")


# -- pull and status --------------------------------------------------------------------------


@app.command()
def pull(
    ctx: typer.Context,
    name: str,
    plan: Annotated[
        bool, typer.Option("--plan", help="Say what would be pulled, per source; pull nothing.")
    ] = False,
) -> None:
    """Pull a project's cohort from the PACS, de-identify it and store it. Re-run to resume."""
    from gateway.pull import pull as run_pull
    from gateway.pull.stops import PullStopped

    if plan:
        from gateway.pull.preview import plan_lines, pull_plan

        c = core(ctx)
        c.project(name)
        operator = access.require(c, "pull", name)
        _echo_lines(plan_lines(pull_plan(c, name, actor=operator.name)))
        return
    c = acting(ctx, "pull", name)
    projects.require_active(c, name, "pull")
    try:
        report = run_pull(c, name, on_start=_progress_bar if sys.stderr.isatty() else None)
    except PullStopped as e:  # the summary of what was done, then the one line
        _echo_lines(views.report_lines(e.report))
        raise
    _echo_lines(views.report_lines(report))
    if not report.ok:
        raise typer.Exit(1)


def _progress_bar(puller: Any) -> None:
    """A live bar on stderr while the pull runs (a terminal only), through the progress hook
    a job's heartbeat uses; drawn once the pull has its plan (a refusal draws nothing)."""
    import threading

    from gateway.progress import Display

    bar: list[Display] = []
    done = threading.Event()

    def shown(progress: Any) -> None:
        if not bar:
            bar.append(Display(f"pull {puller.project.name}", live=True))
            threading.Thread(target=poll, daemon=True).start()
        bar[0].update(progress.as_dict())
        if progress.phase == "done":
            done.set()
            bar[0].close()

    def poll() -> None:  # the instances spooled between series, twice a second
        while not done.wait(0.5):
            bar[0].update(puller.progress().as_dict())

    puller.on_progress = shown


@app.command()
def verify(
    ctx: typer.Context,
    name: str,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also read every chunk of every series (slow).")
    ] = False,
) -> None:
    """Read back every series the catalog calls complete; mark the unreadable failed.

    The next pull fetches those again. Exit 1 when one was found."""
    from gateway.pull.readback import verify_project

    report = verify_project(acting(ctx, "pull", name), name, deep=deep)
    for series, why in report.unreadable.items():
        typer.echo(f"unreadable  {series}  {why}")
    typer.echo(
        f"{report.checked} complete series checked, {len(report.unreadable)} unreadable"
        + (" (marked failed: `sphere pull` fetches them again)" if report.unreadable else "")
    )
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def status(
    ctx: typer.Context,
    name: str,
    series: Annotated[
        bool, typer.Option("--series", "-s", help="A line per series, with its notes.")
    ] = False,
    problems: Annotated[
        bool,
        typer.Option(
            "--problems", "-p", help="Only the studies not complete, and cohort items not found."
        ),
    ] = False,
) -> None:
    """Show a project's studies (pseudonymous): series, instances stored, status."""
    c = acting(ctx, "project.read", name)
    p = c.project(name)
    state = p.state(date.today())
    approval = f"until {p.expires_on}" if state == "approved" else ""
    if state == "expired":
        approval = f"on {p.expires_on}"
    typer.echo(f"project {p.name}: {state} {approval}".rstrip())
    lines = views.status_lines(c.catalog.series(p.id), details=series, problems=problems)
    _echo_lines(lines + (cohort_cmd.unknown_lines(c, p.id) if problems else []))


@app.command()
def echo(ctx: typer.Context) -> None:
    """Check that each PACS answers: C-ECHO for DIMSE sources, a QIDO query for DICOMweb."""
    from gateway.pull.retrievers import SourceError, open_retrievers

    silent = []
    for source in open_retrievers(acting(ctx, "pacs.echo"), ""):
        how = "a QIDO query" if source.protocol == "dicomweb" else "C-ECHO"
        try:
            source.echo()
            typer.echo(f"{source.name}: {source} answered {how}")
        except SourceError as e:
            typer.echo(f"{source.name}: no answer to {how}: {e}")
            silent.append(source.name)
    if silent:
        raise Unavailable(f"{', '.join(silent)} did not answer")


@app.command()
def demo(
    patients: Annotated[int, typer.Option(help="Synthetic patients.")] = 4,
    slices: Annotated[int, typer.Option(help="Slices in the thin series of each study.")] = 120,
    size: Annotated[int, typer.Option(help="Rows and columns of each slice.")] = 512,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps everything.")] = Path(
        "demo-data"
    ),
) -> None:
    """Run the whole way once, on a local Orthanc PACS with synthetic CT and spine phantoms.

    Project, approval, pull, bone density, then DICOMweb for a viewer user (until Ctrl-C at
    a terminal). Needs a development install: the demo, its PACS and its synthetic studies
    are the harness's (harness/, not shipped)."""
    try:  # by name, from a development install only: no shipped module imports the harness
        harness_demo = importlib.import_module(DEMO_MODULE)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != DEMO_MODULE.split(".")[0]:  # another one missing
            raise
        raise SphereError(
            "sphere demo needs a development install: run it from a checkout of sphere "
            "(scripts/setup.sh, then make demo); its PACS and synthetic studies come from "
            "the checkout's harness/, which is not shipped"
        ) from None
    raise typer.Exit(harness_demo.run_demo(workdir, patients=patients, slices=slices, size=size))


audit_cmd.register(app, core)
cohort_cmd.register(
    cohort_app, core
)  # `sphere cohort list|remove`  # `sphere audit [P] [filters]`, `sphere audit verify`
deid_cmd.register(app)  # `sphere deid`, `sphere vault …`: beside the de-identification code
web_cmd.register(app, project_app)  # `sphere user …`, `project grant`, `serve`
run_cmd.register(app)  # `sphere run bone-density …`, `sphere results …`
governance_cmd.register(app, project_app)  # `project purge|retain|purges`, `optout …`
jobs_cmd.register(app, core)  # `sphere jobs …`, `sphere worker`
omop_cmd.register(app)  # `sphere omop export`
export_cmd.register(app, core)  # `sphere export …`
requests_cmd.register(app, core)  # `sphere requests [P]`, `requests approve|decline ID`


if __name__ == "__main__":
    app()
