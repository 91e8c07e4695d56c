"""Every web request in the audit trail, written in batches so serving frames stays cheap.

`AuditMiddleware` gives each request a record (`request.state.audit`) that routes fill in
(who, project, action, pseudonymous UIDs) and adds the status, the bytes sent, the client's
address and the route (its template, never the path typed) once the response is done;
`AuditBuffer` writes the records in one transaction a second (or every `batch` records) from
a thread of its own, and whatever is left when the app stops.

Frame, bulk data and rendered image reads are rolled up: one row per user, series, hour and
action, with how many reads and bytes, written once the series has gone unread for `idle_s` (or
has been open `max_age_s`, or its hour is over, or the app stops). A viewer reads hundreds of
frames a study; a row each drowned the trail. Rows are only ever appended (they are chained,
see storage.audit), so a series read again later gets a row of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from datetime import datetime, timedelta
from typing import Any

from storage.catalog import Catalog, utcnow

log = logging.getLogger(__name__)
UNAUDITED = ("/healthz",)
# Pixel reads a viewer makes by the hundred; successful ones only (a refusal keeps its row).
# Whole instances (DICOM with its header) and metadata keep a row each.
ROLLED_UP = ("wado.frames", "wado.bulkdata", "wado.rendered", "wado.thumbnail")


class AuditBuffer:
    def __init__(
        self,
        catalog: Catalog,
        *,
        interval_s: float = 1.0,
        batch: int = 2000,
        idle_s: float = 30.0,
        max_age_s: float = 300.0,
    ) -> None:
        self.catalog = catalog
        self.interval_s = interval_s
        self.batch = batch
        self.idle = timedelta(seconds=idle_s)
        self.max_age = timedelta(seconds=max_age_s)
        self._rollups: dict[tuple[Any, ...], dict[str, Any]] = {}  # the writer thread's own
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, row: dict[str, Any]) -> None:
        self._queue.put(row)  # wakes nobody: the writer looks every interval
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._stop.clear()
                    self._thread = threading.Thread(target=self._run, name="web-audit", daemon=True)
                    self._thread.start()

    def close(self) -> None:
        """Write what is left and stop the writer."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._stop.set()  # under the lock: a writer started by a late `add` is not stopped
        if thread is not None:
            thread.join(30)

    def _run(self) -> None:
        # Sleeping between writes, rather than waking at each row, keeps the writer off the
        # interpreter while frames are served: one transaction a second under load.
        while True:
            stopping = self._stop.wait(self.interval_s)
            while self._write():
                pass
            self._write(flush=stopping)  # the roll-ups that are due (all, when stopping)
            if stopping:
                return

    def _write(self, *, flush: bool = False) -> bool:
        """Write up to `batch` queued rows, reads rolled up, and the roll-ups that are due
        (all of them with `flush`); False when there was nothing queued."""
        rows: list[dict[str, Any]] = []
        taken = 0
        while taken < self.batch:
            try:
                row = self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            if not self._roll_up(row):
                rows.append(row)
        rows += self._due(utcnow(), flush)
        if rows:
            self._insert(rows)
        return taken > 0

    def _roll_up(self, row: dict[str, Any]) -> bool:
        """Count a successful frame or bulk data read into its series' roll-up; False for
        any other row (written as it is)."""
        detail = row["detail"]
        if row["action"] not in ROLLED_UP or row["outcome"] != "ok" or "series" not in detail:
            return False
        at: datetime = row["at"]
        hour = at.replace(minute=0, second=0, microsecond=0)
        key = (row["actor"], row["project"], row["action"], detail["series"], hour)
        r = self._rollups.get(key)
        if r is None:
            r = self._rollups[key] = {
                **row,
                "detail": {
                    "study": detail.get("study"),
                    "series": detail["series"],
                    "route": detail.get("route"),
                    "method": detail.get("method"),
                    "count": 0,
                    "frames": 0,
                    "bytes": 0,
                    "clients": [],
                    "first": at.isoformat(timespec="seconds"),
                },
            }
        d = r["detail"]
        d["count"] += 1
        d["frames"] += int(detail.get("frames") or 1)
        d["bytes"] += int(detail.get("bytes") or 0)
        d["last"] = at.isoformat(timespec="seconds")
        if detail.get("client") not in d["clients"] and len(d["clients"]) < 8:
            d["clients"].append(detail.get("client"))
        r["last_at"] = at
        return True

    def _due(self, now: datetime, flush: bool) -> list[dict[str, Any]]:
        """The roll-ups to write now: idle, open too long, of an hour gone by, or all."""
        due = [
            key
            for key, r in self._rollups.items()
            if flush
            or now - r["last_at"] >= self.idle
            or now - r["at"] >= self.max_age
            or now >= key[-1] + timedelta(hours=1)
        ]
        out = []
        for key in due:
            r = self._rollups.pop(key)
            del r["last_at"]
            out.append(r)
        return out

    def _insert(self, rows: list[dict[str, Any]]) -> None:
        try:
            self.catalog.audit_many(rows)
        except Exception as e:  # never lose the server for the trail; say so
            log.error("web audit: %d rows not written (%s)", len(rows), type(e).__name__)


