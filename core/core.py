"""`Core`: the gateway's parts opened once from one `Settings`, for every edge.

core = Core(Settings())          # or Core(settings, create=True) to start a new home
core = Core(settings, research=True)  # serve, pipelines, workers: the vault stays sealed
core.catalog, core.vault, core.store
core.project("bone-2026")        # the catalog row; ProjectError if there is none
core.keys("bone-2026")           # keyed pseudonyms, UIDs, date shifts (secret from the vault)
core.deidentifier("bone-2026")   # the project's profile and keys, mappings recorded in the vault
"""

from __future__ import annotations

import functools
import getpass
import os
import sys
import threading
from functools import cached_property, partial
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy.exc import DBAPIError

from core import access, home, vaultkey
from core.errors import NotSetUp, ProjectError, Unavailable, VaultSealed
from core.settings import Settings
from deid.engine import Deidentifier
from deid.keys import ProjectKeys
from deid.profile import Profile
from deid.sealing import Tampered
from deid.vault import Vault, WrongVaultKey, is_sealed
from storage.catalog import Catalog, Project, User
from storage.objectstore import open_store


class Core:
    """Settings, catalog, vault, store and per-project keys, each opened on first use.

    Without `create`, a home whose SQLite catalog or vault does not exist is refused with
    `NotSetUp` instead of being created empty: a mistyped SPHERE_HOME then says so.
    `research`: the research side (serve, pipelines, workers), which never opens the vault nor
    reads its key: asking for either raises `VaultSealed`.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        create: bool = False,
        actor: str | None = None,
        research: bool = False,
    ) -> None:
        self.settings = settings or Settings()
        self.create = create
        self.research = research
        self._actor = actor
        self._keys: dict[str, ProjectKeys] = {}
        self._lock = threading.Lock()

    @property
    def actor(self) -> str:
        """Who is acting, for the audit trails: given, else the operator once known (the CLI),
        else the OS user."""
        if self._actor:
            return self._actor
        if "operator" in self.__dict__:
            return self.__dict__["operator"].name
        return getpass.getuser()

    @cached_property
    def operator(self) -> User:
        """The sphere user the CLI acts as (`core.access.operator`); `NotAllowed` if none."""
        return access.operator(self)

    @cached_property
    def catalog(self) -> Catalog:
        url = self.settings.resolved_catalog_url()
        self._require("catalog", url)
        catalog = _open_database("catalog", "SPHERE_CATALOG_URL", Catalog, url)
        _tighten(self.settings, url)
        return catalog

    @cached_property
    def vault(self) -> Vault:
        if self.research:
            raise VaultSealed(
                "the re-identification vault is sealed on the research side (serve, pipelines, "
                f"workers): {_asker()} asked for it"
            )
        url = self.settings.resolved_vault_url()
        self._require("re-identification vault", url)
        try:
            key = vaultkey.load(self.settings, create=self.create)
        except VaultSealed:
            if self.settings.vault_key or _open_database(
                "vault", "SPHERE_VAULT_URL", is_sealed, url
            ):
                raise
            # A vault from before sealing (plaintext): it gets a key now, and is sealed below.
            key = vaultkey.load(self.settings, create=True)
        try:
            vault = _open_database("vault", "SPHERE_VAULT_URL", partial(Vault, key=key), url)
        except WrongVaultKey as e:
            raise VaultSealed(f"{e}: check SPHERE_VAULT_KEY_FILE or SPHERE_VAULT_KEY") from None
        _tighten(self.settings, url)
        return vault

    @cached_property
    def store(self) -> Any:
        s = self.settings
        url = s.resolved_storage_url()
        if "://" not in url or url.startswith("file://"):  # a local folder, maybe not in home
            changed = home.tighten([Path(url.removeprefix("file://"))])
            if changed:
                home.log.warning("made owner-only (0700): the store's folder %s", changed[0])
        try:
            return open_store(url, s.s3, timeout_s=s.timeout_s, retries=s.retries)
        except ValueError as e:
            raise NotSetUp(f"SPHERE_STORAGE_URL: {e}") from None

    # -- a project's parts --------------------------------------------------------------------

    def project(self, name: str) -> Project:
        """The project's catalog row; `ProjectError` when there is none."""
        p = self.catalog.project(name)
        if p is None:
            raise ProjectError(f"no project named '{name}' (see `sphere project list`)")
        return p

    def keys(self, name: str) -> ProjectKeys:
        """The project's keyed derivations; its secret is created in the vault on first use."""
        with self._lock:
            keys = self._keys.get(name)
        if keys is None:
            try:
                keys = ProjectKeys(self.vault.project_secret(name))
            except Tampered:
                raise VaultSealed(
                    f"the vault's secret of '{name}' does not open: altered"
                ) from None
            with self._lock:
                keys = self._keys.setdefault(name, keys)
        return keys

    def profile(self, name: str) -> Profile:
        """The project's de-identification profile, as stored at its creation."""
        return Profile.from_json(self.project(name).deid_profile or {})

    def deidentifier(
        self, name: str, *, profile: Profile | None = None, report: bool = False
    ) -> Deidentifier:
        """The project's de-identifier (its stored profile unless `profile` is given), handing
        the mappings it makes to the vault; `report` counts what each rule did."""
        return Deidentifier(
            profile or self.profile(name),
            self.keys(name),
            sink=partial(self.vault.record_many, name),
            report=report,
        )

    def close(self) -> None:
        """Flush the vault and release the databases (what was opened)."""
        if "vault" in self.__dict__:
            self.vault.close()
        if "catalog" in self.__dict__:
            self.catalog.dispose()

    def __enter__(self) -> Core:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- opening ------------------------------------------------------------------------------

    def _require(self, what: str, url: str) -> None:
        path = _sqlite_file(url)
        if path is None:
            return
        # the first part of the path that exists must be a folder (SPHERE_HOME a file: say so)
        there = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if there is not None and not there.is_dir():
            raise NotSetUp(f"{there} is a file, not a folder: is SPHERE_HOME (or --home) right?")
        if self.create:
            try:
                home.make_dir(path.parent)
                # Made owner-only before SQLite opens it (its -wal and -shm take the same mode).
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as e:
                raise NotSetUp(f"cannot make {path}: {e.strerror}") from None
        elif not path.exists():
            raise NotSetUp(
                f"no {what} at {path}: is SPHERE_HOME (or --home) right? "
                "`sphere init` starts a new one"
            )


