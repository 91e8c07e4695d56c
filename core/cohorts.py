"""What a data manager does with a cohort after adding to it: see each item's state (found on
a source, pulled, missing) and take items out. Digests for everyone; the values themselves,
read from the vault (audited there), for whoever may see them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from core import projects
from core.core import Core
from core.errors import ProjectError


@dataclass(frozen=True)
class ItemState:
    """A cohort item: its kind, digest, value (None unless asked for) and what became of it."""

    id: int
    kind: str
    digest: str
    value: str | None
    found: int | None  # studies matched at the last pull or plan; None: never looked up
    pulled: int  # of those, the studies stored whole

    @property
    def state(self) -> str:
        if self.found is None:
            return "not looked up yet"
        if self.found == 0:
            return "missing: no source knows it"
        if self.pulled == self.found:
            return f"pulled ({self.found} {'study' if self.found == 1 else 'studies'})"
        return f"found {self.found}, pulled {self.pulled}"


def states(core: Core, name: str, *, values: bool, actor: str = "") -> list[ItemState]:
    """Every cohort item of a project with its state; `values` reads the originals from the
    vault (audited there with this purpose), else only digests are shown."""
    project = core.project(name)
    originals = {}
    if values:
        entries = projects.cohort(core, name, purpose="cohort list", actor=actor)
        originals = {e.id: e.value for e in entries}
    by_study: dict[str, list[str]] = defaultdict(list)
    for r in core.catalog.series(project.id):
        if r.status != "removed":
            by_study[r.study_uid].append(r.status)
    whole = {study for study, st in by_study.items() if all(s == "complete" for s in st)}
    out = []
    for item in core.catalog.cohort(project.id):
        studies = item.studies or []
        out.append(
            ItemState(
                item.id,
                item.kind,
                item.digest,
                originals.get(item.id),
                item.studies_found,
                sum(1 for s in studies if s in whole),
            )
        )
    core.catalog.audit(
        actor or core.actor, "cohort.read", name, items=len(out), values=bool(values)
    )
    return out


def remove(core: Core, name: str, kind: str, values: Iterable[str], *, actor: str = "") -> int:
    """Take items out of a project's cohort (catalog and vault); how many were in it. What was
    pulled of them stays stored until the project is purged."""
    if kind not in projects.COHORT_KINDS:
        raise ProjectError(f"cohort kind must be one of {', '.join(projects.COHORT_KINDS)}")
    project = core.project(name)
    keys = core.keys(name)
    digests = {keys.cohort_digest(kind, v) for v in values if v and v.strip()}
    gone = core.catalog.remove_cohort_items(project.id, kind, digests)
    core.vault.forget_cohort_items(name, kind, gone)
    core.catalog.audit(
        actor or core.actor, "cohort.remove", name, kind=kind, removed=len(gone), given=len(digests)
    )
    return len(gone)
