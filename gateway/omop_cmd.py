"""`sphere omop export P --to URL` (the trusted third party writes a project's results to the OMOP
warehouse) and the OMOP side of `sphere cohort add P --omop URL`. Mounted by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core import Core, SphereError, omop_cohort, projects
from gateway.operator import acting
from processing import omop_export

omop_app = typer.Typer(help="Results back to an OMOP CDM warehouse.", no_args_is_help=True)
SCHEMA_ENV = "SPHERE_OMOP_SCHEMA"


def cohort_add(
    ctx: typer.Context,
    name: str,
    url: str,
    *,
    definition: int | None,
    sql_file: Path | None,
    schema: str,
    accession_column: str | None,
    procedure_concepts: list[int],
) -> None:
    """`sphere cohort add P --omop URL ...`: the cohort read from the warehouse."""
    if definition is None and sql_file is None:
        raise SphereError("with --omop, give --cohort-definition N or --omop-sql FILE")
    c: Core = acting(ctx, "cohort.add", name)
    c.project(name)
    with omop_cohort.open_warehouse(url, schema) as wh:
        found = omop_cohort.add(
            c,
            name,
            wh,
            definition=definition,
            sql_file=sql_file,
            accession_column=accession_column,
            procedure_concepts=procedure_concepts,
            actor=c.operator.name,
        )
    typer.echo(f"{found.rows} item(s) read from the warehouse's {found.source}")
    for kind, n in found.added.items():
        typer.echo(f"{n} new {kind} item(s) in {name}'s cohort")


def register(app: typer.Typer) -> None:
    """Add `sphere omop export`."""
    app.add_typer(omop_app, name="omop")

    @omop_app.command("export")
    def export(
        ctx: typer.Context,
        name: str,
        to: Annotated[str, typer.Option("--to", help="The warehouse: a PostgreSQL URL or DSN.")],
        pipeline: Annotated[str, typer.Option(help="Whose results.")] = "bone-density",
        schema: Annotated[
            str, typer.Option(envvar=SCHEMA_ENV, help="The warehouse's CDM schema.")
        ] = "public",
        person_column: Annotated[
            str, typer.Option(help="The person column holding the PACS's Patient ID.")
        ] = "person_source_value",
        accession_column: Annotated[
            str | None,
            typer.Option(help="The procedure_occurrence column holding the accession number."),
        ] = None,
    ) -> None:
        """Write a project's results to the warehouse as OMOP measurement rows.

        On the original persons and dates, with image_feature rows where the imaging tables
        exist; a re-export replaces its own rows. Trusted third party only: it reads the vault."""
        c: Core = acting(ctx, "omop.export", name)
        projects.require_active(c, name, "omop.export", actor=c.operator.name)
        with omop_cohort.open_warehouse(to, schema) as wh:
            report = omop_export.export(
                c,
                name,
                wh,
                pipeline=pipeline,
                person_column=person_column,
                accession_column=accession_column,
                actor=c.operator.name,
            )
        for line in report.lines():
            typer.echo(line)
