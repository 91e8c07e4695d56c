"""DICOM upper layer (PS3.8) and DIMSE message framing, shared by the Storage SCP and the SCU.

A `Channel` is one TCP connection: it reads PDUs straight off a buffered socket and returns whole
DIMSE messages (command set + optional dataset bytes). A-ASSOCIATE PDUs are encoded, decoded and
negotiated with pynetdicom's PDU classes; the hot path (P-DATA) is done here, because a pynetdicom
association costs about 4 ms of CPU per 512x512 instance (polling threads, events, copies).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

# PDU types
ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

# DIMSE command fields
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101
HAS_DATASET = 0x0001

# Command elements (group 0000)
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED = 0x0120
MOVE_DESTINATION = 0x0600
PRIORITY = 0x0700
DATASET_TYPE = 0x0800
STATUS = 0x0900
AFFECTED_SOP_INSTANCE = 0x1000
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023
MOVE_ORIGINATOR_AE = 0x1030
_UI_ELEMENTS = {AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE}
_AE_ELEMENTS = {MOVE_DESTINATION, MOVE_ORIGINATOR_AE}

IMPLEMENTATION_CLASS_UID = PYNETDICOM_IMPLEMENTATION_UID  # negotiation is pynetdicom's code
IMPLEMENTATION_VERSION = "SPHERE"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

PDU_HEADER = struct.Struct(">BBL")
# The largest PDU other than P-DATA-TF we read: an A-ASSOCIATE-RQ proposing 128 contexts with
# user identity is ~100 KB; a header claiming more is refused before anything is read.
MAX_CONTROL_PDU = 1 << 20
# Reads longer than this go in steps of this: the buffered reader allocates what is asked up
# front, so a peer claiming a 4 GB PDU in 6 bytes would cost 4 GB it never sends.
_READ_STEP = 1 << 20
# A message (or the association request) must arrive within the timeout plus one second per this
# many bytes: a peer trickling a byte now and then cannot hold a connection for ever.
MIN_RATE = 64 << 10
# The largest dataset taken in one C-STORE; past it the association is aborted (memory bound).
MAX_DATASET = 1 << 30
PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")

RELEASE_RQ_PDU = PDU_HEADER.pack(RELEASE_RQ, 0, 4) + b"\x00" * 4
RELEASE_RP_PDU = PDU_HEADER.pack(RELEASE_RP, 0, 4) + b"\x00" * 4


class PeerGone(Exception):
    """The peer closed the TCP connection."""


class PeerAborted(Exception):
    """The peer sent A-ABORT."""


class ReleaseRequested(Exception):
    """The peer sent A-RELEASE-RQ."""


# Proposed presentation contexts: (abstract syntax, its transfer syntaxes in our order).
Contexts = Sequence[tuple[str, Sequence[str]]]


class ProtocolError(ValueError):
    """The peer broke the upper layer or DIMSE protocol."""


def _decode_pdu(pdu: A_ASSOCIATE_RQ | A_ASSOCIATE_AC | A_ASSOCIATE_RJ, data: bytes) -> None:
    """pynetdicom's decode of a received PDU; anything it raises on bad bytes (ValueError,
    KeyError, struct.error, AssertionError...) becomes ProtocolError."""
    try:
        pdu.decode(data)
    except Exception as exc:
        raise ProtocolError(f"undecodable PDU ({type(exc).__name__})") from exc


def abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT; source 0 = service user, 2 = service provider."""
    return PDU_HEADER.pack(ABORT, 0, 4) + bytes([0, 0, source, reason])


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """A-ASSOCIATE-RJ (e.g. 2, 3, 2: transient, provider presentation, local limit exceeded)."""
    prim = A_ASSOCIATE()
    prim.result = result
    prim.result_source = source
    prim.diagnostic = diagnostic
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(prim)
    return pdu.encode()


def _user_information(max_pdu: int) -> list:
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [max_len, impl, version]


# --- association negotiation -------------------------------------------------------------------


@dataclass
class Negotiated:
    """An established association: AE titles, the peer's PDU limit, accepted contexts."""

    calling_ae: str
    called_ae: str
    peer_max_pdu: int  # 0: unlimited
    contexts: dict[int, UID] = field(default_factory=dict)  # context id -> transfer syntax
    abstract: dict[int, str] = field(default_factory=dict)  # context id -> SOP class
    ac_pdu: bytes = b""

    def context_for(self, sop_class: str) -> int | None:
        """The first accepted context id for a SOP class."""
        for cx_id, uid in self.abstract.items():
            if uid == sop_class:
                return cx_id
        return None


