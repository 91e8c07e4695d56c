"""Every web request in the audit trail, written in batches so serving frames stays cheap.

`AuditMiddleware` gives each request a record (`request.state.audit`) that routes fill in
(who, project, action, pseudonymous UIDs) and adds the status and the bytes sent once the
response is done; `AuditBuffer` writes the records in one transaction a second (or every
`batch` records) from a thread of its own, and whatever is left when the app stops.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from storage.catalog import Catalog, utcnow

log = logging.getLogger(__name__)
UNAUDITED = ("/healthz",)


class AuditBuffer:
    def __init__(self, catalog: Catalog, *, interval_s: float = 1.0, batch: int = 2000) -> None:
        self.catalog = catalog
        self.interval_s = interval_s
        self.batch = batch
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
            if stopping:
                return

    def _write(self) -> bool:
        """Write up to `batch` queued rows; False when there was nothing to write."""
        rows: list[dict[str, Any]] = []
        while len(rows) < self.batch:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not rows:
            return False
        try:
            self.catalog.audit_many(rows)
        except Exception as e:  # never lose the server for the trail; say so
            log.error("web audit: %d rows not written (%s)", len(rows), type(e).__name__)
        return True


def skip_audit(request: Any) -> None:
    """Leave this request out of the trail: the viewer's own files (scripts, styles, fonts), the
    same for everyone and no data, would otherwise be ~90 rows each time a viewer opens."""
    record = getattr(request.state, "audit", None)
    if record is not None:
        record["skip"] = True


class AuditMiddleware:
    """Pure ASGI: counts the body bytes of streamed responses without buffering them."""

    def __init__(self, app: Any, buffer: AuditBuffer) -> None:
        self.app = app
        self.buffer = buffer

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
        detail = {**record["detail"], "method": scope["method"], "status": status, "bytes": sent}
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


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return "refused" if status in (401, 403, 404) else "error"
