"""Property / fuzz tests of the network edge: the DICOM upper layer (`gateway.dimse.ul`) and the
receiver's element scanner (`dicom.raw`), on hostile bytes.

Whatever arrives, the outcome is a valid result or one of the documented refusals, never another
exception, never a hang (each example runs under a SIGALRM limit), and never memory out of
proportion to the bytes that actually arrived (a header may claim 4 GB; tracemalloc checks it).

`SPHERE_FUZZ_EXAMPLES` scales the example counts (see scripts/fuzz_ul.py for a long run).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import threading
import tracemalloc
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import Verification

from dicom.raw import element_spans, value_span
from gateway.dimse import ul
from gateway.dimse.common import STORAGE_TRANSFER_SYNTAXES, UNCOMPRESSED

SCALE = float(os.environ.get("SPHERE_FUZZ_EXAMPLES", "1"))


def fuzz(n: int) -> settings:
    """Bounded hypothesis settings; no example database (nothing written into the tree)."""
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- guards -------------------------------------------------------------------------------------


class Hang(BaseException):  # noqa: N818 - BaseException: no `except Exception` may swallow it
    """The code under test ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread if the block runs longer than `seconds`."""

    def on_alarm(_signum: int, _frame: object) -> None:
        raise Hang(f"no answer within {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class BytesSocket:
    """A socket whose peer sent `data` and closed: what `ul.Channel` reads through the same
    buffered reader as a real socket's makefile()."""

    def __init__(self, data: bytes) -> None:
        self.raw = io.BytesIO(data)
        self.sent = bytearray()

    def makefile(self, _mode: str, buffering: int) -> io.BufferedReader:
        return io.BufferedReader(self.raw, buffering)

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        pass


CONTEXTS = {1: ExplicitVRLittleEndian, 3: ImplicitVRLittleEndian}
# What Channel.read_message documents it raises.
READ_ERRORS = (ul.ReleaseRequested, ul.PeerAborted, ul.PeerGone, ul.ProtocolError, TimeoutError)


def channel(data: bytes) -> ul.Channel:
    ch = ul.Channel(BytesSocket(data))  # type: ignore[arg-type]  # bytes as a socket's reads
    ch.contexts = dict(CONTEXTS)
    return ch


def read_all(data: bytes) -> tuple[list[tuple[int, dict[int, bytes], bytes | None]], Exception]:
    """Every message `data` holds, and the exception that ended the stream."""
    ch = channel(data)
    messages = []
    with time_limit(5):
        for _ in range(len(data) // 12 + 2):  # each message takes at least 12 bytes
            try:
                messages.append(ch.read_message())
            except READ_ERRORS as exc:
                return messages, exc
    raise AssertionError("more messages than the bytes can hold")


def check_message(msg: tuple[int, dict[int, bytes], bytes | None]) -> None:
    cx_id, cmd, data = msg
    assert cx_id in CONTEXTS
    assert isinstance(cmd, dict)
    assert all(isinstance(k, int) and isinstance(v, bytes) for k, v in cmd.items())
    assert data is None or isinstance(data, bytes)


# --- strategies ---------------------------------------------------------------------------------

LENGTHS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFE, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)


