"""`sphere run bone-density PROJECT` (a pipeline over a project's series, with Dask),
`sphere results PROJECT` (the results table, CSV or Parquet) and `sphere train bone-density`
(a learned vertebral-body segmenter, saved as a MONAI bundle). Mounted by `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from core import Core, Settings, SphereError, access, projects, vaultkey

RIBS_FLAG = "level_from_ribs_only"  # the results' value saying L1 was named from the ribs alone

run_app = typer.Typer(
    help="Run an analysis pipeline over a project's series.", no_args_is_help=True
)
train_app = typer.Typer(help="Train a pipeline's model locally.", no_args_is_help=True)
WIDTH = 80


def _settings(ctx: typer.Context) -> Settings:
    return ctx.find_root().obj["settings"]


@run_app.command("bone-density")
def bone_density(
    ctx: typer.Context,
    project: str,
    scheduler: Annotated[
        str | None, typer.Option(help="Address of a running Dask scheduler (tcp://host:8786).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes of the embedded cluster (default 2).")
    ] = None,
    gpu: Annotated[
        bool, typer.Option("--gpu", help="Run on GPU workers (Dask resource GPU=1).")
    ] = False,
    gpus: Annotated[int, typer.Option(help="GPU workers of the embedded cluster, with --gpu.")] = 1,
    force: Annotated[
        bool, typer.Option("--force", help="Re-run series already done with this version.")
    ] = False,
    model: Annotated[
        Path | None,
        typer.Option(help="A bundle folder from `sphere train bone-density`: learned bodies."),
    ] = None,
    level_rule: Annotated[
        str,
        typer.Option(
            help="both: L1 only where the ribs and the sacrum agree; ribs-if-no-sacrum: also "
            "from the lowest ribs alone where the field ends above the sacrum (flagged)."
        ),
    ] = "both",
) -> None:
    """L1 trabecular attenuation of each eligible CT series: results, SR, SEG and PNG."""
    from processing.bone_density import BoneDensity
    from processing.runner import run_pipeline

    if workers is not None and workers < 1:
        raise SphereError("--workers must be at least 1")
    from processing.bone.levels import RULES

    if level_rule not in RULES:
        raise SphereError(f"--level-rule is one of: {', '.join(RULES)}")
    with Core(_settings(ctx), research=True) as c:  # the research side: no vault
        access.require(c, "pipeline.run", project)
        projects.require_active(c, project, "pipeline.run")
    model_path = None
    if model is not None:
        from processing.bone.learned import load_bundle

        load_bundle(model)  # a missing or corrupt bundle is one line, before any work
        model_path = str(model.resolve())
    vaultkey.keep_out_of_environment()  # the workers are the research side: no key for them
    report = run_pipeline(
        _settings(ctx),
        project,
        BoneDensity(model_path=model_path, level_rule=level_rule),
        scheduler=scheduler,
        workers=workers,
        gpus=max(gpus, 1) if gpu else 0,
        force=force,
    )
    typer.echo(summary_line(report))
    for o in report.outcomes:
        if o.status == "failed":
            typer.echo(f"  failed {o.series_uid[-20:]}: {o.reason}"[:WIDTH])
    for line in where_outputs_are(_settings(ctx), project, report.pipeline):
        typer.echo(line)


def where_outputs_are(settings: Settings, project: str, pipeline: str) -> list[str]:
    """Where a run's outputs are: the table's command, the web page, the store's keys."""
    web = settings.web
    return [
        "outputs:",
        f"  table  sphere results {project} (--csv, --parquet)",
        f"  web    http://{web.host}:{web.port}/projects/{project}/results (sphere serve)",
        f"  store  reports/{project}/{pipeline}/<series>.png: the PNG reports",
        f"         projects/{project}/<study>/<series>: SR and SEG, beside the images",
        f"         in {settings.resolved_storage_url()}",
    ]


