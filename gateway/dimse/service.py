"""Serving one Storage SCP association: negotiation, C-ECHO, C-STORE, release, and what is
each instance handed to one handler shape, `on_store(event)` (a `ReceivedInstance`, as
pynetdicom's `EVT_C_STORE` handler gets its event), or a `Handler` with the same method.

Used by the listener (`scp.StorageSCP`, one thread per association) and by the worker processes
(`workers.py`), which serve associations handed to them the same way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import replace
from typing import Any, Protocol

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom.received import Mismatch, ReceivedInstance, Undecodable
from dicom.status import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DECODE_FAILED,
    OUT_OF_RESOURCES,
    is_failure,
)
from gateway.dimse import ul
from gateway.dimse.common import STORAGE_TRANSFER_SYNTAXES, UNCOMPRESSED

log = logging.getLogger(__name__)

_STORAGE_CLASSES = [
    cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax
]
_ANSWERS = 8  # association requests remembered per service


# The one handler shape: a received instance (the dataset decoded when read) -> C-STORE status.
OnStore = Callable[[ReceivedInstance], int]


def call_on_store(on_store: OnStore, event: ReceivedInstance) -> int:
    """Run the storage handler; what it raises becomes a status and a log line without PHI:
    an undecodable dataset 0xC210, one that does not match its request 0xA900, a full disk
    0xA700, anything else 0xC000."""
    ae = event.calling_ae
    try:
        return int(on_store(event))
    except Undecodable as exc:
        log.warning("undecodable dataset from %s (%s): answered 0x%04X", ae, exc, DECODE_FAILED)
        return DECODE_FAILED
    except Mismatch:
        log.warning(
            "dataset from %s does not match its C-STORE request: answered 0x%04X",
            ae,
            DATASET_MISMATCH,
        )
        return DATASET_MISMATCH
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _failed(ae, exc, CANNOT_UNDERSTAND)
        # A full disk: "out of resources", so the peer knows it may try again later.
        return _failed(ae, exc, OUT_OF_RESOURCES)
    except Exception as exc:
        return _failed(ae, exc, CANNOT_UNDERSTAND)


def _failed(calling_ae: str, exc: BaseException, status: int) -> int:
    # The exception text may quote dataset values: log its type only.
    log.error(
        "storage callback failed on an instance from %s (%s): answered 0x%04X",
        calling_ae,
        type(exc).__name__,
        status,
    )
    return status


class Handler(Protocol):
    """What `handler_factory()` returns: built once per worker process (or once per SCP without
    workers). `on_store(event)` gets each instance (see ReceivedInstance: still encoded, its
    `dataset` decoded when read) and returns the C-STORE status. Optionally also
    `on_association(assoc_id, calling_ae)`, called once the association is accepted (an
    exception aborts it), and `on_release(assoc_id)`, called when it ends: on release before the
    A-RELEASE-RP is sent (so a flush there is done when the peer sees the release), or after an
    abort or a dropped connection. All three run on the association's own thread; associations
    are served concurrently."""

    def on_store(self, event: ReceivedInstance) -> int: ...


def supported_contexts(transfer_syntaxes: Sequence[str] | None = None) -> list[Any]:
    """Verification plus every storage SOP class, in our order of preference of syntaxes."""
    supported = ul.supported_contexts([Verification], UNCOMPRESSED)
    # Our order of preference among what the sender proposes: uncompressed first.
    syntaxes = transfer_syntaxes or STORAGE_TRANSFER_SYNTAXES
    return supported + ul.supported_contexts(_STORAGE_CLASSES, syntaxes)


RECEIVED, FAILED, FINISHED = 0, 1, 2  # counter slots: instances, failures, connections done


class Service:
    """What associations share: contexts, limits, the handler and counters. One per StorageSCP
    in thread mode, one per worker process otherwise (where the parent enforces the limit)."""

    def __init__(
        self,
        supported: list[Any],
        max_pdu: int,
        timeout_s: float,
        max_associations: int | None,
        store: OnStore,
        handler: object = None,
        counts: MutableSequence[int] | memoryview | None = None,
        *,
        allowed_callers: frozenset[str] | None = None,
    ) -> None:
        self.supported = supported
        self.allowed_callers = allowed_callers  # None: any calling AE title
        self.max_pdu = max_pdu
        self.timeout_s = timeout_s
        self.max_associations = max_associations  # None: not checked here
        self.store = store
        self.on_association = getattr(handler, "on_association", None)
        self.on_release = getattr(handler, "on_release", None)
        self.counts = counts if counts is not None else [0, 0, 0]
        self.running = True
        self.lock = threading.Lock()
        self.active = 0
        self._serving: set[_Association] = set()  # watched for their deadlines
        self._watchdog: threading.Thread | None = None
        # A peer asks in the same words every time (a PACS proposes its ~120 storage contexts
        # for each C-MOVE), and pynetdicom takes ~6 ms to answer: answer a repeat from memory.
        self._answers: OrderedDict[bytes, ul.Negotiated] = OrderedDict()

    def negotiate(self, rq: bytes) -> ul.Negotiated:
        """`ul.negotiate` with this service's contexts and limit, remembered per request."""
        with self.lock:
            neg = self._answers.get(rq)
            if neg is not None:
                self._answers.move_to_end(rq)
        if neg is None:
            neg = ul.negotiate(rq, self.supported, self.max_pdu)
            with self.lock:
                self._answers[rq] = neg
                while len(self._answers) > _ANSWERS:
                    self._answers.popitem(last=False)
        return replace(neg, contexts=dict(neg.contexts), abstract=dict(neg.abstract))

    def admit(self) -> bool:
        if self.max_associations is None:
            return True
        with self.lock:
            if self.active >= self.max_associations:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        if self.max_associations is not None:
            with self.lock:
                self.active -= 1

    def finished(self) -> None:
        with self.lock:
            self.counts[FINISHED] += 1

    def handle(self, event: ReceivedInstance) -> int:
        status = call_on_store(self.store, event)
        counted = status not in (DECODE_FAILED, DATASET_MISMATCH)
        failed = is_failure(status)
        with self.lock:
            self.counts[RECEIVED] += counted
            self.counts[FAILED] += failed
        return status

    def serve(
        self, sock: socket.socket, assoc_id: int, refuse: bool = False, prefix: bytes = b""
    ) -> None:
        """Serve one accepted connection to its end (on the calling thread); `prefix` is what
        the acceptor already read of it (the association request)."""
        assoc = _Association(self, sock, assoc_id, refuse, prefix)
        with self.lock:
            self._serving.add(assoc)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="scp-watchdog")
                self._watchdog.daemon = True
                self._watchdog.start()
        try:
            assoc.run()
        finally:
            with self.lock:
                self._serving.discard(assoc)
            self.finished()

    def _watch(self) -> None:
        """Drop associations past their deadline. A socket timeout bounds each read only: a
        peer sending a byte now and then would otherwise hold its connection for ever."""
        period = max(0.05, min(1.0, self.timeout_s / 4))
        while True:
            time.sleep(period)
            now = time.monotonic()
            with self.lock:
                late = [a for a in self._serving if (a.ch.deadline or now) < now]
            for assoc in late:
                assoc.expire()