@st.composite
def mutated(draw: st.DrawFn, base: bytes, max_ops: int = 4) -> bytes:
    """`base` after a few hostile edits: truncation, byte flips, a 2- or 4-byte length field
    overwritten (either endianness), garbage spliced in, a range cut out or repeated."""
    out = bytearray(base)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["cut", "flip", "len4", "len2", "insert", "delete", "repeat"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "cut":
            del out[at:]
        elif op == "flip" and out:
            out[at] ^= draw(st.integers(1, 255))
        elif op == "len4":
            order = draw(st.sampled_from([">L", "<L"]))
            out[at : at + 4] = struct.pack(order, draw(LENGTHS))
        elif op == "len2":
            order = draw(st.sampled_from([">H", "<H"]))
            out[at : at + 2] = struct.pack(order, draw(st.integers(0, 0xFFFF)))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif op == "repeat":
            out[at:at] = out[at : at + draw(st.integers(1, 64))]
    return bytes(out)


UID_TEXT = st.from_regex(r"[12]\.[0-9]{1,8}(\.[0-9]{1,6}){0,6}", fullmatch=True)
AE_TEXT = st.from_regex(r"[A-Z][A-Z0-9_]{0,15}", fullmatch=True)
COMMAND_FIELDS = st.dictionaries(
    st.sampled_from(
        [
            ul.AFFECTED_SOP_CLASS,
            ul.COMMAND_FIELD,
            ul.MESSAGE_ID,
            ul.PRIORITY,
            ul.DATASET_TYPE,
            ul.AFFECTED_SOP_INSTANCE,
            ul.MOVE_DESTINATION,
        ]
    ),
    st.one_of(st.integers(0, 0xFFFF), UID_TEXT),
    max_size=7,
)


@st.composite
def dimse_stream(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, bytes, bytes | None]]]:
    """A valid stream of DIMSE messages as a peer fragments them, and what it holds."""
    messages = []
    stream = b""
    for _ in range(draw(st.integers(1, 3))):
        cx_id = draw(st.sampled_from(sorted(CONTEXTS)))
        fields = draw(COMMAND_FIELDS)
        dataset = draw(st.one_of(st.none(), st.binary(max_size=600)))
        fields[ul.DATASET_TYPE] = ul.NO_DATASET if dataset is None else ul.HAS_DATASET
        command = ul.encode_command(fields)
        max_pdu = draw(st.sampled_from([0, 1, 6, 70, 128, 257, 4096]))
        stream += ul._fragments(cx_id, command, True, max_pdu)
        if dataset is not None:
            stream += ul._fragments(cx_id, dataset, False, max_pdu)
        messages.append((cx_id, command, dataset))
    return stream, messages


def split_pdus(stream: bytes) -> list[bytes]:
    pdus, pos = [], 0
    while pos < len(stream):
        length = ul.PDU_HEADER.unpack_from(stream, pos)[2]
        pdus.append(stream[pos : pos + 6 + length])
        pos += 6 + length
    return pdus


# --- PDU / PDV framing --------------------------------------------------------------------------


@fuzz(150)
@given(dimse_stream())
def test_valid_fragmented_messages_round_trip(case) -> None:
    stream, expected = case
    messages, end = read_all(stream + ul.RELEASE_RQ_PDU)
    assert isinstance(end, ul.ReleaseRequested)
    assert len(messages) == len(expected)
    for (cx_id, cmd, data), (want_cx, command, dataset) in zip(messages, expected, strict=True):
        assert cx_id == want_cx
        assert cmd == ul.parse_command(command)
        assert data == dataset


@fuzz(300)
@given(st.binary(max_size=512))
def test_garbage_stream_is_refused(data: bytes) -> None:
    messages, _ = read_all(data)
    for msg in messages:
        check_message(msg)


@fuzz(250)
@given(st.data())
def test_mutated_stream_is_refused_or_valid(data: st.DataObject) -> None:
    stream, _ = data.draw(dimse_stream())
    hostile = data.draw(mutated(stream + ul.RELEASE_RQ_PDU))
    messages, _ = read_all(hostile)
    for msg in messages:
        check_message(msg)


@fuzz(100)
@given(st.data())
def test_interleaved_fragments_are_refused_or_valid(data: st.DataObject) -> None:
    """PDUs of several messages (two contexts) shuffled: commands and datasets interleaved."""
    stream_a, _ = data.draw(dimse_stream())
    stream_b, _ = data.draw(dimse_stream())
    pdus = data.draw(st.permutations(split_pdus(stream_a) + split_pdus(stream_b)))
    messages, end = read_all(b"".join(pdus))
    for msg in messages:
        check_message(msg)
    assert isinstance(end, READ_ERRORS)


def test_command_fragments_on_two_contexts_are_refused() -> None:
    """A message's fragments all travel on one presentation context (PS3.8 9.3.5.1): a command
    begun on one context and finished on another is not spliced into one command."""
    command = ul.encode_command({ul.COMMAND_FIELD: ul.C_ECHO_RQ, ul.DATASET_TYPE: ul.NO_DATASET})

    def pdv(cx_id: int, piece: bytes, flags: int) -> bytes:
        head = ul.PDU_HEADER.pack(ul.P_DATA_TF, 0, len(piece) + 6)
        return head + ul.PDV_HEADER.pack(len(piece) + 2, cx_id, flags) + piece

    first, rest = command[:20], command[20:]
    messages, end = read_all(pdv(1, first, 0x01) + pdv(1, rest, 0x03))
    assert [m[0] for m in messages] == [1]  # the same split on one context: fine
    messages, end = read_all(pdv(1, first, 0x01) + pdv(3, rest, 0x03))
    assert messages == [] and isinstance(end, ul.ProtocolError)


