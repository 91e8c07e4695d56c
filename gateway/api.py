"""The Python API: `Gateway`, the core's parts and the pull behind one object.

gw = Gateway(Settings(home=Path("var")))
gw.create_project("bone-2026", title="Bone density", actor="dm")
gw.approve("bone-2026", committee_ref="CSE-26-001", approved_on=..., expires_on=..., actor="cse")
gw.add_cohort("bone-2026", "accession", ["ACC1", "ACC2"], actor="dm")
report = gw.pull("bone-2026")
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from typing import Any

from core import Core, Settings, home, projects
from deid.keys import ProjectKeys
from deid.profile import Profile
from deid.vault import Vault
from gateway.pull import PullReport, pull
from storage.catalog import Catalog


class Gateway:
    """A gateway home opened from one `Settings` (created if new): projects, cohorts, pulls."""

    def __init__(self, settings: Settings | None = None, *, actor: str | None = None) -> None:
        home.owner_only()  # the home's files and folders: this account's only
        self.core = Core(settings, create=True, actor=actor)
        self.settings = self.core.settings

    @property
    def catalog(self) -> Catalog:
        return self.core.catalog

    @property
    def vault(self) -> Vault:
        return self.core.vault

    @property
    def store(self) -> Any:
        return self.core.store

    @property
    def actor(self) -> str:
        return self.core.actor

    def keys(self, name: str) -> ProjectKeys:
        """The project's keyed pseudonyms, UIDs and date shifts (its secret is in the vault)."""
        return self.core.keys(name)

    def create_project(
        self,
        name: str,
        *,
        title: str = "",
        actor: str | None = None,
        profile: Profile | None = None,
    ) -> None:
        """Declare a project with its de-identification profile (default: `Profile()`)."""
        projects.create(self.core, name, title=title, profile=profile, actor=actor or "")

    def approve(
        self,
        name: str,
        *,
        committee_ref: str,
        approved_on: date,
        expires_on: date,
        actor: str | None = None,
    ) -> None:
        """Record the committee's approval and its validity period."""
        projects.approve(
            self.core,
            name,
            committee_ref=committee_ref,
            approved_on=approved_on,
            expires_on=expires_on,
            actor=actor or "",
        )

    def revoke(self, name: str, *, reason: str = "", actor: str | None = None) -> None:
        """Withdraw the approval: no further pulls."""
        projects.revoke(self.core, name, reason=reason, actor=actor or "")

    def add_cohort(
        self, name: str, kind: str, values: Iterable[str], *, actor: str | None = None
    ) -> int:
        """Add cohort items of one kind; returns how many were new."""
        return projects.add_cohort(self.core, name, kind, values, actor=actor or "")

    def summary(self, name: str) -> projects.ProjectSummary:
        return projects.summary(self.core, name)

    def pull(self, name: str, *, actor: str | None = None, today: date | None = None) -> PullReport:
        """Pull the project's cohort. Raises `PullRefused` when the project may not be pulled."""
        return pull(self.core, name, actor=actor, today=today)

    def close(self) -> None:
        self.core.close()