def supported_contexts(
    abstract_syntaxes: Sequence[str], syntaxes: Sequence[str]
) -> list[PresentationContext]:
    """Acceptor contexts; the order of `syntaxes` is our preference."""
    out = []
    for uid in abstract_syntaxes:
        cx = PresentationContext()
        cx.abstract_syntax = uid
        cx.transfer_syntax = list(syntaxes)
        out.append(cx)
    return out


def _context_id(cx: PresentationContext) -> int:
    """A parsed context's ID (always present in a well-formed PDU)."""
    if cx.context_id is None:
        raise ProtocolError("a presentation context without an ID")
    return int(cx.context_id)


def negotiate(rq_bytes: bytes, supported: list[PresentationContext], max_pdu: int) -> Negotiated:
    """Acceptor: decode an A-ASSOCIATE-RQ PDU and build the A-ASSOCIATE-AC answering it.
    Raises ProtocolError if the request does not decode or cannot be negotiated."""
    rq = A_ASSOCIATE_RQ()
    _decode_pdu(rq, rq_bytes)
    try:
        prim = rq.to_primitive()
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in prim.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        results, role_items = negotiate_as_acceptor(
            prim.presentation_context_definition_list, supported, roles
        )
    except Exception as exc:  # a well-framed request pynetdicom cannot make sense of
        raise ProtocolError(f"unusable A-ASSOCIATE-RQ ({type(exc).__name__})") from exc
    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT)
    ac.calling_ae_title = prim.calling_ae_title
    ac.called_ae_title = prim.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    ac.user_information = _user_information(max_pdu) + list(role_items)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(ac)
    accepted = [cx for cx in results if cx.result == 0]
    return Negotiated(
        calling_ae=prim.calling_ae_title.strip(),
        called_ae=prim.called_ae_title.strip(),
        peer_max_pdu=prim.maximum_length_received or 0,
        contexts={_context_id(cx): UID(cx.transfer_syntax[0]) for cx in accepted},
        abstract={_context_id(cx): str(cx.abstract_syntax) for cx in accepted},
        ac_pdu=pdu.encode(),
    )


def associate_rq_pdu(
    calling_ae: str,
    called_ae: str,
    contexts: Contexts,
    max_pdu: int,
    scp_roles: Sequence[str] = (),
) -> bytes:
    """Requestor: the A-ASSOCIATE-RQ proposing `contexts` (ids 1, 3, 5...)."""
    rq = A_ASSOCIATE()
    rq.application_context_name = UID(APPLICATION_CONTEXT)
    rq.calling_ae_title = calling_ae
    rq.called_ae_title = called_ae
    items = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = list(syntaxes)
        items.append(cx)
    rq.presentation_context_definition_list = items
    roles = []
    for uid in scp_roles:
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid = uid
        role.scu_role = False
        role.scp_role = True
        roles.append(role)
    rq.user_information = _user_information(max_pdu) + roles
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def parse_associate_ac(
    ac_bytes: bytes, contexts: Contexts, calling_ae: str, called_ae: str
) -> Negotiated:
    """Requestor: the accepted contexts of an A-ASSOCIATE-AC answering our proposal.
    Raises ProtocolError if it does not decode."""
    ac = A_ASSOCIATE_AC()
    _decode_pdu(ac, ac_bytes)
    try:
        prim = ac.to_primitive()
    except Exception as exc:
        raise ProtocolError(f"unusable A-ASSOCIATE-AC ({type(exc).__name__})") from exc
    neg = Negotiated(calling_ae, called_ae, prim.maximum_length_received or 0)
    for cx in prim.presentation_context_definition_results_list:
        cid = _context_id(cx)
        index = (cid - 1) // 2
        if cx.result == 0 and 0 <= index < len(contexts) and cx.transfer_syntax:
            neg.contexts[cid] = UID(cx.transfer_syntax[0])
            neg.abstract[cid] = contexts[index][0]
    return neg


