"""A project's retention end: set by hand (`set_retention`), else the approval's expiry plus
`Settings.retention_grace_days`. Past it, the project's data is purged (`gateway.purge`)."""

from __future__ import annotations

from datetime import date, timedelta

from core.core import Core
from core.errors import ProjectError
from storage.catalog import Project


def retention_end(core: Core, project: Project) -> date | None:
    """The last day the project's data is kept; None while it has no approval to measure from."""
    row = core.catalog.retention(project.id)
    if row is not None:
        return row.retain_until
    if project.expires_on is None:
        return None
    return project.expires_on + timedelta(days=core.settings.retention_grace_days)


def set_retention(core: Core, name: str, until: date, *, reason: str = "", actor: str = "") -> None:
    """Keep a project's data until `until` (audited), instead of expiry plus grace."""
    project = core.project(name)
    if project.status == "purged":
        raise ProjectError(f"project '{name}' is purged: nothing is kept to retain")
    actor = actor or core.actor
    core.catalog.set_retention(project.id, until, by=actor, reason=reason)
    core.catalog.audit(actor, "project.retain", name, until=until, reason=reason)