def skip_audit(request: Any) -> None:
    """Leave this request out of the trail: the viewer's own files (scripts, styles, fonts), the
    same for everyone and no data, would otherwise be ~90 rows each time a viewer opens."""
    record = getattr(request.state, "audit", None)
    if record is not None:
        record["skip"] = True


class AuditMiddleware:
    """Pure ASGI: counts the body bytes of streamed responses without buffering them."""

    def __init__(
        self, app: Any, buffer: AuditBuffer, templates: dict[Any, str] | None = None
    ) -> None:
        self.app = app
        self.buffer = buffer
        self._route = RouteNames(templates)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in UNAUDITED:
            await self.app(scope, receive, send)
            return
        record: dict[str, Any] = {"actor": "-", "action": "web", "project": None, "detail": {}}
        scope.setdefault("state", {})["audit"] = record
        status, sent = 500, 0

        async def counting(message: dict[str, Any]) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            if not (record.get("skip") and status < 400):  # a failure is kept all the same
                self._add(scope, record, status, sent)

    def _add(self, scope: dict[str, Any], record: dict[str, Any], status: int, sent: int) -> None:
        client = scope.get("client")
        detail = {
            **record["detail"],
            "method": scope["method"],
            "status": status,
            "bytes": sent,
            "route": self._route(scope),
            "client": client[0] if client else None,
        }
        self.buffer.add(
            {
                "at": utcnow(),
                "actor": record["actor"],
                "action": record["action"],
                "project": record["project"],
                "outcome": _outcome(status),
                "detail": detail,
            }
        )


class RouteNames:
    """The template of the route that answered a request (never the path typed, which may
    hold anything), or "(no route)": for the audit trail and the metrics."""

    def __init__(self, templates: dict[Any, str] | None = None) -> None:
        # Route templates by endpoint: those of routers included under a prefix, given (their
        # route knows its own part only); the app's plain routes, found on first use.
        self.templates = dict(templates or {})
        self._plain: dict[Any, str] | None = None

    def __call__(self, scope: dict[str, Any]) -> str:
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "(no route)"
        path = self.templates.get(endpoint) or getattr(scope.get("route"), "path", None)
        if path:
            return path
        if self._plain is None:  # frames, bulk data, the viewer's mount
            routes = getattr(scope.get("app"), "routes", [])
            self._plain = {
                getattr(r, "endpoint", None) or getattr(r, "app", None): r.path
                for r in routes
                if isinstance(getattr(r, "path", None), str)
            }
        return self._plain.get(endpoint, "(no route)")


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return "refused" if status in (401, 403, 404) else "error"
