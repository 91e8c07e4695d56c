"""`sphere verify P`: the catalog never says more than the store holds.

Every series the catalog calls complete is read back (storage.series.unreadable: marker,
headers, array metadata, the count; with `deep`, every chunk). One that does not read back is
marked failed with the reason and taken out of the QIDO-RS index, so nobody is offered it and
the next pull fetches it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from core import Core, Unavailable
from storage.objectstore import StorageUnavailable
from storage.series import unreadable

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    project: str
    checked: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # pseudonymous series UID: why

    @property
    def ok(self) -> bool:
        return not self.unreadable


def verify_project(core: Core, name: str, *, deep: bool = False, actor: str = "") -> VerifyReport:
    """Read back every complete series of project `name`; mark what does not read failed.
    Raises `Unavailable` when the store cannot be reached (nothing is marked then)."""
    project = core.project(name)
    actor = actor or core.actor
    catalog = core.catalog
    report = VerifyReport(project.name)
    for row in catalog.series(project.id, status="complete"):
        report.checked += 1
        try:
            problem = unreadable(core.store, row.storage_key or "", row.stored, deep=deep)
        except (StorageUnavailable, ValueError) as e:  # ValueError: a row without a key
            if isinstance(e, StorageUnavailable):
                catalog.audit(actor, "verify", project.name, "error", reason=str(e))
                raise Unavailable(str(e)) from None
            problem = "no storage key"
        if problem:
            report.unreadable[row.series_uid] = problem
            log.warning("series %s does not read back: %s", row.series_uid, problem)
            catalog.upsert_series(
                project.id, row.series_uid, status="failed", error=f"verify: {problem}"
            )
            catalog.unindex_series(project.id, row.series_uid)
            catalog.audit(
                actor,
                "series.unreadable",
                project.name,
                "error",
                series=row.series_uid,
                reason=problem,
            )
    catalog.audit(
        actor,
        "verify",
        project.name,
        "ok" if report.ok else "error",
        deep=deep,
        checked=report.checked,
        unreadable=len(report.unreadable),
    )
    return report
