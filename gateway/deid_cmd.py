"""`sphere deid` (de-identify local files with a project's profile) and `sphere vault ...` (the
trusted third party's audited re-identification lookup; who holds that role is the catalog's
say, `core.access`). Mounted on the CLI by `register(app)`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.datadict import dictionary_description
from rich.console import Console
from rich.table import Table

from core import SphereError, access, users
from deid import table as deid_table
from deid.engine import Deidentifier, Quarantined
from deid.profile import Profile
from deid.vault import TRUSTED_THIRD_PARTY
from gateway.operator import acting
from gateway.operator import core as core_of

console = Console()
REPORT_NAME = "deid-report.json"


@dataclass
class DeidRun:
    """What `deidentify_files` did: files written, files quarantined (and why), rule counts."""

    written: list[Path] = field(default_factory=list)
    quarantined: list[tuple[Path, str]] = field(default_factory=list)
    rules: list[tuple[str, str, str, int]] = field(default_factory=list)  # tag, name, action, n

    def to_json(self) -> dict:
        """The report without any path or value: safe to keep next to research data."""
        reasons = Counter(reason for _, reason in self.quarantined)
        return {
            "written": len(self.written),
            "quarantined": dict(sorted(reasons.items())),
            "rules": [{"tag": t, "name": n, "action": a, "count": c} for t, n, a, c in self.rules],
        }


def deidentify_files(files: Iterable[Path], out: Path, deid: Deidentifier) -> DeidRun:
    """De-identify each file into `out` (named by its new SOP Instance UID). A file that cannot be
    read or is quarantined is reported and skipped; the others go on."""
    out.mkdir(parents=True, exist_ok=True)
    run = DeidRun()
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            deid.apply(ds)
        except Quarantined as q:
            run.quarantined.append((path, q.reason))
            continue
        except Exception as e:  # not DICOM, truncated...: say so (type only) and go on
            run.quarantined.append((path, f"unreadable: {type(e).__name__}"))
            continue
        target = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(target, enforce_file_format=True)
        run.written.append(target)
    deid.flush()
    run.rules = rule_counts(deid.stats or Counter())
    return run


def rule_counts(stats: Counter) -> list[tuple[str, str, str, int]]:
    """(tag, attribute name, action, count) rows from the engine's counters, by tag."""
    names = {r.value: r.name for r in deid_table.load() if r.exact}
    rows = []
    for (tag, action), n in stats.items():
        if tag == "private":
            rows.append(("(gggg,eeee)", "private attributes", action, n))
            continue
        name = names.get(tag)
        if name is None:
            try:
                name = dictionary_description(tag)
            except KeyError:
                name = "unknown attribute"
        rows.append((f"({tag >> 16:04X},{tag & 0xFFFF:04X})", name, action, n))
    return sorted(rows)


def deid_command(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="DICOM files to de-identify.")],
    project: Annotated[str, typer.Option(help="Project whose profile and keys to use.")],
    out: Annotated[Path, typer.Option(help="Folder for the de-identified files.")],
    profile_file: Annotated[
        Path | None,
        typer.Option("--profile", help="Try this profile (JSON) instead of the stored one."),
    ] = None,
) -> None:
    """De-identify local files with a project's profile and report what each rule did."""
    profile = None
    if profile_file is not None:
        try:
            profile = Profile.from_json(profile_file.read_text())
        except (OSError, ValueError) as e:
            raise SphereError(f"profile: {e}") from None
    with acting(ctx, "deid.files", project) as core:
        deid = core.deidentifier(project, profile=profile, report=True)
        run = deidentify_files(files, out, deid)
    (out / REPORT_NAME).write_text(json.dumps(run.to_json(), indent=1))
    t = Table("tag", "attribute", "action", "count", title="what each rule did")
    for tag, name, action, n in run.rules:
        t.add_row(tag, name, action, str(n))
    console.print(t)
    for path, reason in run.quarantined:
        console.print(f"[yellow]quarantined[/yellow] {path}: {reason}")
    console.print(
        f"{len(run.written)} written to {out}, {len(run.quarantined)} quarantined; "
        f"report in {out / REPORT_NAME}"
    )


vault_app = typer.Typer(
    help="The re-identification vault (trusted third party only; every use is audited).",
    no_args_is_help=True,
)


@vault_app.command("lookup")
def vault_lookup_command(
    ctx: typer.Context,
    pseudonym: Annotated[str, typer.Argument(help="A pseudonym or pseudonymous UID.")],
    project: Annotated[str, typer.Option(help="The project it belongs to.")],
) -> None:
    """Print the original identifier behind a pseudonym (trusted third party; audited)."""
    with core_of(ctx) as core:
        try:
            access.require(core, "vault.lookup", project)
        except access.NotAllowed:
            # the vault's own trail keeps the try too, as before the catalog decided
            core.vault.audit_denied(project, pseudonym, actor=core.actor)
            raise
        try:
            original = core.vault.lookup(
                project, pseudonym, role=TRUSTED_THIRD_PARTY, actor=core.actor
            )
        except KeyError:
            typer.echo("error: not found in this project's vault", err=True)
            raise typer.Exit(1) from None
    typer.echo(original)


@vault_app.command("grant")
def vault_grant_command(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The sphere user who becomes one.")],
) -> None:
    """Make a sphere user a trusted third party (admin; `sphere user role USER ...`)."""
    with core_of(ctx) as core:
        users.set_role(core, user, TRUSTED_THIRD_PARTY, by_user=core.operator)
    console.print(f"{user} is now a {TRUSTED_THIRD_PARTY}")


@vault_app.command("audit")
def vault_audit_command(
    ctx: typer.Context,
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
) -> None:
    """Show who looked up or granted what, and when."""
    with acting(ctx, "vault.audit", project) as core:
        entries = core.vault.audit_trail(project)
    t = Table("when (UTC)", "actor", "action", "project", "pseudonym", "outcome", "detail")
    for e in entries:
        t.add_row(
            e.at.isoformat(timespec="seconds"),
            e.actor,
            e.action,
            e.project or "",
            e.pseudonym or "",
            e.outcome,
            e.detail or "",
        )
    console.print(t)


def register(app: typer.Typer) -> None:
    """Mount `deid` and `vault` on the main CLI."""
    app.command("deid")(deid_command)
    app.add_typer(vault_app, name="vault")
