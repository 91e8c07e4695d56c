"""A source protected across every node: at most `cluster_limit` associations (DIMSE) or
requests (DICOMweb) to it at once, whatever the number of nodes and jobs pulling from it.

The limit is a set of slots in the catalog (`source_slots`), each leased with an expiry the
holder renews from a heartbeat thread: a node that dies frees its slots when their lease runs
out. A retriever wrapped by `guarded` takes a slot for each call that talks to the source (a
C-FIND, a C-MOVE of a series, a QIDO or WADO request) and gives it back after; its C-MOVE
association is opened per series then (not kept from one series to the next), so an idle
association never holds the PACS.

`max_rate` caps the instances a second from the source, all nodes together: a token bucket in
the catalog, taken a series at a time before it is retrieved (`Guarded.pace`).

Each retrieve also goes through the source's `Breaker`, also held in the catalog
(`source_breakers`): a source that stops answering pauses the series being retrieved on every
node, one probe per interval across the cluster, until it answers.

`check_windows`: a source outside its time windows (`core.windows`) is not pulled from; a job
waits for the window (`gateway.jobs`), a pull in the foreground is refused, saying when it opens.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from core import Core, SphereError, metrics, windows
from core.settings import Source
from dicom.status import is_out_of_resources
from storage.catalog import Catalog, utcnow

log = logging.getLogger(__name__)
T = TypeVar("T")
LEASE_S = 30.0  # a slot's holder silent this long has let it go
WAIT_S = 0.2  # between tries for a slot when all are held


class SourceError(Exception):
    """A source could not be reached or answered wrongly (the message names it, holds no PHI).
    `answered`: the source answered (with a failure), as opposed to not answering at all."""

    def __init__(self, message: str, *, answered: bool = True) -> None:
        super().__init__(message)
        self.answered = answered


class SourceGone(SourceError):
    """The source's breaker gave up on it (no answer for `give_up_s`): the pull stops, instead
    of every series waiting as long again on each of its retries."""


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


class Breaker:
    """Trips when the source stops answering (`after` calls in a row without an answer, on any
    node): the calls wait instead of failing each on its own timeouts, one of them (in the
    whole cluster) probes the source every `probe_s`, and all go on once it answers. Past
    `give_up_s` open, the waiting calls fail. The state is the source's `source_breakers` row
    in the catalog, so every node and job sharing it sees one breaker. `on_change(state,
    detail)` is told when it opens and closes, by the one caller that did it."""

    def __init__(
        self,
        source: Source,
        probe: Callable[[], None],
        catalog: Catalog,
        on_change: Callable[[str, dict[str, Any]], None] = lambda state, detail: None,
    ) -> None:
        self.source, self.name, self.probe, self.on_change = source, source.name, probe, on_change
        self.catalog = catalog
        self.after, self.probe_s, self.give_up_s = (
            source.breaker_after,
            source.probe_s,
            source.give_up_s,
        )
        self.poll_s = min(self.probe_s, 1.0)  # how often a waiting call looks at the row
        self._seen_open = False
        self._gauge = metrics.get().breaker_open.labels(self.name)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        while True:
            misses = self._wait_closed()
            try:
                result = fn(*args)
            except SourceError as e:
                if e.answered or not self._missed():
                    raise
                continue  # it tripped: wait for the source, then try again
            if misses:  # a write only when there is a count to reset
                self._shared(self.catalog.breaker_answered, self.name)
            return result

    def _shared(self, fn: Callable[..., T], *args: Any) -> T | None:
        """A call to the catalog's breaker row; None when the catalog does not answer (the
        breaker then stays out of the way: the pull meets the catalog's failure itself)."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a breaker is no reason to stop the pull
            log.warning("breaker of %s not shared (%s)", self.name, type(e).__name__)
            return None

    def _row(self) -> Any:
        return self._shared(self.catalog.source_breaker, self.name)

    def _missed(self) -> bool:
        """Count a call without an answer; True when the breaker is (now) open."""
        opened = self._shared(self.catalog.breaker_missed, self.name, self.after, self.probe_s)
        if opened:
            log.warning("source %s does not answer: its work pauses", self.name)
            self._observe(True)
            self.on_change("open", {"after": self.after})
        return opened is not None

    def _observe(self, is_open: bool) -> None:
        if is_open != self._seen_open:
            self._seen_open = is_open
            self._gauge.set(1 if is_open else 0)

    def _wait_closed(self) -> int:
        """Once the breaker is closed: the misses in a row counted so far."""
        since = time.monotonic()  # this call's own wait (a row left open long ago is probed)
        while True:
            row = self._row()
            if row is None or row.opened_at is None:
                self._observe(False)
                return row.misses if row is not None else 0
            self._observe(True)
            now = utcnow()
            if time.monotonic() - since > self.give_up_s:
                raise SourceGone(
                    f"source {self.name} has not answered for {self.give_up_s:.0f} s",
                    answered=False,
                )
            due = (row.next_probe - now).total_seconds() if row.next_probe else 0.0
            if due <= 0 and self._shared(self.catalog.breaker_probe_turn, self.name, self.probe_s):
                if self._probe():  # one probe per interval, whoever in the cluster waits
                    was = self._shared(self.catalog.breaker_close, self.name, row.opening)
                    if was is not None and was.opened_at is not None:
                        seconds = (utcnow() - was.opened_at).total_seconds()
                        log.warning("source %s answers again: its work resumes", self.name)
                        self.on_change(
                            "closed", {"probes": was.probes, "seconds": round(seconds, 1)}
                        )
                continue
            time.sleep(min(self.poll_s, max(due, 0.05)))

    def _probe(self) -> bool:
        try:
            self.probe()
        except SourceError:
            return False
        except Exception as e:  # noqa: BLE001 - a probe that breaks is a source not answering
            log.warning("probe of %s failed (%s)", self.name, type(e).__name__)
            return False
        return True


