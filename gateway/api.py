"""The Python API: one `Gateway` object wires settings, catalog, vault, storage and DICOM peers.

gw = Gateway(Settings(home=Path("var")))
gw.create_project("bone-2026", title="Bone density", actor="dm")
gw.approve("bone-2026", committee_ref="CSE-26-001", approved_on=..., expires_on=..., actor="cse")
gw.add_cohort("bone-2026", "accession", ["ACC1", "ACC2"], actor="dm")
report = gw.pull("bone-2026")
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import date
from functools import cached_property, partial
from typing import Any

from deid.keys import ProjectKeys
from deid.profile import Profile
from deid.vault import Vault
from gateway import projects
from gateway.config import Settings
from gateway.dimse.forkserver import ForkServer
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import Peer, Scu
from gateway.pull import Puller, PullReport
from gateway.receiver import Receiver, ReceiverConfig, SpoolLayout
from storage.catalog import Catalog
from storage.objectstore import open_store

log = logging.getLogger(__name__)

# What the Storage SCP's worker processes import, once, in the fork server they are forked from.
WORKER_MODULES = ["gateway.receiver", "deid.vault", "storage.catalog"]


class Gateway:
    """The gateway's parts, opened lazily from one `Settings`."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(self.settings.resolved_catalog_url())

    @cached_property
    def vault(self) -> Vault:
        return Vault(self.settings.resolved_vault_url())

    @cached_property
    def store(self) -> Any:
        s = self.settings
        return open_store(s.resolved_storage_url(), s.s3, timeout_s=s.timeout_s, retries=s.retries)

    @property
    def actor(self) -> str:
        return self.settings.actor or getpass.getuser()

    @property
    def pacs(self) -> Peer:
        p = self.settings.pacs
        return Peer(p.ae_title, p.host, p.port)

    def scu(self) -> Scu:
        return Scu(calling_ae=self.settings.ae_title, timeout_s=self.settings.timeout_s)

    # -- projects ----------------------------------------------------------------------------

    def create_project(
        self,
        name: str,
        *,
        title: str = "",
        actor: str | None = None,
        profile: Profile | None = None,
    ) -> None:
        """Declare a project with its de-identification profile (default: `Profile()`)."""
        projects.create(
            self.catalog,
            name,
            title=title,
            actor=actor or self.actor,
            deid_profile=(profile or Profile()).to_json(),
        )

    def approve(
        self,
        name: str,
        *,
        committee_ref: str,
        approved_on: date,
        expires_on: date,
        actor: str | None = None,
    ) -> None:
        projects.approve(
            self.catalog,
            name,
            committee_ref=committee_ref,
            approved_on=approved_on,
            expires_on=expires_on,
            actor=actor or self.actor,
        )

    def add_cohort(
        self, name: str, kind: str, values: Iterable[str], *, actor: str | None = None
    ) -> int:
        return projects.add_cohort(self.catalog, name, kind, values, actor=actor or self.actor)

    def summary(self, name: str) -> projects.ProjectSummary:
        return projects.summary(self.catalog, name)

    # -- pull --------------------------------------------------------------------------------

    def keys(self, name: str) -> ProjectKeys:
        """The project's keyed pseudonyms, UIDs and date shifts (its secret is in the vault)."""
        return ProjectKeys(self.vault.project_secret(name))

    def receiver_config(self, name: str) -> ReceiverConfig:
        """What the Storage SCP's workers need to receive for this project (picklable)."""
        s = self.settings
        project = projects.get(self.catalog, name)
        return ReceiverConfig(
            project=name,
            secret=self.vault.project_secret(name),
            profile=dict(project.deid_profile or {}),
            spool_root=s.spool_dir.resolve(),
            fsync=s.fsync,
            fsync_each=s.fsync_each,
            vault_url=s.resolved_vault_url(),
            catalog_url=s.resolved_catalog_url(),
            actor=self.actor,
        )

    def pull(self, name: str, *, actor: str | None = None, today: date | None = None) -> PullReport:
        """Pull the project's cohort. Raises `PullRefused` when the project may not be pulled."""
        s = self.settings
        if s.pacs.retrieve != "get" and s.receive_workers:
            ForkServer.shared(WORKER_MODULES)  # imports while the pull sets up
        project = projects.get(self.catalog, name)
        cfg = self.receiver_config(name)
        if actor:
            cfg = replace(cfg, actor=actor)
        get_receiver = Receiver(cfg) if s.pacs.retrieve == "get" else None
        puller = Puller(
            catalog=self.catalog,
            project=project,
            keys=ProjectKeys(cfg.secret),
            scu=self.scu(),
            peer=self.pacs,
            layout=SpoolLayout(cfg.spool_root, name),
            store=self.store,
            storage_url=s.resolved_storage_url(),
            dest_ae=s.ae_title,
            get_receiver=get_receiver,
            max_associations=s.max_associations,
            retries=s.retries,
            backoff_s=s.backoff_s,
            fsync=s.fsync,
            actor=cfg.actor,
        )
        puller.check_allowed(today)  # before any port is opened
        if get_receiver is not None:
            try:
                return puller.run(today)
            finally:
                get_receiver.close()
        # Each association is served by a worker process: de-identification runs on every core.
        scp = StorageSCP(
            ae_title=s.ae_title,
            host=s.host,
            port=s.port,
            workers=s.receive_workers,
            handler_factory=partial(Receiver, cfg),
            max_associations=max(8, s.max_associations),
            timeout_s=s.timeout_s,
            preload=WORKER_MODULES,
        )
        with scp:
            return puller.run(today)
