"""Worker processes for the Storage SCP: real multi-core receiving.

Each worker is a fresh interpreter (like multiprocessing's spawn, without its helper processes) that
gets its settings and the pickled `handler_factory` on stdin; or, with `preload`, a fork of this
process's fork server, which imported those modules once (see forkserver.py). Either way it calls
the factory once and then serves the connections the parent hands it, each on its own thread,
exactly as the SCP does in thread mode. The parent accepts connections and passes each socket
(SCM_RIGHTS over a Unix SOCK_SEQPACKET pair) to the worker with the fewest open connections, with an
association id and whether the association limit is already reached. Counters live in a small file
mapped by both sides (one writer per slot). A worker that dies is reaped, reported and restarted;
its connections die with it, which their peers see as aborted associations. A worker whose parent
goes away sees its channel close and exits.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from gateway.dimse.forkserver import Forked, ForkServer
from gateway.dimse.service import FINISHED, Service, supported_contexts

log = logging.getLogger(__name__)

_HANDOFF = struct.Struct("<QB")  # association id, refuse (limit reached); then the prefix
MAX_PREFIX = 128 << 10  # the most of an association request the parent reads before handing over
_READY, _FAILED = b"R", b"F"
_SLOTS = 3  # counters per worker: received, failed, finished connections (see scp.py)
_MAX_RESTARTS = 5  # per worker; beyond that a crash loop is not worth feeding
_JOIN_S = 10.0  # how long a stopping worker waits for its associations' threads
_START_S = 120.0  # how long start() waits for the workers to be ready
# The child reads all of stdin at once (the parent never waits on it), sets sys.path (so the
# factory's module can be found), then unpickles the rest.
_FORKED_ENTRY = "gateway.dimse.workers:serve_worker"  # what the fork server runs in a worker
_BOOT = (
    "import io, pickle, sys; f = io.BytesIO(sys.stdin.buffer.read()); "
    "sys.path[:] = pickle.load(f); from gateway.dimse.workers import worker_main; worker_main(f)"
)


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to negotiate and serve associations (picklable)."""

    max_pdu: int
    timeout_s: float
    transfer_syntaxes: list[str] | None = None
    allowed_callers: frozenset[str] | None = None


def worker_main(boot: BinaryIO) -> None:
    """A worker process: build the handler, then serve each connection handed over the channel
    on its own thread until the parent closes the channel (or dies)."""
    serve_worker(*pickle.load(boot))


def serve_worker(
    chan_fd: int,
    counts_fd: int,
    index: int,
    n_slots: int,
    config: WorkerConfig,
    factory_pickle: bytes,
    level: int,
) -> None:
    """Run as a worker on these descriptors (in a fresh interpreter or a fork); never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s [scp worker {index}]: %(message)s",
    )
    chan = socket.socket(fileno=chan_fd)
    counts = memoryview(mmap.mmap(counts_fd, n_slots * _SLOTS * 8)).cast("q")
    counts = counts[index * _SLOTS : (index + 1) * _SLOTS]
    try:
        handler = pickle.loads(factory_pickle)()
        store = handler.on_store
    except Exception as exc:
        log.error("handler factory failed (%s)", type(exc).__name__)
        with contextlib.suppress(OSError):
            chan.sendall(_FAILED)
        sys.exit(1)
    service = Service(
        supported_contexts(config.transfer_syntaxes),
        config.max_pdu,
        config.timeout_s,
        None,  # the parent checks the association limit
        store,
        handler,
        counts,
        allowed_callers=config.allowed_callers,
    )
    _serve_handed(chan, service, config.timeout_s)
    close = getattr(handler, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()
    logging.shutdown()
    sys.stderr.flush()
    # Nothing is left to flush: skip the interpreter's teardown (a few hundred ms with the
    # scientific stack loaded), which every pull would otherwise wait for.
    os._exit(0)


def _serve_handed(chan: socket.socket, service: Service, timeout_s: float) -> None:
    conns: dict[socket.socket, threading.Thread] = {}
    lock = threading.Lock()

    def serve(conn: socket.socket, assoc_id: int, refuse: bool, prefix: bytes) -> None:
        try:
            service.serve(conn, assoc_id, refuse, prefix)
        finally:
            with lock:
                conns.pop(conn, None)

    chan.sendall(_READY)
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, _HANDOFF.size + MAX_PREFIX, 4)
        except OSError:
            break
        if not msg:
            break  # the parent closed its end: stop
        for extra in fds[1:]:  # never sent; don't leak them
            with contextlib.suppress(OSError):
                socket.close(extra)
        if not fds:
            continue
        conn = socket.socket(fileno=fds[0])
        assoc_id, refuse = _HANDOFF.unpack(msg[: _HANDOFF.size])
        conn.settimeout(timeout_s)
        args = (conn, assoc_id, bool(refuse), msg[_HANDOFF.size :])
        thread = threading.Thread(target=serve, args=args, daemon=True)
        with lock:
            conns[conn] = thread
        thread.start()
    service.running = False
    with lock:
        open_conns = list(conns.items())
    for conn, _ in open_conns:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)  # the peer sees the connection drop
    deadline = time.monotonic() + _JOIN_S
    for _, thread in open_conns:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    chan.close()


class _Slot:
    """One worker: its process, the parent's end of its channel, its state."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | Forked | None = None
        self.chan: socket.socket | None = None
        self.state = "starting"  # starting, ready, failed (gave up), dead
        self.handed = 0  # connections handed over (parent only)
        self.restarts = 0


