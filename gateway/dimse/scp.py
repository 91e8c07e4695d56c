"""The gateway's Storage SCP: accepts C-STORE (all storage SOP classes) and C-ECHO, and hands each
received dataset to `on_store(ds, calling_ae) -> status`.

One thread per association reads PDUs straight off a buffered socket and parses only what a
storage SCP needs (see `ul.py`); this receives 512x512 CT several times faster than a pynetdicom
AE. Non-blocking: `start()` returns once listening; `stop()` aborts open associations.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from typing import TYPE_CHECKING, Any, BinaryIO

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from gateway.dimse import ul
from gateway.dimse.common import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DECODE_FAILED,
    STORAGE_TRANSFER_SYNTAXES,
    UNCOMPRESSED,
    is_failure,
)

if TYPE_CHECKING:
    from gateway.config import Settings

log = logging.getLogger(__name__)

OnStore = Callable[[Dataset, str], int]

_STORAGE_CLASSES = [cx.abstract_syntax for cx in AllStoragePresentationContexts]


def call_on_store(callback: Callable[[Any, str], int], item: Any, calling_ae: str) -> int:
    """Run a storage callback; any exception becomes 0xC000 and a log line without PHI."""
    try:
        return int(callback(item, calling_ae))
    except Exception as exc:
        # The exception text may quote dataset values: log its type only.
        log.error(
            "storage callback failed on an instance from %s (%s): answered 0x%04X",
            calling_ae,
            type(exc).__name__,
            CANNOT_UNDERSTAND,
        )
        return CANNOT_UNDERSTAND


def _ui(tag: int, value: str) -> RawDataElement:
    raw = value.encode("ascii")
    raw += b"\x00" * (len(raw) % 2)
    return RawDataElement(BaseTag(tag), "UI", len(raw), raw, 0, False, True)


_IMPLEMENTATION = _ui(0x00020012, ul.IMPLEMENTATION_CLASS_UID)


def decode_dataset(data: bytes, syntax: UID, sop_class: str, sop_instance: str) -> Dataset:
    """Parse a received dataset (values stay raw until read) and attach its file meta."""
    if syntax == DeflatedExplicitVRLittleEndian:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    # Raw elements: validated only if read, which saves ~50 us per instance.
    meta = FileMetaDataset()
    meta[0x00020002] = _ui(0x00020002, sop_class)
    meta[0x00020003] = _ui(0x00020003, sop_instance)
    meta[0x00020010] = _ui(0x00020010, syntax)
    meta[0x00020012] = _IMPLEMENTATION
    ds.file_meta = meta
    return ds


@dataclass(frozen=True)
class ReceivedInstance:
    """A received C-STORE dataset, still encoded: for spooling as-is and decoding later (in
    another process, say), which keeps the association's round trip short."""

    sop_class: str
    sop_instance: str = field(repr=False)
    transfer_syntax: UID
    data: bytes = field(repr=False)  # the dataset as sent (deflated if the syntax says so)

    def dataset(self) -> Dataset:
        """Decode (values stay raw until read), with file meta."""
        return decode_dataset(self.data, self.transfer_syntax, self.sop_class, self.sop_instance)

    def write(self, fp: BinaryIO) -> None:
        """Write as a DICOM Part 10 file, bytes unchanged."""
        fp.write(ul.part10_header(self.sop_class, self.sop_instance, self.transfer_syntax))
        fp.write(self.data)


OnReceive = Callable[[ReceivedInstance, str], int]
# What the SCP and the C-GET SCU run per C-STORE: (data, syntax, sop class, instance, AE) -> status
StoreHandler = Callable[[bytes, UID, str, str, str], int]


def store_handler(on_store: OnStore | None, on_receive: OnReceive | None) -> StoreHandler:
    """The per-C-STORE handler for exactly one of the two callback kinds."""
    if (on_store is None) == (on_receive is None):
        raise ValueError("give exactly one of on_store and on_receive")
    if on_receive is not None:
        receive = on_receive

        def raw(data: bytes, syntax: UID, sop_class: str, sop_instance: str, ae: str) -> int:
            return call_on_store(
                receive, ReceivedInstance(sop_class, sop_instance, syntax, data), ae
            )

        return raw
    store = on_store

    def decoded(data: bytes, syntax: UID, sop_class: str, sop_instance: str, ae: str) -> int:
        return store_received(store, data, syntax, sop_class, sop_instance, ae)

    return decoded


def store_received(
    on_store: OnStore, data: bytes, syntax: UID, sop_class: str, sop_instance: str, calling_ae: str
) -> int:
    """Decode one received C-STORE dataset, check it against its request, run the callback;
    returns the C-STORE status. Nothing raises: failures are statuses and log lines without PHI."""
    try:
        ds = decode_dataset(data, syntax, sop_class, sop_instance)
        matches = ds.get("SOPInstanceUID") == sop_instance and ds.get("SOPClassUID") == sop_class
    except Exception as exc:
        log.warning(
            "undecodable dataset from %s (%s): answered 0x%04X",
            calling_ae,
            type(exc).__name__,
            DECODE_FAILED,
        )
        return DECODE_FAILED
    if not matches:
        log.warning(
            "dataset from %s does not match its C-STORE request: answered 0x%04X",
            calling_ae,
            DATASET_MISMATCH,
        )
        return DATASET_MISMATCH
    return call_on_store(on_store, ds, calling_ae)


