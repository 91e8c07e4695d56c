"""`sphere cohort list P` and `sphere cohort remove P ...`: a cohort's items, found, pulled or
missing (values for whoever may read them, digests for the others), and taking items out."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from core import Core, SphereError, access, cohorts

WIDTH = 80


def register(cohort_app: typer.Typer, core: Any) -> None:
    """Add `list` and `remove` to `sphere cohort`; `core(ctx)` opens the command's core."""

    @cohort_app.command("list")
    def cohort_list(ctx: typer.Context, name: str) -> None:
        """A project's cohort items and what became of each: found, pulled, missing."""
        c: Core = core(ctx)
        c.project(name)  # an unknown project says so first
        values = access.may(c, c.operator, "cohort.values", name)
        who = c.operator if values else access.require(c, "cohort.read", name)
        items = cohorts.states(c, name, values=values, actor=who.name)
        if not items:
            typer.echo(f"{name}'s cohort is empty: `sphere cohort add` adds to it")
            return
        shown = "value" if values else "item (keyed digest)"
        typer.echo(f"{'kind':<11} {shown:<34} state")
        for i in items:
            typer.echo(f"{i.kind:<11} {i.value or i.digest:<34} {i.state}")
        missing = sum(i.found == 0 for i in items)
        typer.echo(f"{len(items)} items, {missing} that no source knows")

    @cohort_app.command("remove")
    def cohort_remove(
        ctx: typer.Context,
        name: str,
        accession: Annotated[
            list[str] | None, typer.Option(help="Accession number (repeatable).")
        ] = None,
        patient_id: Annotated[
            list[str] | None, typer.Option(help="Patient ID (repeatable).")
        ] = None,
        study_uid: Annotated[
            list[str] | None, typer.Option(help="Study Instance UID (repeatable).")
        ] = None,
    ) -> None:
        """Take items out of a project's cohort; what was pulled of them stays until a purge."""
        given = {"accession": accession, "patient_id": patient_id, "study_uid": study_uid}
        if not any(given.values()):
            raise SphereError("nothing to remove: give --accession, --patient-id or --study-uid")
        c: Core = core(ctx)
        c.project(name)
        who = access.require(c, "cohort.remove", name)
        for kind, values in given.items():
            if values:
                n = cohorts.remove(c, name, kind, values, actor=who.name)
                typer.echo(f"{n} {kind} item(s) taken out of {name}'s cohort")
        typer.echo(
            "what was already pulled of them stays stored until the project is purged "
            "(`sphere project purge`); the next pull no longer asks for them"
        )


def unknown_lines(c: Core, project_id: int) -> list[str]:
    """For `sphere status P --problems`: the cohort items no source knew at the last pull or
    plan, by digest (`sphere cohort list` shows values to whoever may read them)."""
    missing = [i for i in c.catalog.cohort(project_id) if i.studies_found == 0]
    if not missing:
        return []
    lines = [f"{len(missing)} cohort item(s) no source knows (`sphere cohort list` for more):"]
    return lines + [f"  {i.kind:<11} {i.digest}" for i in missing]