def summary_line(report) -> str:
    """A run's counts by status; results whose level came from the ribs alone counted apart."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts().items())) or "nothing to do"
    ribs = sum(1 for o in report.outcomes if o.status == "ok" and o.values.get(RIBS_FLAG))
    if ribs:
        counts += f" ({ribs} ok with the level from ribs only)"
    return f"{report.pipeline} {report.version}: {counts}; {report.already_done} already done"


def results(
    ctx: typer.Context,
    project: str,
    pipeline: Annotated[str | None, typer.Option(help="Only this pipeline.")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", help="Write the table as CSV.")] = None,
    parquet: Annotated[
        Path | None, typer.Option("--parquet", help="Write the table as Parquet (pyarrow).")
    ] = None,
) -> None:
    """Show a project's pipeline results (pseudonymous UIDs); export them as CSV or Parquet."""
    from processing.results import result_rows, write_csv, write_parquet

    with Core(_settings(ctx), research=True) as core:
        access.require(core, "results.read", project)
        if csv is not None or parquet is not None:
            access.require(core, "export", project)
            projects.require_active(core, project, "export")
        rows = result_rows(core, project, pipeline)
    for line in table_lines(rows):
        typer.echo(line)
    if csv is not None:
        write_csv(rows, csv)
        typer.echo(f"{len(rows)} rows written as CSV ({csv.name})"[:WIDTH])
    if parquet is not None:
        write_parquet(rows, parquet)
        typer.echo(f"{len(rows)} rows written as Parquet ({parquet.name})"[:WIDTH])


def table_lines(rows: list[dict]) -> list[str]:
    """Per pipeline (a heading line), patient (pseudonym), shifted study date, series (UID
    tail), status, main value and class; a reason on a line of its own: at most 80 columns."""
    head = f"{'patient':<17} {'date':<10} {'series':<10} {'status':<12} {'value':>6} class"
    lines = [head]
    pipeline = None
    for r in sorted(rows, key=lambda r: r["pipeline"]):
        if r["pipeline"] != pipeline:
            pipeline = r["pipeline"]
            lines.append(f"{pipeline}:"[:WIDTH])
        value = r.get("l1_hu", r.get("body_mean_hu"))
        shown = f"{value:6.1f}" if isinstance(value, int | float) else f"{'-':>6}"
        line = (
            f"{(r['patient'] or '-')[:17]:<17} {(r['study_date'] or '-'):<10} "
            f"…{r['series_uid'][-9:]:<9} {r['status'][:12]:<12} {shown} {r.get('class') or ''}"
        )
        lines.append(line.rstrip()[:WIDTH])
        if r["reason"]:
            lines.append(f"  {r['reason']}"[:WIDTH])
    if not rows:
        lines.append("no results yet: `sphere run bone-density PROJECT`")
    return lines


@train_app.command("bone-density")
def train_bone_density(
    out: Annotated[Path, typer.Option(help="Folder to write the MONAI bundle to.")],
    phantoms: Annotated[
        int, typer.Option(help="Synthetic phantoms made for it (a fifth held out).")
    ] = 12,
    epochs: Annotated[int, typer.Option(help="Passes over the training volumes.")] = 15,
    size: Annotated[int, typer.Option(help="Training crop edge, voxels (2x3x3 mm).")] = 48,
    seed: Annotated[int, typer.Option(help="Seed of phantoms, crops and weights.")] = 0,
    data: Annotated[
        Path | None,
        typer.Option(help="Folder of labelled .npz volumes (image, labels, spacing) to add."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a bundle in OUT.")] = False,
) -> None:
    """Train the vertebral-body segmenter on the CPU and save it as a MONAI bundle."""
    from processing.bone.learned import Recipe, make_data, save_bundle, train
    from processing.bone.phantoms import make_phantom

    if phantoms < 2 or epochs < 1 or size < 16 or size % 4:
        raise SphereError("need --phantoms >= 2, --epochs >= 1, --size >= 16 and a multiple of 4")
    if (out / "models" / "model.pt").exists() and not force:
        raise SphereError(f"{out} already holds a bundle; give --force to overwrite it")
    if data is not None and not data.is_dir():
        raise SphereError(f"--data {data}: not a folder")
    recipe = Recipe(
        phantoms=phantoms,
        epochs=epochs,
        size=size,
        seed=seed,
        data=str(data) if data else None,
    )
    result = train(recipe, make_data(recipe, make_phantom), log=typer.echo)
    save_bundle(result, out)
    typer.echo(
        f"bundle written to {out}: validation Dice {result.val_dice:.3f} on {result.n_val} "
        f"held-out volumes ({result.n_train} trained on, {result.seconds:.0f} s)"
    )


def register(app: typer.Typer) -> None:
    """Mount `run`, `results` and `train` on the main CLI."""
    app.add_typer(run_app, name="run")
    app.add_typer(train_app, name="train")
    app.command("results")(results)