class Guarded:
    """A retriever behind its source's breaker and, with a cluster limit, its cluster slots."""

    def __init__(
        self,
        inner: Any,
        breaker: Breaker,
        slots: SourceSlots | None,
        catalog: Catalog | None = None,
        max_rate: float | None = None,
    ) -> None:
        self.inner, self.breaker, self.slots = inner, breaker, slots
        self.source = breaker.source
        self.catalog, self.max_rate = catalog, max_rate
        self.name, self.protocol = inner.name, inner.protocol
        self.max_concurrent = inner.max_concurrent
        if slots is not None:
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
            if self.slots is not None:
                self.slots.close()

    def _slotted(self, fn: Callable[..., T], *args: Any) -> T:
        if self.slots is None:
            return fn(*args)
        with self.slots.held():
            return fn(*args)

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        return self.breaker.call(self._slotted, fn, *args)

    # Planning is not behind the breaker: a source silent at the start is said at once (a job
    # waits and tries again); the breaker is for a source that stops answering mid-pull.
    def echo(self) -> None:
        self._slotted(self.inner.echo)

    def find_studies(self, kind: str, value: str) -> Any:
        return self._slotted(self.inner.find_studies, kind, value)

    def find_series(self, study_uid: str) -> Any:
        return self._slotted(self.inner.find_series, study_uid)

    def image_size(self, study_uid: str, series_uid: str) -> Any:
        return self._slotted(self.inner.image_size, study_uid, series_uid)

    def retrieve(self, study_uid: str, series_uid: str) -> Any:
        """The series, asked again after a longer wait while the source says it is out of
        resources (0xA700-0xA7FF), instead of spending the series' own retries at once."""
        for attempt in range(self.source.busy_retries + 1):
            result = self._guarded(self.inner.retrieve, study_uid, series_uid)
            status = getattr(result, "status", None)
            if status is None or not is_out_of_resources(status):
                return result
            if attempt == self.source.busy_retries:
                break
            wait = self.source.busy_backoff_s * 2**attempt
            log.warning(
                "source %s is out of resources (0x%04X): asked again in %.0f s",
                self.name,
                status,
                wait,
            )
            time.sleep(wait)
        return result

    def pace(self, instances: int) -> float:
        """Before retrieving `instances`: wait for them under the source's rate cap (one
        catalog round trip a series). Returns the seconds waited."""
        rate = self.max_rate
        if not rate or instances <= 0 or self.catalog is None:
            return 0.0
        if self.catalog is None:
            raise RuntimeError("a source's rate cap is kept in the catalog: none was given")
        wait = self.catalog.take_source_tokens(self.name, instances, rate, max(rate, 1.0))
        if wait > 0:
            time.sleep(wait)
        return wait

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


def guarded(core: Core, src: Source, retriever: Any, project: str = "", actor: str = "") -> Any:
    """`retriever` behind the source's breaker and, when it has one, its cluster-wide limit.
    The breaker opening and closing are audited (the source's name, counts)."""

    def told(state: str, detail: dict[str, Any]) -> None:
        outcome = "error" if state == "open" else "ok"
        try:
            core.catalog.audit(
                actor,
                "source.breaker",
                project or None,
                outcome,
                source=src.name,
                state=state,
                **detail,
            )
        except Exception as e:  # noqa: BLE001 - the audit row is not worth stopping for
            log.warning("breaker of %s not audited (%s)", src.name, type(e).__name__)

    slots = SourceSlots(core.catalog, src.name, src.cluster_limit) if src.cluster_limit else None

    def probe() -> None:  # an association like any other: within the source's limit
        if slots is None:
            retriever.echo()
            return
        with slots.held():
            retriever.echo()

    breaker = Breaker(src, probe, core.catalog, told)
    return Guarded(retriever, breaker, slots, core.catalog, src.max_rate)
