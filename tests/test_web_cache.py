"""The web's catalog cache: valid while the access version stands, never taken back to an older
version by a late reader, series maps bounded apart; the version read survives a dropped
connection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gateway.web.cache import CatalogCache
from storage.catalog import Catalog, Project


class FakeCatalog:
    """Counts the queries the cache makes; the version is set by the test."""

    def __init__(self) -> None:
        self.version = 1
        self.queries = 0

    def access_version(self) -> int:
        return self.version

    def membership(self, project: str, user_id: int):
        self.queries += 1
        return (SimpleNamespace(name=project, version=self.version), "viewer")

    def indexed_series(self, project_id, study, series):
        self.queries += 1
        return [SimpleNamespace(series_uid=series)]

    def instance_positions(self, project_id, series):
        self.queries += 1
        return {f"{series}.{i}": (i, True) for i in range(3)}


def cache_on(catalog: FakeCatalog, **kw) -> CatalogCache:
    core = SimpleNamespace(catalog=catalog)  # a stand-in Core: only the catalog the cache asks
    return CatalogCache(core, **kw)  # type: ignore[arg-type]  # (the stand-in above)


def test_kept_while_the_version_stands_and_never_taken_back():
    cat = FakeCatalog()
    cache = cache_on(cat)
    cache.refresh()
    cache.membership("p", 1)
    cache.membership("p", 1)
    assert cat.queries == 1
    cat.version = 2  # a grant or revoke committed
    cache.refresh()
    assert cache.membership("p", 1)[0].version == 2 and cat.queries == 2
    # A request that read version 1 just before that commit refreshes late: nothing changes.
    cat.version = 1
    cache.refresh()
    assert cache.membership("p", 1)[0].version == 2 and cat.queries == 2


def test_series_maps_are_bounded_apart():
    cat = FakeCatalog()
    cache = cache_on(cat, size=1000, series_size=2)
    cache.refresh()
    for s in ("a", "b", "c"):
        assert cache.instance(1, "st", s, f"{s}.1")[1].position == 1
    assert len(cache._positions) == 2  # the oldest map dropped
    before = cat.queries
    cache.instance(1, "st", "c", "c.2")
    assert cat.queries == before  # the series row and its map were kept
    assert cache.instance(1, "st", "c", "nope") is None


def test_table_level_writes_move_the_version_too(tmp_path):
    from storage.models import User

    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    cat.add_user(User(name="u", token_hash="0" * 64))
    v = cat.access_version()
    with cat.session() as s:
        s.execute(User.__table__.update().values(active=False))  # no ORM mapper on it
    assert cat.access_version() == v + 1
    with cat.session() as s:
        s.execute(Project.__table__.select())  # a read: no change
    assert cat.access_version() == v + 1


def test_the_version_read_survives_a_dropped_connection(tmp_path, monkeypatch):
    """A pooled connection the server dropped (a PostgreSQL restart) fails once: it is thrown
    away and the read made again on a fresh one, instead of failing the request."""
    import sqlite3

    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    v = cat.access_version()

    class Dropped:
        invalidated = closed = False

        def __init__(self):
            self.info = {}  # a pooled connection's record info, as SQLAlchemy hands it

        def cursor(self):
            raise sqlite3.OperationalError("server closed the connection unexpectedly")

        def invalidate(self):
            self.invalidated = True

        def close(self):
            self.closed = True

    dropped, real = Dropped(), cat.engine.raw_connection
    handed = iter([dropped])
    monkeypatch.setattr(cat.engine, "raw_connection", lambda: next(handed, None) or real())
    assert cat.access_version() == v
    assert dropped.invalidated and dropped.closed
    # Twice in a row is no passing glitch: said, not hidden.
    handed = iter([Dropped(), Dropped()])
    with pytest.raises(sqlite3.OperationalError):
        cat.access_version()