@pytest.mark.parametrize("pdu_type", [ul.RELEASE_RQ, ul.ABORT, 0x00, 0x09, 0xFF])
def test_non_data_pdus_in_a_message_stream(pdu_type: int) -> None:
    pdu = ul.PDU_HEADER.pack(pdu_type, 0, 4) + b"\x00\x00\x02\x01"
    _, end = read_all(pdu)
    expected = {ul.RELEASE_RQ: ul.ReleaseRequested, ul.ABORT: ul.PeerAborted}
    assert isinstance(end, expected.get(pdu_type, ul.ProtocolError))


# --- what a claimed length costs ----------------------------------------------------------------

SMALL = 4 << 20  # the most a few bytes with a lying header may make us allocate


def peak_reading(data: bytes, read) -> tuple[int, BaseException | None]:
    """Peak traced allocation while `read(channel)` consumes `data` from a real socket whose
    peer then closes; and the exception it ended with."""
    a, b = socket.socketpair()
    try:
        b.settimeout(5)
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        ch = ul.Channel(b)
        ch.contexts = dict(CONTEXTS)
        tracemalloc.start()
        try:
            with time_limit(10):
                read(ch)
            error = None
        except Exception as exc:
            error = exc
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        ch.close()
        return peak, error
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("length", [1 << 20, 0x7FFF_FFFF, 0xFFFF_FFFF])
@pytest.mark.parametrize("pdu_type", [ul.ASSOCIATE_RQ, ul.ASSOCIATE_AC, ul.RELEASE_RQ, 0x42])
def test_huge_claimed_control_pdu_is_not_allocated(pdu_type: int, length: int) -> None:
    data = ul.PDU_HEADER.pack(pdu_type, 0, length) + b"\x00" * 64
    peak, error = peak_reading(data, lambda ch: ch.read_pdu())
    assert isinstance(error, (ul.PeerGone, ul.ProtocolError)), error
    assert peak < SMALL, f"{peak / 1e6:.0f} MB allocated for a {len(data)}-byte PDU"


@pytest.mark.parametrize("length", [0x7FFF_FFFF, 0xFFFF_FFFF])
def test_huge_claimed_data_pdu_is_not_allocated(length: int) -> None:
    # A P-DATA-TF whose one PDV claims (nearly) all of it: the bytes never come.
    data = ul.PDU_HEADER.pack(ul.P_DATA_TF, 0, length) + ul.PDV_HEADER.pack(length - 4, 1, 3)
    data += b"\x00" * 64
    peak, error = peak_reading(data, lambda ch: ch.read_message())
    assert isinstance(error, ul.PeerGone), error
    assert peak < SMALL, f"{peak / 1e6:.0f} MB allocated for a {len(data)}-byte PDU"
    # Same in a message stream: a release PDU claiming 4 GB.
    data = ul.PDU_HEADER.pack(ul.RELEASE_RQ, 0, length) + b"\x00" * 64
    peak, error = peak_reading(data, lambda ch: ch.read_message())
    assert isinstance(error, (ul.PeerGone, ul.ProtocolError)), error
    assert peak < SMALL


@fuzz(40)
@given(st.data())
def test_lying_lengths_cost_what_arrived(data: st.DataObject) -> None:
    stream, _ = data.draw(dimse_stream())
    hostile = data.draw(mutated(stream, max_ops=2))
    peak, error = peak_reading(hostile, lambda ch: [ch.read_message() for _ in range(8)])
    assert error is None or isinstance(error, READ_ERRORS), repr(error)
    assert peak < SMALL + 8 * len(hostile)


