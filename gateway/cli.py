"""The `sphere` command line. Settings come from SPHERE_* environment variables (see README)."""

from __future__ import annotations

import json
import logging
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gateway import projects
from gateway.config import Settings
from gateway.deid_cmd import register as register_deid_commands

app = typer.Typer(
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
console = Console()
state: dict[str, Settings] = {}


@app.callback()
def main(
    home: Annotated[
        Path | None,
        typer.Option(help="Gateway data folder (catalog, vault, spool, default store)."),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False,
) -> None:
    """Settings come from SPHERE_* environment variables; --home overrides SPHERE_HOME."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    state["settings"] = Settings(home=home) if home else Settings()


def _gateway():  # noqa: ANN202 - imported lazily so `--help` stays fast
    from gateway.api import Gateway

    return Gateway(state.get("settings"))


def _fail(msg: str) -> None:
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


@project_app.command("create")
def project_create(
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
        _gateway().create_project(name, title=title, profile=Profile.from_json(data))
    except (projects.ProjectError, ValueError, OSError) as e:
        _fail(str(e))
    console.print(f"project [bold]{name}[/bold] declared; approve it before pulling")


@project_app.command("approve")
def project_approve(
    name: str,
    committee_ref: Annotated[str, typer.Option(help="Ethics/scientific committee reference.")],
    expires_on: Annotated[str, typer.Option(help="Last day pulls are allowed (YYYY-MM-DD).")],
    approved_on: Annotated[str | None, typer.Option(help="Approval date, default today.")] = None,
) -> None:
    """Record the committee's approval, with its reference and validity period."""
    try:
        _gateway().approve(
            name,
            committee_ref=committee_ref,
            expires_on=date.fromisoformat(expires_on),
            approved_on=date.fromisoformat(approved_on) if approved_on else date.today(),
        )
    except (projects.ProjectError, ValueError) as e:
        _fail(str(e))
    console.print(f"project [bold]{name}[/bold] approved until {expires_on}")


@project_app.command("revoke")
def project_revoke(name: str, reason: Annotated[str, typer.Option()] = "") -> None:
    """Withdraw a project's approval: no further pulls."""
    gw = _gateway()
    try:
        projects.revoke(gw.catalog, name, actor=gw.actor, reason=reason)
    except projects.ProjectError as e:
        _fail(str(e))
    console.print(f"project [bold]{name}[/bold] revoked")


@project_app.command("show")
def project_show(name: str) -> None:
    """Show a project: approval, cohort size, series by status, de-identification profile."""
    try:
        p = _gateway().summary(name)
    except projects.ProjectError as e:
        _fail(str(e))
    t = Table(show_header=False, box=None)
    for k, v in [
        ("name", p.name),
        ("title", p.title),
        ("status", p.status),
        ("committee", p.committee_ref or "-"),
        ("approved on", p.approved_on or "-"),
        ("expires on", p.expires_on or "-"),
        ("cohort", ", ".join(f"{n} {k}" for k, n in p.cohort.items()) or "empty"),
        ("series", ", ".join(f"{n} {k}" for k, n in p.series.items()) or "none"),
        ("de-identification", ", ".join(p.deid_profile.get("options", [])) or "basic"),
    ]:
        t.add_row(f"[bold]{k}[/bold]", str(v))
    console.print(t)


@project_app.command("list")
def project_list() -> None:
    """List projects."""
    t = Table("name", "status", "committee", "expires on", "title")
    for p in projects.list_all(_gateway().catalog):
        t.add_row(p.name, p.status, p.committee_ref or "-", str(p.expires_on or "-"), p.title)
    console.print(t)


@cohort_app.command("add")
def cohort_add(
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
) -> None:
    """Add studies to a project's cohort, by accession number, patient ID or study UID."""
    gw = _gateway()
    given = {
        "accession": accession or [],
        "patient_id": patient_id or [],
        "study_uid": study_uid or [],
    }
    try:
        if csv:
            for kind, values in projects.read_cohort_csv(csv).items():
                given[kind] += values
        if not any(given.values()):
            _fail("nothing to add: give --accession, --patient-id, --study-uid or --csv")
        for kind, values in given.items():
            if values:
                n = gw.add_cohort(name, kind, values)
                console.print(f"{n} new {kind} item(s) in {name}'s cohort")
    except (projects.ProjectError, OSError) as e:
        _fail(str(e))


@app.command()
def pull(name: str) -> None:
    """Pull a project's cohort from the PACS, de-identify it and store it. Re-run to resume."""
    from gateway.pull import PullRefused

    gw = _gateway()
    try:
        report = gw.pull(name)
    except (PullRefused, projects.ProjectError) as e:
        _fail(str(e))
    print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def print_report(report) -> None:  # noqa: ANN001
    """Print a pull's summary: studies, series, instances, bytes, time, where the data is."""
    rate = report.instances / report.seconds if report.seconds else 0.0
    t = Table(show_header=False, box=None)
    for k, v in [
        ("project", report.project),
        ("studies", report.studies),
        (
            "series",
            f"{report.count('complete')} stored, {report.count('skipped')} already "
            f"complete, {report.count('failed')} failed, "
            f"{report.count('quarantined')} quarantined",
        ),
        ("instances", f"{report.instances}"),
        ("quarantined", f"{report.quarantined} instances (reported, not stored)"),
        ("pixel data", f"{report.nbytes / 1e6:.1f} MB"),
        ("time", f"{report.seconds:.1f} s ({rate:.0f} instances/s)"),
        ("unresolved cohort items", report.unresolved),
        ("refused unsolicited", report.refused_unsolicited),
        ("storage", report.storage),
    ]:
        t.add_row(f"[bold]{k}[/bold]", str(v))
    console.print(t)
    for s in report.series:
        if s.error:
            console.print(f"[red]{s.status}[/red] series {s.pseudo_series}: {s.error}")


@app.command()
def status(name: str) -> None:
    """Show a project's series: complete, pending, failed."""
    from sqlalchemy import select

    from storage.catalog import SeriesRecord

    gw = _gateway()
    try:
        p = projects.get(gw.catalog, name)
    except projects.ProjectError as e:
        _fail(str(e))
    t = Table(
        "study (pseudonymous)",
        "series (pseudonymous)",
        "modality",
        "stored/expected",
        "status",
        "note",
    )
    with gw.catalog.session() as s:
        rows = s.scalars(select(SeriesRecord).where(SeriesRecord.project_id == p.id))
        for r in rows:
            t.add_row(
                r.study_uid,
                r.series_uid,
                r.modality,
                f"{r.stored}/{r.expected}",
                r.status,
                r.error or "",
            )
    console.print(t)
    project_show(name)


@app.command()
def echo() -> None:
    """C-ECHO the configured PACS."""
    gw = _gateway()
    from gateway.dimse.scu import DimseError

    try:
        gw.scu().echo(gw.pacs)
    except DimseError as e:
        _fail(str(e))
    console.print(f"PACS {gw.pacs.ae_title} at {gw.pacs.host}:{gw.pacs.port} answered C-ECHO")


@app.command()
def audit(
    name: Annotated[str | None, typer.Argument(help="Project (default: all).")] = None,
    limit: Annotated[int, typer.Option(help="Most recent rows.")] = 50,
) -> None:
    """Show the audit trail: who did what, when."""
    t = Table("when (UTC)", "who", "action", "project", "outcome", "detail")
    for e in _gateway().catalog.audit_trail(name, limit):
        t.add_row(
            e.at.isoformat(timespec="seconds"),
            e.actor,
            e.action,
            e.project or "",
            e.outcome,
            e.detail,
        )
    console.print(t)


@app.command()
def demo(
    patients: Annotated[int, typer.Option(help="Synthetic patients.")] = 4,
    slices: Annotated[int, typer.Option(help="Slices in the thin series of each study.")] = 120,
    size: Annotated[int, typer.Option(help="Rows and columns of each slice.")] = 512,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps everything.")] = Path(
        "demo-data"
    ),
) -> None:
    """Run the whole way once: local Orthanc PACS, synthetic CT, project, approval, pull."""
    from gateway.demo import run_demo

    raise typer.Exit(run_demo(workdir, patients=patients, slices=slices, size=size))


register_deid_commands(app)  # `sphere deid`, `sphere vault …`: beside the de-identification code


if __name__ == "__main__":
    app()
