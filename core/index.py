"""Rebuild a project's QIDO-RS index from what is stored: for series committed before the
index existed, or after the catalog was restored. The pull indexes each series it commits."""

from __future__ import annotations

from core.core import Core
from storage.series import SeriesReader


def index_stored(core: Core, project_id: int, key: str) -> None:
    """Index one committed series from its stored headers (what the web serves); a series
    indexed before is replaced."""
    reader = SeriesReader(core.store, key)
    core.catalog.index_series(project_id, key, reader.headers(), reader.n_images)


def reindex(core: Core, name: str, *, actor: str = "") -> int:
    """Index every complete series of the project from its stored headers; returns how many."""
    project = core.project(name)
    n = 0
    for row in core.catalog.series(project.id, status="complete"):
        if not row.storage_key:
            continue
        index_stored(core, project.id, row.storage_key)
        n += 1
    core.catalog.audit(actor or core.actor, "project.reindex", name, series=n)
    return n
