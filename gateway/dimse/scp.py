"""The gateway's Storage SCP: accepts C-STORE (all storage SOP classes) and C-ECHO, and hands each
received instance to one handler, `on_store(event) -> status` (a `ReceivedInstance`: the dataset
still encoded, decoded when its `dataset` is read, as pynetdicom's `EVT_C_STORE` handlers get it).

One thread per association reads PDUs straight off a buffered socket and parses only what a
storage SCP needs (see `ul.py`); this receives 512x512 CT several times faster than a pynetdicom
AE. Non-blocking: `start()` returns once listening; `stop()` aborts open associations.

With `workers=N` the associations are served by N worker processes instead (see `workers.py`),
each running a `Handler` built there by a picklable `handler_factory`: real multi-core receiving.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Collection
from typing import cast

from dicom.status import CANNOT_UNDERSTAND
from gateway.dimse import ul
from gateway.dimse.service import (
    FAILED,
    RECEIVED,
    Handler,
    OnStore,
    Service,
    supported_contexts,
)
from gateway.dimse.workers import MAX_PREFIX, WorkerConfig, WorkerPool

log = logging.getLogger(__name__)

MAX_WAITING = 256  # connections accepted whose association request has not come whole yet


def _request_read(got: bytearray) -> bool:
    """Whether what a new connection sent is enough to hand it over: a whole A-ASSOCIATE-RQ,
    or anything that is not one (the association's own code answers it: reject, abort)."""
    if len(got) < 6:
        return False
    pdu_type, _, length = ul.PDU_HEADER.unpack_from(got)
    if pdu_type != ul.ASSOCIATE_RQ or 6 + length > MAX_PREFIX:
        return True
    return len(got) >= 6 + length


def _not_started(*_args: object) -> int:
    return CANNOT_UNDERSTAND


class StorageSCP:
    """Storage SCP on `host:port` (port 0 picks a free one); also a context manager.

    Give one of: `on_store(event)` (a `ReceivedInstance`), or `handler_factory()` returning a
    `Handler` with that same method. It returns the C-STORE status and is called from one thread
    per association, so concurrently.

    `workers=N > 0` serves associations in N worker processes (needs `handler_factory`, which must
    be picklable: each worker calls it once). With `preload` (module names), workers are forked from
    a fork server that imported those modules once per process, instead of being fresh interpreters:
    much faster to start from the second pool on. The parent only accepts connections and hands each
    to the worker with the fewest open ones. `received` and `failed` add up all workers."""

    def __init__(
        self,
        ae_title: str = "SPHERE",
        host: str = "127.0.0.1",
        port: int = 11112,
        on_store: OnStore | None = None,
        *,
        handler_factory: Callable[[], Handler] | None = None,
        workers: int = 0,
        max_associations: int = 8,
        timeout_s: float = 30.0,
        max_pdu: int = 0,
        transfer_syntaxes: list[str] | None = None,
        preload: list[str] | None = None,
        allowed_callers: Collection[str] | None = None,
    ) -> None:
        if (on_store is None) == (handler_factory is None):
            raise ValueError("give exactly one of on_store and handler_factory")
        if workers < 0 or (workers and handler_factory is None):
            raise ValueError("worker processes need a picklable handler_factory")
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.max_associations = max_associations
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu  # 0 = unlimited: the sender uses its largest PDU
        self.workers = workers
        self.handler_factory = handler_factory
        self.transfer_syntaxes = transfer_syntaxes
        self.preload = preload
        # Calling AE titles that may associate (None: any); others are rejected, permanently.
        self.allowed_callers = frozenset(allowed_callers) if allowed_callers is not None else None
        self.start_seconds = 0.0  # how long start() took (worker start-up, mostly)
        # With a handler_factory, the handler is built by start().
        store = on_store if on_store is not None else _not_started
        self._service = Service(
            supported_contexts(transfer_syntaxes),
            max_pdu,
            timeout_s,
            max_associations,
            store,
            allowed_callers=self.allowed_callers,
        )
        self._pool: WorkerPool | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._next_id = 0

    def set_callback(self, on_store: OnStore) -> None:
        """Swap the storage callback while running (takes effect for the next C-STORE).
        Not with worker processes: their handlers live there."""
        if self.workers:
            raise RuntimeError("set_callback does not reach worker processes")
        self._service.store = on_store

    @property
    def port(self) -> int:
        """The bound port (the real one once started with port 0)."""
        return self._sock.getsockname()[1] if self._sock is not None else self._port

    @property
    def running(self) -> bool:
        return self._sock is not None

    @property
    def received(self) -> int:
        """Datasets handed to the callback (decodable, matching their request)."""
        return self._count(RECEIVED)

    @property
    def failed(self) -> int:
        """C-STOREs answered with a failure status."""
        return self._count(FAILED)

    @property
    def open_associations(self) -> int:
        """Connections being served now (including any not past negotiation yet): 0 once every
        association has ended and its on_release has returned."""
        if self._pool is not None:
            return self._pool.open_connections()
        with self._lock:
            return len(self._conns)

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (empty without workers)."""
        return self._pool.pids() if self._pool is not None else []

    def _count(self, slot: int) -> int:
        if self._pool is not None:
            return self._pool.count(slot)
        return self._service.counts[slot]

    def start(self) -> StorageSCP:
        """Bind, listen (and start the workers, in parallel, waiting until all are ready), then
        serve in the background. Raises if a worker cannot start (its handler_factory failed)."""
        if self._sock is not None:
            return self
        t0 = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(64)
            sock.settimeout(0.2)  # lets the accept loop notice stop()
            if self.workers:
                config = WorkerConfig(
                    self.max_pdu, self.timeout_s, self.transfer_syntaxes, self.allowed_callers
                )
                assert self.handler_factory is not None
                pool = WorkerPool(self.workers, self.handler_factory, config, self.preload)
                self._pool = pool.start()
            elif self.handler_factory is not None:
                handler = self.handler_factory()
                self._service = Service(
                    self._service.supported,
                    self.max_pdu,
                    self.timeout_s,
                    self.max_associations,
                    handler.on_store,
                    handler,
                    allowed_callers=self.allowed_callers,
                )
        except BaseException:
            sock.close()
            raise
        self._service.running = True
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="storage-scp", daemon=True)
        self._thread.start()
        self.start_seconds = time.perf_counter() - t0
        log.info(
            "storage SCP %s listening on %s:%d (%s), started in %.2fs",
            self.ae_title,
            self.host,
            self.port,
            f"{self.workers} worker processes" if self.workers else "threads",
            self.start_seconds,
        )
        return self

    def stop(self) -> None:
        """Stop listening, abort open associations, wait for their threads (and workers)."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._service.running = False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop now, not at its timeout
        if self._thread is not None:
            self._thread.join()
        sock.close()
        if self._pool is not None:
            self._pool.stop(self.timeout_s)
            return  # the counters stay readable
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            # Wakes the association's blocked read; the peer sees the connection drop.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, thread in conns:
            thread.join(timeout=self.timeout_s)

    def __enter__(self) -> StorageSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        """Accept connections, and read each one's A-ASSOCIATE-RQ here before handing it to a
        thread or a worker: a peer that says nothing, or stalls halfway through its request,
        costs no thread and no association slot, and is closed after `timeout_s` (past
        MAX_WAITING of them, the oldest first)."""
        listener = self._sock
        if listener is None:
            return
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        waiting: dict[socket.socket, tuple[float, bytearray]] = {}  # since when, what came

        def drop(conn: socket.socket) -> None:
            sel.unregister(conn)
            del waiting[conn]
            conn.close()

        try:
            while self._sock is not None:
                for key, _ in sel.select(0.2):
                    if key.fileobj is listener:
                        conn = self._accept(listener)
                        if conn is None:
                            return
                        waiting[conn] = (time.monotonic(), bytearray())
                        sel.register(conn, selectors.EVENT_READ)
                        if len(waiting) > MAX_WAITING:
                            drop(next(iter(waiting)))
                        continue
                    client = cast(socket.socket, key.fileobj)  # only sockets are registered
                    got = waiting[client][1]
                    try:
                        chunk = client.recv(65536)
                    except OSError:
                        chunk = b""
                    if not chunk:
                        drop(client)
                        continue
                    got += chunk
                    if _request_read(got):
                        sel.unregister(client)
                        del waiting[client]
                        client.setblocking(True)
                        self._hand_over(client, bytes(got))
                cutoff = time.monotonic() - self.timeout_s
                for conn in [c for c, (t, _) in waiting.items() if t < cutoff]:
                    log.warning("a connection sent no association request in %gs: closed",
                                self.timeout_s)  # fmt: skip
                    drop(conn)
        finally:
            for conn in waiting:
                conn.close()
            sel.close()

    def _accept(self, listener: socket.socket) -> socket.socket | None:
        try:
            conn, _addr = listener.accept()
        except OSError:
            return None  # stop() shut the listener
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setblocking(False)
        return conn

    def _hand_over(self, conn: socket.socket, prefix: bytes) -> None:
        if self._pool is not None:
            self._pool.dispatch(conn, self.max_associations, prefix)
            return
        conn.settimeout(self.timeout_s)
        self._next_id += 1
        args = (conn, self._next_id, prefix)
        thread = threading.Thread(target=self._serve, args=args, daemon=True)
        with self._lock:
            self._conns[conn] = thread
        thread.start()

    def _serve(self, conn: socket.socket, assoc_id: int, prefix: bytes) -> None:
        try:
            self._service.serve(conn, assoc_id, prefix=prefix)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