class _Association:
    """One accepted connection, served on its own thread until release, abort or timeout."""

    def __init__(self, scp: StorageSCP, sock: socket.socket) -> None:
        self.scp = scp
        self.ch = ul.Channel(sock)
        self.calling_ae = "?"

    def run(self) -> None:
        try:
            self._serve()
        except ul.PeerGone:
            log.debug("association with %s: connection closed by peer", self.calling_ae)
        except ul.PeerAborted:
            log.info("association with %s aborted by peer", self.calling_ae)
        except TimeoutError:
            log.warning(
                "association with %s: nothing received for %gs, aborting",
                self.calling_ae,
                self.scp.timeout_s,
            )
            self.ch.abort()
        except OSError:
            if self.scp.running:
                log.warning("association with %s: connection error", self.calling_ae)
        except Exception as exc:
            log.error(
                "association with %s: protocol error (%s), aborting",
                self.calling_ae,
                type(exc).__name__,
            )
            self.ch.abort()
        finally:
            self.ch.close()

    def _serve(self) -> None:
        pdu_type, rq = self.ch.read_pdu()
        if pdu_type != ul.ASSOCIATE_RQ:
            raise ul.ProtocolError("expected A-ASSOCIATE-RQ")
        if not self.scp._admit():
            # transient, service-provider (presentation), local limit exceeded
            self.ch.send(ul.reject_pdu(2, 3, 2))
            log.warning(
                "association refused: %d associations already open", self.scp.max_associations
            )
            return
        try:
            neg = ul.negotiate(rq, self.scp._supported, self.scp.max_pdu)
            self.calling_ae = neg.calling_ae
            self.ch.peer_max_pdu = neg.peer_max_pdu
            self.ch.contexts = neg.contexts
            self.ch.send(neg.ac_pdu)
            log.debug(
                "association from %s accepted, %d contexts", neg.calling_ae, len(neg.contexts)
            )
            self._loop()
        finally:
            self.scp._leave()

    def _loop(self) -> None:
        while True:
            try:
                cx_id, cmd, data = self.ch.read_message()
            except ul.ReleaseRequested:
                self.ch.send(ul.RELEASE_RP_PDU)
                return
            field = ul.us(cmd.get(ul.COMMAND_FIELD))
            if field == ul.C_STORE_RQ and data is not None:
                sop_class = ul.ui(cmd.get(ul.AFFECTED_SOP_CLASS))
                sop_instance = ul.ui(cmd.get(ul.AFFECTED_SOP_INSTANCE))
                status = self.scp._handle(
                    data, self.ch.contexts[cx_id], sop_class, sop_instance, self.calling_ae
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


class StorageSCP:
    """Storage SCP on `host:port` (port 0 picks a free one); also a context manager.

    Give `on_store(ds, calling_ae)` (decoded dataset) or `on_receive(instance, calling_ae)` (still
    encoded, see ReceivedInstance); either returns the C-STORE status and is called from one
    thread per association, so concurrently."""

    def __init__(
        self,
        ae_title: str = "SPHERE",
        host: str = "127.0.0.1",
        port: int = 11112,
        on_store: OnStore | None = None,
        *,
        on_receive: OnReceive | None = None,
        max_associations: int = 8,
        timeout_s: float = 30.0,
        max_pdu: int = 0,
        transfer_syntaxes: list[str] | None = None,
    ) -> None:
        self._handler = store_handler(on_store, on_receive)
        self.ae_title = ae_title
        self.host = host
        self._port = port
        self.max_associations = max_associations
        self.timeout_s = timeout_s
        self.max_pdu = max_pdu  # 0 = unlimited: the sender uses its largest PDU
        self.received = 0  # datasets handed to on_store
        self.failed = 0  # C-STOREs answered with a failure status
        self._supported = ul.supported_contexts([Verification], UNCOMPRESSED)
        # Our order of preference among what the sender proposes: uncompressed first.
        syntaxes = transfer_syntaxes or STORAGE_TRANSFER_SYNTAXES
        self._supported += ul.supported_contexts(_STORAGE_CLASSES, syntaxes)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active = 0
        self._conns: dict[socket.socket, threading.Thread] = {}

    def set_callback(
        self, on_store: OnStore | None = None, *, on_receive: OnReceive | None = None
    ) -> None:
        """Swap the storage callback while running (takes effect for the next C-STORE)."""
        self._handler = store_handler(on_store, on_receive)

    @classmethod
    def from_settings(cls, settings: Settings, on_store: OnStore) -> StorageSCP:
        """Listen on the gateway's AE title, host and port, with its timeout. Room for more
        associations than the pull opens: a PACS may hold one open a while after a C-MOVE."""
        return cls(
            settings.ae_title,
            settings.host,
            settings.port,
            on_store,
            max_associations=max(8, 4 * settings.max_associations),
            timeout_s=settings.timeout_s,
        )

    @property
    def port(self) -> int:
        """The bound port (the real one once started with port 0)."""
        return self._sock.getsockname()[1] if self._sock is not None else self._port

    @property
    def running(self) -> bool:
        return self._sock is not None

    def start(self) -> StorageSCP:
        """Bind, listen, and serve in background threads."""
        if self._sock is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(64)
        sock.settimeout(0.2)  # lets the accept loop notice stop()
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="storage-scp", daemon=True)
        self._thread.start()
        log.info("storage SCP %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop listening, abort open associations, wait for their threads."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._thread is not None:
            self._thread.join()
        sock.close()
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
        while True:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, _addr = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._conns[conn] = thread
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            _Association(self, conn).run()
        finally:
            with self._lock:
                self._conns.pop(conn, None)

    def _admit(self) -> bool:
        with self._lock:
            if self._active >= self.max_associations:
                return False
            self._active += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._active -= 1

    def _handle(
        self, data: bytes, syntax: UID, sop_class: str, sop_instance: str, calling_ae: str
    ) -> int:
        status = self._handler(data, syntax, sop_class, sop_instance, calling_ae)
        with self._lock:
            if status not in (DECODE_FAILED, DATASET_MISMATCH):
                self.received += 1
            if is_failure(status):
                self.failed += 1
        return status