class WorkerPool:
    """N worker processes serving the connections the SCP's accept loop hands over."""

    def __init__(
        self,
        n: int,
        handler_factory: Callable[[], object],
        config: WorkerConfig,
        preload: list[str] | None = None,
    ):
        try:
            self.factory_pickle = pickle.dumps(handler_factory)
        except Exception as exc:  # PicklingError, AttributeError, TypeError...
            raise TypeError(f"handler_factory must be picklable ({exc})") from None
        if b"__main__" in self.factory_pickle:
            raise TypeError("handler_factory must be picklable by reference: not from __main__")
        self.config = config
        self.preload = preload
        self.slots = [_Slot(i) for i in range(n)]
        self.running = False
        self._cond = threading.Condition()
        self._next_id = 0
        # An unlinked file, mapped here and in each worker: the counters.
        self._counts_fd, path = tempfile.mkstemp(prefix="sphere-scp-")
        os.unlink(path)
        os.ftruncate(self._counts_fd, n * _SLOTS * 8)
        self._counts = memoryview(mmap.mmap(self._counts_fd, n * _SLOTS * 8)).cast("q")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._monitor: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> WorkerPool:
        """Start every worker at once; wait until all are ready; raise if one is not."""
        self.running = True
        if self.preload is not None:
            ForkServer.shared(self.preload)  # its imports overlap with the set-up below
        for slot in self.slots:
            self._launch(slot)
        self._monitor = threading.Thread(target=self._watch, name="scp-workers", daemon=True)
        self._monitor.start()
        deadline = time.monotonic() + _START_S
        with self._cond:
            while any(s.state == "starting" for s in self.slots):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            failed = [s.index for s in self.slots if s.state != "ready"]
        if failed:
            self.stop(1.0)
            raise RuntimeError(f"storage SCP worker(s) {failed} failed to start (see their log)")
        return self

    def stop(self, timeout_s: float) -> None:
        """Close every channel (the workers abort their associations and exit), then reap
        them; one still there after a while is terminated, then killed."""
        with self._cond:
            self.running = False
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._monitor is not None:
            self._monitor.join()
        for slot in self.slots:
            if slot.chan is not None:
                with contextlib.suppress(OSError):
                    slot.chan.shutdown(socket.SHUT_RDWR)  # EOF for the worker: it stops
        deadline = time.monotonic() + min(timeout_s, _JOIN_S) + 2.0
        for slot in self.slots:
            self._reap(slot, max(0.1, deadline - time.monotonic()))
            if slot.chan is not None:
                slot.chan.close()
                slot.chan = None
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()
        os.close(self._counts_fd)  # the mapping stays: the counters remain readable

    def pids(self) -> list[int]:
        """Process ids of the ready workers."""
        with self._cond:
            return [s.process.pid for s in self.slots if s.state == "ready" and s.process]

    def open_connections(self) -> int:
        """Connections handed to workers and not finished yet."""
        with self._cond:
            return sum(self._load(s) for s in self.slots)

    def count(self, slot: int) -> int:
        return sum(self._counts[s.index * _SLOTS + slot] for s in self.slots)

    def _load(self, slot: _Slot) -> int:
        """Connections handed over and not finished yet."""
        return slot.handed - self._counts[slot.index * _SLOTS + FINISHED]

    # -- hand-over -----------------------------------------------------------------------------

    def dispatch(self, conn: socket.socket, max_associations: int, prefix: bytes = b"") -> None:
        """Hand an accepted connection to the least busy ready worker; closes it here either
        way. With none ready (all restarting), wait a while, then drop the connection."""
        try:
            deadline = time.monotonic() + self.config.timeout_s
            with self._cond:
                while self.running:
                    live = [s for s in self.slots if s.state == "ready"]
                    if not live:
                        left = deadline - time.monotonic()
                        if left <= 0 or all(s.state == "failed" for s in self.slots):
                            break
                        self._cond.wait(min(left, 0.5))
                        continue
                    slot = min(live, key=self._load)
                    refuse = sum(self._load(s) for s in live) >= max_associations
                    self._next_id += 1
                    try:
                        assert slot.chan is not None
                        msg = _HANDOFF.pack(self._next_id, refuse) + prefix
                        socket.send_fds(slot.chan, [msg], [conn.fileno()])
                    except OSError:
                        slot.state = "dead"  # dying: the monitor will see to it
                        continue
                    slot.handed += 1
                    return
            if self.running:
                log.error("no storage SCP worker available: connection dropped")
        finally:
            conn.close()

    # -- workers -------------------------------------------------------------------------------

    def _launch(self, slot: _Slot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A hand-over carries the association request with it: room for the largest.
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_PREFIX)
        counts_fd = self._counts_fd
        level = logging.getLogger("gateway").getEffectiveLevel()
        if self.preload is not None:
            args = (slot.index, len(self.slots), self.config, self.factory_pickle, level)
            server = ForkServer.shared(self.preload)
            try:
                forked = server.fork(_FORKED_ENTRY, args, child.fileno(), counts_fd)
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            with self._cond:
                slot.process, slot.chan, slot.state = forked, parent, "starting"
            self._selector.register(parent, selectors.EVENT_READ, slot)
            return
        boot = pickle.dumps(sys.path) + pickle.dumps(
            (
                child.fileno(),
                counts_fd,
                slot.index,
                len(self.slots),
                self.config,
                self.factory_pickle,
                level,
            )
        )
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOT],
                stdin=subprocess.PIPE,
                stdout=2,  # keep the parent's stdout for its own output
                pass_fds=(child.fileno(), counts_fd),
            )
        finally:
            child.close()
        assert process.stdin is not None
        try:
            process.stdin.write(boot)
            process.stdin.close()
        except OSError:
            pass  # died at once: the channel's EOF says so
        with self._cond:
            slot.process, slot.chan, slot.state = process, parent, "starting"
        self._selector.register(parent, selectors.EVENT_READ, slot)

    def _watch(self) -> None:
        """Read the workers' channels: ready, failed, or closed (the worker died)."""
        while True:
            for key, _ in self._selector.select():
                slot: _Slot | None = key.data
                with self._cond:
                    if not self.running:
                        return
                if slot is None or key.fileobj is not slot.chan:
                    continue
                try:
                    msg = slot.chan.recv(16)
                except OSError:
                    msg = b""
                if msg == _READY:
                    self._set_state(slot, "ready")
                elif msg:  # _FAILED: it logged why and exits
                    self._set_state(slot, "failed")
                else:
                    self._died(slot)

    def _set_state(self, slot: _Slot, state: str) -> None:
        with self._cond:
            slot.state = state
            self._cond.notify_all()

    def _died(self, slot: _Slot) -> None:
        assert slot.chan is not None
        self._selector.unregister(slot.chan)
        with self._cond:  # not while dispatch() sends on it
            chan, was = slot.chan, slot.state
            slot.chan, slot.state = None, "dead"
            slot.handed = self._counts[slot.index * _SLOTS + FINISHED]  # died with it
            chan.close()
        code = self._reap(slot, 2.0)
        if was in ("starting", "failed") or slot.restarts >= _MAX_RESTARTS:
            log.error("storage SCP worker %d exited (code %s); not restarted", slot.index, code)
            self._set_state(slot, "failed")
            return
        slot.restarts += 1
        log.warning(
            "storage SCP worker %d exited (code %s); its associations are lost; restarting",
            slot.index,
            code,
        )
        try:
            self._launch(slot)
        except OSError as exc:
            log.error("storage SCP worker %d could not be restarted (%s)", slot.index, exc)
            self._set_state(slot, "failed")

    def _reap(self, slot: _Slot, timeout_s: float) -> int | None:
        """Wait for the process to exit; terminate, then kill, one that does not in time."""
        process, slot.process = slot.process, None
        if process is None:
            return None
        try:
            return process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("storage SCP worker %d did not stop; terminating it", slot.index)
            process.terminate()
        try:
            return process.wait(2.0)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