def test_large_pdus_still_arrive_whole() -> None:
    """The other side of streaming reads: a 5 MB dataset in one PDV, 3 MB PDUs split."""
    dataset = bytes(range(256)) * (5 * 4096)
    command = ul.encode_command({ul.COMMAND_FIELD: ul.C_STORE_RQ, ul.DATASET_TYPE: 1})
    for max_pdu in (0, 3 << 20):
        stream = ul._fragments(1, command, True, 0) + ul._fragments(1, dataset, False, max_pdu)
        a, b = socket.socketpair()
        with a, b:
            sender = threading.Thread(target=a.sendall, args=(stream,))
            sender.start()
            b.settimeout(10)
            ch = ul.Channel(b)
            ch.contexts = dict(CONTEXTS)
            cx_id, cmd, data = ch.read_message()
            sender.join(10)
            assert (cx_id, ul.us(cmd[ul.COMMAND_FIELD]), data) == (1, ul.C_STORE_RQ, dataset)


# --- DIMSE command sets -------------------------------------------------------------------------


def respond_like_scp(cmd: dict[int, bytes], status: int) -> bytes:
    """What the Storage SCP answers to a command it parsed (as in gateway/dimse/service.py,
    _Association._respond)."""
    return ul.response_command(
        ul.C_STORE_RSP,
        ul.us(cmd.get(ul.MESSAGE_ID)) or 0,
        status,
        ul.ui(cmd.get(ul.AFFECTED_SOP_CLASS)),
        ul.ui(cmd.get(ul.AFFECTED_SOP_INSTANCE)),
    )


@fuzz(200)
@given(st.one_of(st.binary(max_size=300), COMMAND_FIELDS.map(ul.encode_command).flatmap(mutated)))
def test_hostile_command_set_parses_or_is_refused(data: bytes) -> None:
    with time_limit(2):
        try:
            cmd = ul.parse_command(data)
        except ul.ProtocolError:
            return
        assert sum(8 + len(v) for v in cmd.values()) <= len(data)
        # Whatever was parsed, the SCP can answer it: values it echoes back are encodable.
        answer = ul.parse_command(respond_like_scp(cmd, 0xC000))
        assert ul.us(answer[ul.STATUS]) == 0xC000
        assert ul.us(answer[ul.MESSAGE_ID_RESPONDED]) == (ul.us(cmd.get(ul.MESSAGE_ID)) or 0)


@fuzz(150)
@given(COMMAND_FIELDS)
def test_command_set_round_trips(fields: dict[int, int | str]) -> None:
    cmd = ul.parse_command(ul.encode_command(fields))
    assert ul.us(cmd[0x0000]) == sum(8 + len(v) for k, v in cmd.items() if k)  # group length
    for elem, value in fields.items():
        if isinstance(value, int):
            assert ul.us(cmd[elem]) == value
        else:
            assert ul.ui(cmd[elem]) == value[:16] if elem == ul.MOVE_DESTINATION else value


def test_command_echoed_values_are_ascii() -> None:
    """A UID with non-ASCII bytes in a request must not make the answer unencodable (the
    SCP would abort the association after the callback already stored the instance)."""
    cmd = ul.parse_command(
        ul.encode_command({ul.COMMAND_FIELD: ul.C_STORE_RQ, ul.MESSAGE_ID: 7})
        + struct.pack("<HHL", 0, ul.AFFECTED_SOP_INSTANCE, 6)
        + b"1.2\xff\xfe\x00"
    )
    assert ul.ui(cmd[ul.AFFECTED_SOP_INSTANCE]).isascii()
    answer = ul.parse_command(respond_like_scp(cmd, 0))
    assert ul.us(answer[ul.MESSAGE_ID_RESPONDED]) == 7


# --- association negotiation --------------------------------------------------------------------

SOP_CLASSES = [Verification, CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage]
SUPPORTED = ul.supported_contexts([Verification], UNCOMPRESSED) + ul.supported_contexts(
    SOP_CLASSES[1:], STORAGE_TRANSFER_SYNTAXES
)
SYNTAXES = [*STORAGE_TRANSFER_SYNTAXES, "1.2.3.4.5"]


@st.composite
def associate_rq(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, list[str]]]]:
    contexts = draw(
        st.lists(
            st.tuples(
                st.one_of(st.sampled_from(SOP_CLASSES), UID_TEXT),
                st.lists(st.one_of(st.sampled_from(SYNTAXES), UID_TEXT), min_size=1, max_size=4),
            ),
            min_size=1,
            max_size=6,
        )
    )
    roles = draw(st.lists(st.sampled_from(SOP_CLASSES), max_size=2, unique=True))
    max_pdu = draw(st.sampled_from([0, 4096, 16384, 0xFFFF_FFFF]))
    rq = ul.associate_rq_pdu(draw(AE_TEXT), draw(AE_TEXT), contexts, max_pdu, roles)
    return rq, contexts


