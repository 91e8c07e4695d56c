"""The audit trail: filters in SQL, a hash chain that finds a row edited, inserted or deleted
(each fault made here, as a positive control), rows from several processes at once still one
chain, on SQLite and PostgreSQL; a catalog older than the chain gets it when opened."""

from __future__ import annotations

import multiprocessing
from datetime import datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from storage.catalog import Catalog


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.peers)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    name = f"audit_{abs(hash(request.node.name)) % 10**8}"
    return request.getfixturevalue("pg_server").create_database(name)


def write(cat: Catalog, n: int, actor: str = "u") -> None:
    for i in range(n):
        cat.audit(actor, "thing.done", "p", i=i)


def sql(url: str, statement: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(statement))
    engine.dispose()


def test_an_intact_trail_verifies_and_each_fault_is_found(url):
    cat = Catalog(url)
    write(cat, 10)
    cat.audit_many([{"actor": "w", "action": "web", "project": None, "detail": {"x": 1}}])
    check = cat.verify_audit()
    assert check.problem is None and check.rows == 11
    assert check.line().startswith("11 rows, chain intact")

    sql(url, "UPDATE audit SET detail = '{\"i\": 99}' WHERE id = 4")  # edited
    check = cat.verify_audit()
    assert check.row_id == 4 and "edited" in check.problem
    sql(url, "UPDATE audit SET detail = '{\"i\": 3}' WHERE id = 4")  # put back: intact again
    assert cat.verify_audit().problem is None

    sql(url, "UPDATE audit SET actor = 'someone else' WHERE id = 7")  # any column is covered
    assert cat.verify_audit().row_id == 7
    sql(url, "UPDATE audit SET actor = 'u' WHERE id = 7")
    assert cat.verify_audit().problem is None

    sql(url, "DELETE FROM audit WHERE id = 5")  # deleted in the middle
    check = cat.verify_audit()
    assert check.row_id == 6 and "deleted" in check.problem


def test_an_inserted_row_is_found(url):
    cat = Catalog(url)
    write(cat, 5)
    # a row as an older sphere (or a hand) would add it: no place in the chain
    sql(
        url,
        "INSERT INTO audit (at, actor, action, project, outcome, detail) "
        "VALUES ('2026-01-01 00:00:00', 'x', 'vault.lookup', 'p', 'ok', '{}')",
    )
    check = cat.verify_audit()
    assert check.row_id == 6 and "inserted" in check.problem
    # a copy of a chained row, hash and all, is found too
    sql(url, "DELETE FROM audit WHERE id = 6")
    sql(
        url,
        "INSERT INTO audit (at, actor, action, project, outcome, detail, seq, hash) "
        "SELECT at, actor, action, project, outcome, detail, seq, hash FROM audit WHERE id = 2",
    )
    check = cat.verify_audit()
    assert check.row_id in (6, 7) and "inserted" in check.problem  # SQLite reuses id 6


def test_the_last_rows_deleted_are_found(url):
    cat = Catalog(url)
    write(cat, 5)
    sql(url, "DELETE FROM audit WHERE id >= 4")
    check = cat.verify_audit()
    assert check.problem == "2 row(s) deleted at the end (after row 3)"


def _writer(url: str, actor: str, n: int) -> None:
    cat = Catalog(url)
    for i in range(n):
        if i % 3:
            cat.audit(actor, "thing.done", "p", i=i)
        else:
            batch = [
                {"actor": actor, "action": "web", "project": "p", "detail": {"i": i, "k": k}}
                for k in range(3)
            ]
            cat.audit_many(batch)  # a batch of three, as the web writer does
    cat.dispose()


def test_rows_written_by_processes_at_once_still_form_one_chain(url):
    Catalog(url).dispose()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(url, f"w{i}", 40)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    check = Catalog(url).verify_audit()
    assert check.problem is None, check.line()
    expected = 4 * sum(1 if i % 3 else 3 for i in range(40))
    assert check.rows == expected


def test_filters(tmp_path):
    cat = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    t0 = datetime(2026, 3, 1, 12)
    rows = [
        {"actor": a, "action": act, "project": p, "detail": {}, "at": t0 + timedelta(days=d)}
        for a, act, p, d in [
            ("ann", "wado.frames", "p", 0),
            ("bob", "wado.study", "p", 1),
            ("ann", "cohort.add", "q", 2),
            ("ann", "wado.frames", "p", 3),
        ]
    ]
    cat.audit_many(rows)
    got = cat.audit_trail("p", actor="ann")
    assert [(e.actor, e.at.day) for e in got] == [("ann", 4), ("ann", 1)]
    assert {e.action for e in cat.audit_trail(action="wado.*")} == {"wado.frames", "wado.study"}
    assert [e.action for e in cat.audit_trail(action="wado")] == []  # exact unless `*`
    window = cat.audit_trail(since=datetime(2026, 3, 2), until=datetime(2026, 3, 4))
    assert [e.at.day for e in window] == [3, 2]
    assert len(cat.audit_trail(limit=2)) == 2


def test_a_catalog_older_than_the_chain_gets_it_and_the_chain_starts_there(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    Catalog(url).dispose()
    with create_engine(url).begin() as conn:  # as an older sphere left it
        conn.execute(text("DROP TABLE audit"))
        conn.execute(text("DROP TABLE audit_head"))
        conn.execute(
            text(
                "CREATE TABLE audit (id INTEGER PRIMARY KEY, at DATETIME, actor VARCHAR(128), "
                "action VARCHAR(64), project VARCHAR(64), outcome VARCHAR(16), detail TEXT)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO audit (at, actor, action, project, outcome, detail) VALUES "
                "('2026-01-01 00:00:00', 'old', 'project.create', 'p', 'ok', '{}'), "
                "('2026-01-02 00:00:00', 'old', 'cohort.add', 'p', 'ok', '{}')"
            )
        )
    cat = Catalog(url)
    write(cat, 3)
    check = cat.verify_audit()
    assert check.problem is None and check.rows == 5 and check.before_chain == 2
    assert "starts after 2 older rows" in check.line()
    sql(url, "UPDATE audit SET detail = '{\"i\": 7}' WHERE id = 4")
    assert cat.verify_audit().row_id == 4
