"""Fixture `pg_server` (session): one real PostgreSQL server on loopback (`harness.postgres`)
for the whole run; `create_database(name)` gives a test its own database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.postgres import PgServer

__all__ = ["PgServer", "pg_server"]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server
