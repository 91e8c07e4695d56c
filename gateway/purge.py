"""Purges: a project past its retention end (or revoked), and the series of patients who opted
out. One piece of code removes a set of series everywhere — store (series, derived series,
reports), spool, catalog (series, QIDO index, results) — and writes a purge record; a project
purge then sweeps the project's whole prefixes. The audit trail is kept.

    purge_project(core, "bone-2026")        # past its retention end, or revoked
    purge_expired(core)                     # every project past its end (the service, daily)
    opt_out(core, ["PID1"])                 # register, then purge what was stored of them
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from core import Core, ProjectError, SphereError, cohorts, optout
from core.retention import retention_end
from gateway.pull.layout import SpoolLayout
from gateway.pull.lock import ProjectPullLock, PullBusy
from storage.catalog import Project
from storage.objectstore import delete_keys, delete_prefix
from storage.series import series_key

PURGED = "purged"


@dataclass
class Purged:
    """What one purge removed (counts only)."""

    project: str
    series: int = 0
    objects: int = 0
    nbytes: int = 0
    rows: int = 0
    spool_files: int = 0

    def add_store(self, counted: tuple[int, int]) -> None:
        self.objects += counted[0]
        self.nbytes += counted[1]


def store_prefixes(project: str) -> list[str]:
    """Every folder of the store a project's data is under: series (pulled and derived),
    pipeline reports (`processing.outputs.report_key`) and exports (`processing.export`)."""
    return [f"projects/{project}", f"reports/{project}", f"exports/{project}"]


def purge_series(core: Core, project: Project, series: dict[str, str]) -> Purged:
    """Remove these series of a project ({series UID: study UID}, pseudonymous) from the store
    with their reports, from the spool and from the catalog. Not audited here: the caller
    records why."""
    out = Purged(project.name, series=len(series))
    reports = core.catalog.report_keys(project.id, series)
    for uid, study in series.items():
        out.add_store(delete_prefix(core.store, series_key(project.name, study, uid)))
    out.add_store(delete_keys(core.store, reports))
    layout = _layout(core, project.name)
    for uid in series:
        layout.forget(uid)
        layout.clear_notes(uid)
        out.spool_files += _remove_tree(layout.data(uid))
    out.rows = core.catalog.forget_series(project.id, series)
    return out


def purge_allowed(core: Core, project: Project, today: date) -> str | None:
    """Why the project may not be purged today without `now`, or None if it may: it is past
    its retention end, revoked, never approved, or purged already (a re-run finishes one)."""
    if project.status in ("revoked", "declared", PURGED):
        return None
    end = retention_end(core, project)
    if end is not None and today > end:
        return None
    return (
        f"project '{project.name}' is kept until {end.isoformat() if end else '-'} "
        "(retention end); give --now with a --reason to purge it earlier"
    )


def purge_project(
    core: Core,
    name: str,
    *,
    now: bool = False,
    reason: str = "",
    actor: str = "",
    today: date | None = None,
) -> Purged:
    """Purge a project: its status becomes "purged" (nothing pulls or reads it again), then
    its store prefixes, spool, catalog rows (series, index, results, cohort) and the vault's
    cohort values go; the project row, its audit trail and a purge record stay."""
    actor = actor or core.actor
    project = core.project(name)
    problem = purge_allowed(core, project, today or date.today())
    if problem and not now:
        core.catalog.audit(actor, "project.purge", name, "refused", reason=problem)
        raise ProjectError(problem)
    if problem and not reason.strip():
        raise ProjectError("an early purge (--now) needs a --reason, for the audit trail")
    with ProjectPullLock(core.catalog, project, actor):  # PullBusy while a pull runs
        # First: from here on the project is neither pulled nor served, even if this is cut
        # short (a re-run of the purge finishes it).
        core.catalog.update_project(name, status=PURGED)
        out = purge_series(core, project, _all_series(core, project))
        for prefix in store_prefixes(name):
            out.add_store(delete_prefix(core.store, prefix))
        out.spool_files += _remove_tree(_layout(core, name).root)
        out.rows += core.catalog.forget_project_data(project.id)
        out.rows += core.vault.forget_cohort(name)
        core.catalog.exports_deleted(name)  # their zips went with exports/<name>
    why = reason or f"{project.status}, retention end {retention_end(core, project) or '-'}"
    _record(core, out, actor, "project", why)
    return out


def purge_expired(
    core: Core,
    *,
    actor: str = "",
    today: date | None = None,
    on_error: Callable[[str, SphereError], None] | None = None,
) -> list[Purged]:
    """Purge every project past its retention end (what the job nodes run daily). A project
    that cannot be purged now (a pull holds it) raises, or with `on_error` is reported there
    and the others go on."""
    today = today or date.today()
    done = []
    for p in core.catalog.projects():
        end = retention_end(core, p)
        if p.status != PURGED and end is not None and today > end:
            try:
                done.append(purge_project(core, p.name, actor=actor, today=today))
            except SphereError as e:
                if on_error is None:
                    raise
                on_error(p.name, e)
    return done


def opt_out(core: Core, patient_ids: Iterable[str], *, actor: str = "") -> list[Purged]:
    """Register patients' objection, then purge what is stored of them in every project
    (found by their keyed pseudonym in each: what the vault records for them there), the
    exports that hold them included."""
    actor = actor or core.actor
    ids, _new = optout.add(core, patient_ids, actor=actor)
    done, busy = [], []
    for p in core.catalog.projects():
        if p.status == PURGED or not ids:
            continue
        keys = core.keys(p.name)
        _drop_from_cohort(core, p, ids, actor)
        studies: set[str] = set()
        for pid in ids:
            studies |= core.catalog.patient_studies(p.id, keys.pseudonym(pid))
        if not studies:
            continue
        try:
            with ProjectPullLock(core.catalog, p, actor):  # no pull commits theirs meanwhile
                out = purge_series(core, p, core.catalog.study_series(p.id, studies))
                _drop_exports(core, p, {keys.pseudonym(pid) for pid in ids})
        except PullBusy:
            busy.append(p.name)
            continue
        _record(core, out, actor, "optout", "patient opposition")
        done.append(out)
    if busy:
        # The register holds already: those pulls' receivers refuse them from their next
        # association. What they stored before waits for the pull to end.
        core.catalog.audit(actor, "optout.purge", None, "error", busy_projects=len(busy))
        raise PullBusy(
            f"registered, but {', '.join(busy)} is being pulled: give the same command again "
            "when the pull ends, to purge what is stored of them there"
        )
    return done


def _drop_exports(core: Core, project: Project, pseudonyms: set[str]) -> int:
    """Delete the project's exports that hold any of these patients (by pseudonym): their zips
    go, their rows are marked deleted. Returns how many."""
    hit = [
        e
        for e in core.catalog.exports(project.name)
        if e.state != "deleted" and pseudonyms & set(e.patients or ())
    ]
    delete_keys(core.store, [e.key for e in hit])
    for e in hit:
        core.catalog.update_export(e.id, state="deleted")
    return len(hit)


def _drop_from_cohort(core: Core, project: Project, ids: list[str], actor: str) -> None:
    """Take the patients' IDs out of the project's cohort (catalog and vault), where it names
    them by Patient ID (accession numbers and study UIDs stay: the plan drops those studies)."""
    keys = core.keys(project.name)
    theirs = {keys.cohort_digest("patient_id", pid) for pid in ids}
    if any(i.kind == "patient_id" and i.digest in theirs for i in core.catalog.cohort(project.id)):
        cohorts.remove(core, project.name, "patient_id", ids, actor=actor)


def _all_series(core: Core, project: Project) -> dict[str, str]:
    return {r.series_uid: r.study_uid for r in core.catalog.series(project.id)}


def _record(core: Core, out: Purged, actor: str, scope: str, reason: str) -> None:
    counts: dict[str, Any] = {
        "series": out.series,
        "objects": out.objects,
        "nbytes": out.nbytes,
        "rows": out.rows,
    }
    core.catalog.add_purge_record(
        actor=actor, project=out.project, scope=scope, reason=reason, **counts
    )
    action = "project.purge" if scope == "project" else "optout.purge"
    core.catalog.audit(
        actor, action, out.project, reason=reason, spool_files=out.spool_files, **counts
    )


def _layout(core: Core, project: str) -> SpoolLayout:
    return SpoolLayout(core.settings.spool_dir.resolve(), project)


def _remove_tree(root: Path) -> int:
    """Remove a folder of the spool; returns how many files it held."""
    if not root.exists():
        return 0
    n = sum(1 for f in root.rglob("*") if f.is_file())
    shutil.rmtree(root)
    return n