class _HookFailed(Exception):
    """on_association raised: the association is aborted."""


class _Association:
    """One accepted connection, served on its own thread until release, abort or timeout."""

    def __init__(
        self,
        service: Service,
        sock: socket.socket,
        assoc_id: int,
        refuse: bool = False,
        prefix: bytes = b"",
    ) -> None:
        self.service = service
        self.ch = ul.Channel(sock, prefix)
        self.calling_ae = "?"
        self.assoc_id = assoc_id
        self.refuse = refuse  # the limit was checked by whoever accepted the connection
        self.established = False
        self.expired = False

    def expire(self) -> None:
        """Past its deadline: wake the blocked read (it fails) and end the association."""
        self.expired = True
        self.ch.deadline = None
        with contextlib.suppress(OSError):
            self.ch.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        try:
            self._serve()
        except Exception:
            if not self.expired:
                self._fail()
            else:
                log.warning(
                    "association with %s: too slow (under %d bytes/s past %gs), dropped",
                    self.calling_ae,
                    ul.MIN_RATE,
                    self.service.timeout_s,
                )
        finally:
            self.ch.close()
            self._released()

    def _fail(self) -> None:
        """Say why the association ended (re-raising the exception being handled)."""
        try:
            raise
        except ul.PeerGone:
            log.debug("association with %s: connection closed by peer", self.calling_ae)
        except ul.PeerAborted:
            log.info("association with %s aborted by peer", self.calling_ae)
        except TimeoutError:
            log.warning(
                "association with %s: nothing received for %gs, aborting",
                self.calling_ae,
                self.service.timeout_s,
            )
            self.ch.abort()
        except _HookFailed:
            self.ch.abort()
        except OSError:
            if self.service.running:
                log.warning("association with %s: connection error", self.calling_ae)
        except Exception as exc:
            log.error(
                "association with %s: protocol error (%s), aborting",
                self.calling_ae,
                type(exc).__name__,
            )
            self.ch.abort()

    def _serve(self) -> None:
        self.ch.allow(self.service.timeout_s)
        pdu_type, rq = self.ch.read_pdu()
        if pdu_type != ul.ASSOCIATE_RQ:
            raise ul.ProtocolError("expected A-ASSOCIATE-RQ")
        service = self.service
        if self.refuse or not service.admit():
            # transient, service-provider (presentation), local limit exceeded
            self.ch.send(ul.reject_pdu(2, 3, 2))
            log.warning("association refused: %s associations already open", self._limit())
            return
        try:
            neg = service.negotiate(rq)
            self.calling_ae = neg.calling_ae
            allowed = service.allowed_callers
            if allowed is not None and neg.calling_ae.strip() not in allowed:
                # permanent, service-user, calling AE title not recognised
                self.ch.send(ul.reject_pdu(1, 1, 3))
                log.warning("association refused: calling AE %r is not allowed", neg.calling_ae)
                return
            self.ch.peer_max_pdu = neg.peer_max_pdu
            self.ch.contexts = neg.contexts
            self.ch.send(neg.ac_pdu)
            self.established = True
            log.debug(
                "association from %s accepted, %d contexts", neg.calling_ae, len(neg.contexts)
            )
            if service.on_association is not None:
                self._hook("on_association", service.on_association, self.assoc_id, neg.calling_ae)
            self._loop()
        finally:
            service.leave()

    def _limit(self) -> str:
        n = self.service.max_associations
        return "too many" if n is None else str(n)

    def _hook(self, name: str, hook: Callable[..., object], *args: object) -> None:
        try:
            hook(*args)
        except Exception as exc:
            log.error(
                "association with %s: %s failed (%s), aborting",
                self.calling_ae,
                name,
                type(exc).__name__,
            )
            raise _HookFailed from None

    def _released(self) -> None:
        """on_release, once, for an association that was accepted."""
        if self.established:
            self.established = False
            if self.service.on_release is not None:
                with contextlib.suppress(_HookFailed):
                    self._hook("on_release", self.service.on_release, self.assoc_id)

    def _loop(self) -> None:
        handle = self.service.handle
        timeout_s = self.service.timeout_s
        while True:
            self.ch.allow(timeout_s)
            try:
                cx_id, cmd, data = self.ch.read_message()
            except ul.ReleaseRequested:
                self.ch.deadline = None  # on_release may take its time (a flush)
                self._released()
                self.ch.send(ul.RELEASE_RP_PDU)
                return
            self.ch.deadline = None  # the handler's time is not the peer's
            field = ul.us(cmd.get(ul.COMMAND_FIELD))
            if field == ul.C_STORE_RQ and data is not None:
                sop_class = ul.ui(cmd.get(ul.AFFECTED_SOP_CLASS))
                sop_instance = ul.ui(cmd.get(ul.AFFECTED_SOP_INSTANCE))
                syntax = self.ch.contexts[cx_id]
                status = handle(
                    ReceivedInstance(sop_class, sop_instance, syntax, data, self.calling_ae)
                )
                self._respond(cx_id, ul.C_STORE_RSP, cmd, status)
            elif field == ul.C_ECHO_RQ:
                self._respond(cx_id, ul.C_ECHO_RSP, cmd, 0x0000)
            else:
                raise ul.ProtocolError(f"unsupported DIMSE command 0x{field or 0:04X}")

    def _respond(self, cx_id: int, field: int, cmd: dict[int, bytes], status: int) -> None:
        rsp = ul.response_command(
            field,
            ul.us(cmd.get(ul.MESSAGE_ID)) or 0,
            status,
            ul.ui(cmd.get(ul.AFFECTED_SOP_CLASS)),
            ul.ui(cmd.get(ul.AFFECTED_SOP_INSTANCE)),
        )
        self.ch.send_message(cx_id, rsp)
