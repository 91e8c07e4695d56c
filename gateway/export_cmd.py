"""`sphere export P --format dicom|nifti|zarr [--study UID …] [--modality CT]`,
`sphere export link ID --hours 24`, `sphere export list P`. The exports: `processing.export`;
the links: `gateway.links`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from core import access
from gateway import links


class _ExportGroup(TyperGroup):
    """`sphere export P …` is `sphere export create P …`: a first word that is no sub-command
    is the project."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["create", *args]
        return super().parse_args(ctx, args)


export_app = typer.Typer(
    cls=_ExportGroup,
    help="A project's study set as one zip in the store, and links to download it.",
    no_args_is_help=True,
)


def register(app: typer.Typer, core: Any) -> None:
    """Add `sphere export …`; `core(ctx)` opens the command's core."""
    app.add_typer(export_app, name="export")

    @export_app.command("create")
    def create(
        ctx: typer.Context,
        project: str,
        format: Annotated[str, typer.Option("--format", help="dicom, nifti or zarr.")] = "dicom",
        study: Annotated[
            list[str] | None, typer.Option("--study", help="A (pseudonymous) study UID; repeat.")
        ] = None,
        modality: Annotated[str | None, typer.Option(help="Only series of this modality.")] = None,
    ) -> None:
        """Write the project's stored series (or those chosen) to exports/P/ID.zip in the store."""
        from processing import export

        c = core(ctx)
        row = export.export(c, project, format, studies=study or (), modality=modality)
        typer.echo(
            f"export {row.id}: {row.n_series} series, {row.n_files} files, "
            f"{row.nbytes / 1e6:.1f} MB in {row.key}"
        )
        typer.echo(f"a download link: sphere export link {row.id} --hours 24")

    @export_app.command("link")
    def link(
        ctx: typer.Context,
        export_id: str,
        hours: Annotated[float, typer.Option(help="Hours the link works.")] = 24.0,
    ) -> None:
        """A download URL of an export that stops working after --hours."""
        url, expires = links.link(core(ctx), export_id, hours)
        until = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
        typer.echo(url)
        typer.echo(f"works until {until}", err=True)

    @export_app.command("list")
    def listed(ctx: typer.Context, project: str) -> None:
        """A project's exports: id, format, state, size, who, when."""
        c = core(ctx)
        c.project(project)
        access.require(c, "export", project)
        rows = c.catalog.exports(project)
        if not rows:
            typer.echo("no exports")
        for r in rows:
            typer.echo(
                f"{r.id}  {r.format:<6} {r.state:<8} {r.n_series:>4} series "
                f"{r.nbytes / 1e6:>9.1f} MB  {r.actor}  {r.created_at:%Y-%m-%d %H:%M}"
            )
