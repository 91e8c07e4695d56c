"""A source protected across every node: at most `cluster_limit` associations (DIMSE) or
requests (DICOMweb) to it at once, whatever the number of nodes and jobs pulling from it.

The limit is a set of slots in the catalog (`source_slots`), each leased with an expiry the
holder renews from a heartbeat thread: a node that dies frees its slots when their lease runs
out. A retriever wrapped by `guarded` takes a slot for each call that talks to the source (a
C-FIND, a C-MOVE of a series, a QIDO or WADO request) and gives it back after; its C-MOVE
association is opened per series then (not kept from one series to the next), so an idle
association never holds the PACS. Without `cluster_limit` a retriever is returned as it is.

`check_windows`: a source outside its time windows (`core.windows`) is not pulled from; a job
waits for the window (`gateway.jobs`), a pull in the foreground is refused, saying when it opens.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from core import Core, SphereError, windows
from core.settings import Source
from storage.catalog import Catalog, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
LEASE_S = 30.0  # a slot's holder silent this long has let it go
WAIT_S = 0.2  # between tries for a slot when all are held


class SourceSlots:
    """The catalog-held semaphore of one source; `with slots.held():` around each call."""

    def __init__(self, catalog: Catalog, source: str, limit: int) -> None:
        self.catalog, self.source, self.limit = catalog, source, limit
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self._held = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @contextmanager
    def held(self) -> Iterator[int]:
        slot = self._take()
        try:
            yield slot
        finally:
            with self._lock:
                self._held -= 1
            try:
                self.catalog.release_source_slot(self.source, slot, self.token)
            except Exception as e:  # the catalog is away: the slot's lease runs out
                log.warning("slot of %s not released (%s)", self.source, type(e).__name__)

    def _take(self) -> int:
        while True:
            slot = self.catalog.take_source_slot(
                self.source, self.limit, self.token, self.holder, LEASE_S
            )
            if slot is not None:
                with self._lock:
                    self._held += 1
                    if self._beat is None:
                        self._beat = threading.Thread(target=self._renew, daemon=True)
                        self._beat.start()
                return slot
            self._stop.wait(WAIT_S)

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 3):
            if self._held:
                try:
                    self.catalog.renew_source_slots(self.source, self.token, LEASE_S)
                except Exception as e:  # noqa: BLE001 - try again at the next beat
                    log.warning("slots of %s not renewed (%s)", self.source, type(e).__name__)

    def close(self) -> None:
        self._stop.set()


class Guarded:
    """A retriever whose every call to the source holds one of the source's cluster slots."""

    def __init__(self, inner: Any, slots: SourceSlots) -> None:
        self.inner, self.slots = inner, slots
        self.name, self.protocol = inner.name, inner.protocol
        self.max_concurrent = min(inner.max_concurrent, slots.limit)
        if hasattr(inner, "keep_open"):
            inner.keep_open = False

    def __enter__(self) -> Guarded:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.inner.__exit__(*exc)
        finally:
            self.slots.close()

    def _slotted(self, fn: Callable[..., T], *args: Any) -> T:
        with self.slots.held():
            return fn(*args)

    def echo(self) -> None:
        self._slotted(self.inner.echo)

    def find_studies(self, kind: str, value: str) -> Any:
        return self._slotted(self.inner.find_studies, kind, value)

    def find_series(self, study_uid: str) -> Any:
        return self._slotted(self.inner.find_series, study_uid)

    def image_size(self, study_uid: str, series_uid: str) -> Any:
        return self._slotted(self.inner.image_size, study_uid, series_uid)

    def retrieve(self, study_uid: str, series_uid: str) -> Any:
        return self._slotted(self.inner.retrieve, study_uid, series_uid)

    def __getattr__(self, name: str) -> Any:  # anything else the pull asks of it
        return getattr(self.inner, name)

    def __str__(self) -> str:
        return str(self.inner)


class OutsideWindow(SphereError):
    """A source may not be pulled from now (its `windows`); `until` (UTC) when it may."""

    def __init__(self, message: str, until: datetime) -> None:
        super().__init__(message)
        self.until = until


def check_windows(sources: list[Source], now: datetime | None = None) -> None:
    """`OutsideWindow` when a source is outside its time windows (local time), naming it and
    when it opens."""
    now = now or datetime.now()
    closed = [s for s in sources if not windows.is_open(s.windows, now)]
    if not closed:
        return
    opens = max(windows.next_open(s.windows, now) for s in closed)
    names = ", ".join(f"{s.name} ({', '.join(s.windows)})" for s in closed)
    raise OutsideWindow(
        f"outside the source's time window: {names}; it opens at {opens:%a %Y-%m-%d %H:%M}",
        utcnow() + (opens - now),
    )


def guarded(core: Core, src: Source, retriever: Any) -> Any:
    """`retriever` under the source's cluster-wide limit, when it has one."""
    if not src.cluster_limit:
        return retriever
    return Guarded(retriever, SourceSlots(core.catalog, src.name, src.cluster_limit))