def negotiate_hostile(rq: bytes) -> ul.Negotiated | None:
    with time_limit(5), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UIDs it decodes
        try:
            return ul.negotiate(rq, SUPPORTED, 16384)
        except ul.ProtocolError:
            return None


@fuzz(80)
@given(associate_rq())
def test_valid_association_request_is_answered(case) -> None:
    rq, contexts = case
    neg = negotiate_hostile(rq)
    assert neg is not None
    supported = {str(cx.abstract_syntax): cx.transfer_syntax for cx in SUPPORTED}
    for cx_id, syntax in neg.contexts.items():
        abstract, proposed = contexts[(cx_id - 1) // 2]
        assert neg.abstract[cx_id] == abstract
        assert syntax in proposed and syntax in supported[abstract]
    # The answer is a well-formed A-ASSOCIATE-AC the requestor reads back the same.
    back = ul.parse_associate_ac(neg.ac_pdu, contexts, neg.calling_ae, neg.called_ae)
    assert back.contexts == neg.contexts
    assert back.peer_max_pdu == 16384


@fuzz(150)
@given(associate_rq().flatmap(lambda case: mutated(case[0])))
def test_mutated_association_request_is_answered_or_refused(rq: bytes) -> None:
    neg = negotiate_hostile(rq)
    if neg is not None:
        assert isinstance(neg.ac_pdu, bytes) and neg.ac_pdu[0] == ul.ASSOCIATE_AC
        A_ASSOCIATE_AC().decode(neg.ac_pdu)


@fuzz(150)
@given(st.binary(max_size=400))
def test_garbage_association_request_is_refused(body: bytes) -> None:
    rq = ul.PDU_HEADER.pack(ul.ASSOCIATE_RQ, 0, len(body)) + body
    negotiate_hostile(rq)


def test_context_without_transfer_syntax_is_refused() -> None:
    """A presentation context item with an abstract syntax and no transfer syntax: pynetdicom's
    acceptor code indexes its first transfer syntax (IndexError before the fix)."""
    rq = ul.associate_rq_pdu("PEER", "SPHERE", [(CTImageStorage, [ExplicitVRLittleEndian])], 0)
    body = bytearray(rq[6:])
    pos = 68  # protocol version, reserved, called AE, calling AE, reserved
    while body[pos] != 0x20:  # skip to the presentation context item
        pos += 4 + struct.unpack_from(">H", body, pos + 2)[0]
    item_len = struct.unpack_from(">H", body, pos + 2)[0]
    sub = pos + 8  # context id, reserved x3, then sub-items: abstract syntax first
    sub += 4 + struct.unpack_from(">H", body, sub + 2)[0]
    assert body[sub] == 0x40  # the one transfer syntax sub-item
    ts_len = 4 + struct.unpack_from(">H", body, sub + 2)[0]
    del body[sub : sub + ts_len]
    struct.pack_into(">H", body, pos + 2, item_len - ts_len)
    hostile = ul.PDU_HEADER.pack(ul.ASSOCIATE_RQ, 0, len(body)) + bytes(body)
    neg = negotiate_hostile(hostile)  # refused, or answered with the context rejected
    assert neg is None or not neg.contexts


# (result, source, diagnostic) a provider really sends
REJECTS = [(1, 1, 1), (1, 1, 2), (1, 1, 3), (1, 1, 7), (1, 2, 2), (2, 3, 1), (2, 3, 2)]


@fuzz(100)
@given(st.data())
def test_mutated_association_answer_is_read_or_refused(data: st.DataObject) -> None:
    """The SCU side: a hostile peer's A-ASSOCIATE-AC / -RJ."""
    rq, contexts = data.draw(associate_rq())
    neg = negotiate_hostile(rq)
    assume(neg is not None)
    assert neg is not None  # assume() stopped the example otherwise
    ac = data.draw(mutated(neg.ac_pdu))
    rj = data.draw(mutated(ul.reject_pdu(*data.draw(st.sampled_from(REJECTS)))))
    with time_limit(5), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            back = ul.parse_associate_ac(ac, contexts, "ME", "PEER")
            assert set(back.contexts) <= {2 * i + 1 for i in range(len(contexts))}
        except ul.ProtocolError:
            pass
        with contextlib.suppress(ul.ProtocolError):
            assert isinstance(ul.describe_reject(rj), str)


# --- dicom.raw element scanner ------------------------------------------------------------------


def _dataset_bytes(name: str) -> tuple[bytes, bool] | None:
    """The dataset bytes of a pydicom sample file as stored (after its file meta)."""
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        return None
    with open(path, "rb") as fp:
        raw = fp.read()
    ds = dcmread(io.BytesIO(raw), stop_before_pixels=True)
    syntax = ds.file_meta.TransferSyntaxUID
    if not syntax.is_little_endian or syntax.is_deflated:
        return None
    pos = 132
    while raw[pos : pos + 2] == b"\x02\x00":  # file meta: explicit VR little endian
        vr = raw[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
            pos += 12 + struct.unpack_from("<L", raw, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    return raw[pos:], syntax.is_implicit_VR


def _reencoded(name: str, implicit: bool) -> tuple[bytes, bool] | None:
    stored = _dataset_bytes(name)
    if stored is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(io.BytesIO(stored[0]), stored[1], True)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, implicit
        write_dataset(buf, ds)
    return buf.getvalue(), implicit


SAMPLE_NAMES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "rtplan.dcm",
    "nested_priv_SQ.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_small_odd.dcm",
]
SAMPLES = [s for n in SAMPLE_NAMES if (s := _dataset_bytes(n)) is not None]
SAMPLES += [s for n in ("CT_small.dcm", "rtplan.dcm") if (s := _reencoded(n, True)) is not None]
SAMPLES += [s for n in ("MR_small.dcm",) if (s := _reencoded(n, False)) is not None]


def check_spans(data: bytes | memoryview, implicit: bool) -> dict[int, tuple[int, int]] | None:
    with time_limit(2):
        spans = element_spans(data, implicit)
        if spans is None:
            return None
        pos = 0
        for tag, (start, end) in spans.items():  # in order, contiguous, covering every byte
            assert start == pos and end > start and tag >> 16 != 0xFFFE
            value = value_span(data, (start, end), implicit)
            if value is not None:
                assert start + 8 <= value[0] <= value[1] == end
            pos = end
        assert pos == len(data)
        return spans


def test_samples_are_real_and_scan_cleanly() -> None:
    assert len(SAMPLES) >= 6
    assert any(implicit for _, implicit in SAMPLES) and not all(i for _, i in SAMPLES)
    for data, implicit in SAMPLES:
        spans = check_spans(data, implicit)
        assert spans is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert sorted(spans) == sorted(read_dataset(io.BytesIO(data), implicit, True).keys())


@fuzz(500)
@given(st.sampled_from(range(len(SAMPLES))).flatmap(lambda i: st.tuples(st.just(i), st.data())))
def test_mutated_datasets_scan_or_answer_none(case) -> None:
    index, data = case
    encoded, implicit = SAMPLES[index]
    # Mutations near the start hit the header-dense part; a length anywhere shifts the rest.
    hostile = data.draw(mutated(encoded))
    check_spans(hostile, implicit)
    check_spans(memoryview(hostile), implicit)
    check_spans(hostile, not implicit)


@fuzz(300)
@given(st.binary(max_size=400), st.booleans())
def test_garbage_scans_or_answers_none(data: bytes, implicit: bool) -> None:
    check_spans(data, implicit)


@pytest.mark.parametrize("implicit", [False, True])
def test_deep_nesting_answers_none_without_recursing(implicit: bool) -> None:
    if implicit:
        sq = struct.pack("<HHL", 0x0008, 0x1115, 0xFFFF_FFFF)
    else:
        sq = struct.pack("<HH2sHL", 0x0008, 0x1115, b"SQ", 0, 0xFFFF_FFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFF_FFFF)
    depth = 20_000
    data = (sq + item) * depth + (
        struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + b"\xfe\xff\xdd\xe0\0\0\0\0"
    ) * depth
    with time_limit(30):  # a hang guard: a quadratic walk of 40,000 nestings takes minutes
        assert element_spans(data, implicit) is None