def _tighten(settings: Settings, url: str) -> None:
    """A home made before files were owner-only: its folder and this database made so now."""
    db = _sqlite_file(url)
    changed = home.tighten([settings.home, *(home.sqlite_files(db) if db else [])])
    if changed:
        home.log.warning("made owner-only (0700/0600): %s", ", ".join(p.name for p in changed))


def _asker() -> str:
    """The first caller outside this module: what asked for the vault."""
    f: FrameType | None = sys._getframe(1)
    while f is not None and f.f_code.co_filename in (__file__, functools.__file__):
        f = f.f_back
    return f"{f.f_globals.get('__name__')}.{f.f_code.co_qualname}" if f else "unknown"


def _sqlite_file(url: str) -> Path | None:
    """The file behind a SQLite URL (None for other databases and in-memory ones)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix) :] in ("", ":memory:"):
        return None
    return Path(url[len(prefix) :])


def _open_database(what: str, variable: str, cls: Any, url: str) -> Any:
    try:
        return cls(url)
    except DBAPIError as e:
        # The driver's first line says why (refused, unknown host, bad password), never data.
        reason = str(e.orig).strip().splitlines()[0][:200] if e.orig else type(e).__name__
        raise Unavailable(
            f"the {what} database cannot be opened ({reason}); check {variable}"
        ) from None