def describe_reject(rj_bytes: bytes) -> str:
    """Human reason of an A-ASSOCIATE-RJ, e.g. 'Rejected (Permanent), ...: Calling AE title
    not recognised'. Raises ProtocolError if it does not decode."""
    rj = A_ASSOCIATE_RJ()
    _decode_pdu(rj, rj_bytes)
    try:
        prim = rj.to_primitive()
        return f"{prim.result_str}, {prim.source_str}: {prim.reason_str}"
    except Exception as exc:
        raise ProtocolError(f"unusable A-ASSOCIATE-RJ ({type(exc).__name__})") from exc


def describe_abort(abort_bytes: bytes) -> str:
    """Who aborted, from an A-ABORT PDU."""
    source = abort_bytes[8] if len(abort_bytes) >= 10 else 0
    reason = abort_bytes[9] if len(abort_bytes) >= 10 else 0
    return "by the peer" if source == 0 else f"by the peer's provider (reason {reason})"


# --- command sets (always Implicit VR Little Endian) ------------------------------------------


def parse_command(data: bytes) -> dict[int, bytes]:
    """Group 0000 elements of a command set: {element number: raw value}."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    unpack = _ELEMENT.unpack_from
    while pos + 8 <= end:
        group, elem, length = unpack(data, pos)
        if group != 0x0000:
            break  # some peers (Orthanc's C-GET-RSP) append (0008,0058) here: not ours to read
        pos += 8
        if pos + length > end:
            raise ProtocolError("malformed command set")
        out[elem] = data[pos : pos + length]
        pos += length
    return out


def us(value: bytes | None) -> int | None:
    return int.from_bytes(value[:2], "little") if value else None


def ui(value: bytes | None) -> str:
    """A UI (or AE) value as ASCII text: a byte outside ASCII reads as '?', so that whatever a
    peer sent can be echoed back in a response (encode_command encodes ASCII)."""
    return value.rstrip(b"\x00 ").decode("ascii", "replace").replace("\ufffd", "?") if value else ""


def encode_command(fields: dict[int, int | str]) -> bytes:
    """A command set from {element: value}: ints are US, strings UI or AE."""
    body = bytearray()
    for elem in sorted(fields):
        value = fields[elem]
        if isinstance(value, int):
            raw = struct.pack("<H", value)
        elif elem in _AE_ELEMENTS:
            raw = value.encode("ascii").ljust(16)[:16]
        else:
            raw = value.encode("ascii")
            raw += b"\x00" * (len(raw) % 2)
        body += _ELEMENT.pack(0, elem, len(raw)) + raw
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + bytes(body)


def response_command(
    command_field: int, message_id: int, status: int, sop_class: str, sop_instance: str = ""
) -> bytes:
    """The command set of a C-STORE-RSP / C-ECHO-RSP (no dataset)."""
    fields: dict[int, int | str] = {
        AFFECTED_SOP_CLASS: sop_class,
        COMMAND_FIELD: command_field,
        MESSAGE_ID_RESPONDED: message_id,
        DATASET_TYPE: NO_DATASET,
        STATUS: status,
    }
    if sop_instance:
        fields[AFFECTED_SOP_INSTANCE] = sop_instance
    return encode_command(fields)


def _fragments(cx_id: int, data: bytes, is_command: bool, peer_max_pdu: int) -> bytes:
    # The PDU length counts its PDV items; each item adds 6 bytes (length, context, flags).
    chunk = max(peer_max_pdu - 6, 64) if peer_max_pdu else max(len(data), 1)
    out = bytearray()
    for start in range(0, max(len(data), 1), chunk):
        piece = data[start : start + chunk]
        flags = (0x01 if is_command else 0x00) | (0x02 if start + chunk >= len(data) else 0x00)
        out += PDU_HEADER.pack(P_DATA_TF, 0, len(piece) + 6)
        out += PDV_HEADER.pack(len(piece) + 2, cx_id, flags)
        out += piece
    return bytes(out)


# --- a connection -----------------------------------------------------------------------------


class Channel:
    """One DICOM TCP connection: whole DIMSE messages in, PDUs out. Not thread-safe."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        self.sock = sock
        self.rfile = sock.makefile("rb", buffering=1 << 16)
        self._prefix = prefix  # what the acceptor read off the socket before handing it over
        self.peer_max_pdu = 0
        self.contexts: dict[int, UID] = {}
        self._pdu_left = 0  # bytes of the current P-DATA-TF PDU not read yet
        # When what is being read must have arrived (time.monotonic()); a watchdog closes the
        # connection past it (see service.Service). None: no deadline.
        self.deadline: float | None = None
        self.max_dataset = MAX_DATASET

    def allow(self, seconds: float) -> None:
        """Start a deadline for the next PDU or message: `seconds`, plus time per byte read."""
        self.deadline = time.monotonic() + seconds

    def read(self, n: int) -> bytes:
        if n > _READ_STEP:  # memory grows with the bytes that arrive, not with a claim
            parts = []
            for start in range(0, n, _READ_STEP):
                parts.append(self.read(min(_READ_STEP, n - start)))
            return b"".join(parts)
        if self.deadline is not None:
            self.deadline += n / MIN_RATE
        if self._prefix:
            data, self._prefix = self._prefix[:n], self._prefix[n:]
            if len(data) < n:
                data += self.rfile.read(n - len(data))
        else:
            data = self.rfile.read(n)
        if len(data) != n:
            raise PeerGone
        return data

    def read_pdu(self) -> tuple[int, bytes]:
        """A whole PDU (type, bytes including its header); ProtocolError for one other than
        P-DATA-TF longer than MAX_CONTROL_PDU."""
        header = self.read(6)
        if header.startswith(b"HTTP/"):  # an address of the PACS's web port, not its DICOM one
            raise ProtocolError("the peer answered in HTTP: is this its web port?")
        pdu_type, _, length = PDU_HEADER.unpack(header)
        if length > MAX_CONTROL_PDU and pdu_type != P_DATA_TF:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes")
        return pdu_type, header + self.read(length)

    def read_message(self) -> tuple[int, dict[int, bytes], bytes | None]:
        """The next DIMSE message: (context id, command elements, dataset bytes or None).

        Raises ReleaseRequested, PeerAborted, PeerGone, ProtocolError or TimeoutError.
        """
        command: list[bytes] = []
        data: list[bytes] = []
        cmd: dict[int, bytes] | None = None
        cx_id = size = 0
        while True:
            if self._pdu_left == 0:
                pdu_type, _, length = PDU_HEADER.unpack(self.read(6))
                if pdu_type == P_DATA_TF:
                    self._pdu_left = length
                    continue
                if length > MAX_CONTROL_PDU:
                    raise ProtocolError(f"PDU type 0x{pdu_type:02X} of {length} bytes")
                body = self.read(length)
                if pdu_type == RELEASE_RQ:
                    raise ReleaseRequested
                if pdu_type == ABORT:
                    raise PeerAborted(describe_abort(PDU_HEADER.pack(ABORT, 0, length) + body))
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X}")
            item_len, item_cx, flags = PDV_HEADER.unpack(self.read(6))
            self._pdu_left -= 4 + item_len
            if item_cx not in self.contexts or item_len < 2 or self._pdu_left < 0:
                raise ProtocolError("bad PDV item")
            chunk = self.read(item_len - 2)
            if flags & 0x01:
                if cmd is not None:
                    raise ProtocolError("command fragment while a dataset was expected")
                if command and item_cx != cx_id:
                    raise ProtocolError("command fragments on two presentation contexts")
                cx_id = item_cx
                command.append(chunk)
                if flags & 0x02:
                    cmd = parse_command(command[0] if len(command) == 1 else b"".join(command))
                    if us(cmd.get(DATASET_TYPE)) == NO_DATASET:
                        return cx_id, cmd, None
            else:
                if cmd is None or item_cx != cx_id:
                    raise ProtocolError("dataset fragment without its command")
                data.append(chunk)
                size += len(chunk)
                if size > self.max_dataset:
                    raise ProtocolError(f"dataset over {self.max_dataset >> 20} MiB")
                if flags & 0x02:
                    return cx_id, cmd, data[0] if len(data) == 1 else b"".join(data)

    def send_message(self, cx_id: int, command: bytes, dataset: bytes | None = None) -> None:
        out = _fragments(cx_id, command, True, self.peer_max_pdu)
        if dataset is not None:
            out += _fragments(cx_id, dataset, False, self.peer_max_pdu)
        self.sock.sendall(out)

    def send(self, pdu: bytes) -> None:
        self.sock.sendall(pdu)

    def abort(self, source: int = 0) -> None:
        """Send A-ABORT if still possible, then close."""
        with contextlib.suppress(OSError):
            self.sock.sendall(abort_pdu(source, 0))
        self.close()

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()
