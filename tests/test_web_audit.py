"""The web's audit buffer: rows are written in batches by a writer of their own, none is lost
at shutdown, and a catalog that fails is said in the log without stopping the server."""

from __future__ import annotations

import logging
import time

from gateway.web.audit import AuditBuffer
from storage.catalog import Catalog


def row(i: int) -> dict:
    return {"actor": "u", "action": f"a{i}", "project": "p", "outcome": "ok", "detail": {"i": i}}


def test_rows_are_written_in_batches_and_none_is_lost_at_close(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    calls: list[int] = []
    write = catalog.audit_many

    def counted(rows):
        write(rows)
        calls.append(len(rows))  # after the write, so the count never runs ahead of the table

    catalog.audit_many = counted  # type: ignore[method-assign]
    buffer = AuditBuffer(catalog, interval_s=0.2, batch=100)
    for i in range(250):
        buffer.add(row(i))
    deadline = time.monotonic() + 10
    while sum(calls) < 250 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(calls) == 250 and max(calls) <= 100  # batches, not a row each
    assert len(catalog.audit_trail("p", limit=1000)) == 250
    buffer.close()
    slow = AuditBuffer(catalog, interval_s=3600)  # would not write for an hour...
    for i in range(7):
        slow.add(row(1000 + i))
    slow.close()  # ...but closing writes what is left
    assert len(catalog.audit_trail("p", limit=1000)) == 257


def test_a_failing_catalog_is_logged_and_the_buffer_goes_on(tmp_path, caplog):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    write, failing = catalog.audit_many, [True]

    def flaky(rows):
        if failing.pop() if failing else False:
            raise OSError("disk full")
        write(rows)

    catalog.audit_many = flaky  # type: ignore[method-assign]
    buffer = AuditBuffer(catalog, interval_s=3600)
    with caplog.at_level(logging.ERROR):
        buffer.add(row(1))
        buffer._write()  # the failing write
        buffer.add(row(2))
        buffer.close()
    assert "1 rows not written (OSError)" in caplog.text
    assert [e.action for e in catalog.audit_trail("p")] == ["a2"]
