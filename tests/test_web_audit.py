"""The web's audit buffer: rows are written in batches by a writer of their own, none is lost
at shutdown, and a catalog that fails is said in the log without stopping the server."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta

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

    catalog.audit_many = counted
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

    catalog.audit_many = flaky
    buffer = AuditBuffer(catalog, interval_s=3600)
    with caplog.at_level(logging.ERROR):
        buffer.add(row(1))
        buffer._write()  # the failing write
        buffer.add(row(2))
        buffer.close()
    assert "1 rows not written (OSError)" in caplog.text
    assert [e.action for e in catalog.audit_trail("p")] == ["a2"]


def test_frame_and_bulk_reads_are_rolled_up_per_user_series_and_hour(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    buffer = AuditBuffer(catalog, interval_s=3600)
    t0 = datetime(2026, 3, 1, 10, 59, 50)
    route = "/projects/{project}/dicom-web/studies/{study}/series/{series}/instances/{sop}"

    def read(i: int, series: str, actor: str = "ann", outcome: str = "ok") -> dict:
        detail = {
            "study": "2.25.1",
            "series": series,
            "instance": f"2.25.{i}",
            "frames": 1,
            "bytes": 1000 + i,
            "client": "10.0.0.7",
            "route": route + "/frames/{frames}",
        }
        at = t0 + timedelta(seconds=i * 0.2)
        return {"at": at, "actor": actor, "action": "wado.frames", "project": "p",
                "outcome": outcome, "detail": detail}  # fmt: skip

    for i in range(150):  # 150 frames of one series, from 10:59:50 to 11:00:20
        buffer.add(read(i, "2.25.10"))
    for i in range(50):
        buffer.add(read(i, "2.25.20"))
    buffer.add(read(0, "2.25.20", actor="bob"))
    buffer.add(read(1, "2.25.20", outcome="refused"))  # a refusal keeps a row of its own
    buffer.add(row(1))  # so does every other request
    buffer.close()
    trail = catalog.audit_trail(None, limit=1000)
    assert len(trail) == 6
    rolled = {
        (e.actor, d["series"], e.at.hour): (d["count"], d["bytes"], d["clients"], d["route"])
        for e in trail
        if e.action == "wado.frames" and e.outcome == "ok"
        for d in [json.loads(e.detail)]
    }
    frames = route + "/frames/{frames}"
    assert rolled == {
        ("ann", "2.25.10", 10): (50, sum(1000 + i for i in range(50)), ["10.0.0.7"], frames),
        ("ann", "2.25.10", 11): (100, sum(1000 + i for i in range(50, 150)), ["10.0.0.7"], frames),
        ("ann", "2.25.20", 10): (50, sum(1000 + i for i in range(50)), ["10.0.0.7"], frames),
        ("bob", "2.25.20", 10): (1, 1000, ["10.0.0.7"], frames),
    }
    assert catalog.verify_audit().problem is None


def test_a_roll_up_is_written_once_its_series_goes_unread(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'c.db'}")
    buffer = AuditBuffer(catalog, interval_s=3600, idle_s=30, max_age_s=300)
    now = datetime.now(UTC).replace(tzinfo=None)
    detail = {"series": "2.25.9", "bytes": 10}
    buffer.add({"at": now, "actor": "a", "action": "wado.bulkdata", "project": "p",
                "outcome": "ok", "detail": detail})  # fmt: skip
    buffer._write()
    assert catalog.audit_trail() == []  # read a moment ago: still open
    buffer._rollups[next(iter(buffer._rollups))]["last_at"] -= timedelta(seconds=31)
    buffer._write()
    (e,) = catalog.audit_trail()
    assert e.action == "wado.bulkdata" and json.loads(e.detail)["count"] == 1
    buffer.close()
