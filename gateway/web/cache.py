"""What nearly every web request asks the catalog, kept between requests.

A viewer asks for hundreds of frames a second, each needing: who holds this token, the user's
role in the project, where the instance is. Those answers are kept here while the catalog's
access version (`Catalog.access_version`, one one-row read, made once per request by
`refresh`) is unchanged; any commit that revokes, grants, re-approves or re-indexes changes it,
so such a change takes effect on the next request, as without a cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from core import Core, users
from storage.catalog import IndexedSeries, Project, User, WebSession, utcnow

T = TypeVar("T")


class _Lru(OrderedDict):
    """Entries, oldest first; `_get` drops the oldest past `size`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size


@dataclass(frozen=True)
class Located:
    """An instance of a series: its stored position, and whether it has frames."""

    sop_uid: str
    position: int
    has_pixels: bool


class CatalogCache:
    """Catalog answers for the web (users, roles, series, instance positions), least recently
    used dropped past `size`, all dropped when the access version changes."""

    def __init__(self, core: Core, size: int = 4096, series_size: int = 128) -> None:
        self.core = core
        self._entries = _Lru(size)
        self._positions = _Lru(series_size)  # large: a map per series
        self._version: int | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Drop everything when the catalog changed since the last call (once per request)."""
        version = self.core.catalog.access_version()
        with self._lock:
            # The version only grows: a read older than the one kept (a request that read it
            # just before a commit another request has seen) must not bring it back. (A catalog
            # restored from an older backup needs the server restarted.)
            if self._version is None or version > self._version:
                self._entries.clear()
                self._positions.clear()
                self._version = version

    def user_by_token(self, token: str) -> User | None:
        """The active user holding this API token (`core.users.authenticate`), or None."""
        key = ("token", users.token_hash(token))
        return self._get(key, lambda: users.authenticate(self.core, token))

    def user_by_id(self, user_id: int) -> User | None:
        return self._get(("user", user_id), lambda: self.core.catalog.user_by_id(user_id))

    def session(self, digest: str) -> WebSession | None:
        """The unexpired sign-in of that cookie digest (`gateway.web.sessions`), or None."""
        found = self._get(("session", digest), lambda: self.core.catalog.web_session(digest))
        return found if found is not None and found.expires_at > utcnow() else None

    def membership(self, project: str, user_id: int) -> tuple[Project, str] | None:
        """The project of that name and the user's role in it; None unless both exist."""
        key = ("member", project, user_id)
        return self._get(key, lambda: self.core.catalog.membership(project, user_id))

    def global_roles(self, user_id: int) -> frozenset[str]:
        """The user's global roles (admin, data-manager, trusted-third-party)."""
        key = ("roles", user_id)
        return self._get(key, lambda: frozenset(self.core.catalog.user_roles(user_id)))

    def project(self, name: str) -> Project | None:
        return self._get(("project-row", name), lambda: self.core.catalog.project(name))

    def project_exists(self, project: str) -> bool:
        key = ("project", project)
        return self._get(key, lambda: self.core.catalog.project(project) is not None)

    def series(self, project_id: int, study: str, series: str | None) -> list[IndexedSeries]:
        """A study's indexed series (or the one named) in this project, by series number."""
        key = ("series", project_id, study, series)
        return self._get(key, lambda: self.core.catalog.indexed_series(project_id, study, series))

    def instance(
        self, project_id: int, study: str, series: str, sop: str
    ) -> tuple[IndexedSeries, Located] | None:
        """An instance and its series, when both are in this project and this study."""
        rows = self.series(project_id, study, series)
        if not rows:
            return None
        key = ("positions", project_id, series)
        positions = self._get(
            key, lambda: self.core.catalog.instance_positions(project_id, series), self._positions
        )
        found = positions.get(sop)
        return (rows[0], Located(sop, *found)) if found is not None else None

    def _get(self, key: Hashable, compute: Callable[[], T], table: _Lru | None = None) -> T:
        entries = self._entries if table is None else table
        with self._lock:
            if key in entries:
                entries.move_to_end(key)
                return entries[key]
            version = self._version
        value = compute()
        if value is None:
            return value  # not kept: unknown tokens and names cost a query, never memory
        with self._lock:
            if version == self._version:  # computed against the version still current
                entries[key] = value
                while len(entries) > entries.size:
                    entries.popitem(last=False)
        return value
