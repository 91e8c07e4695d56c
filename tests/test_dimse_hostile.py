"""Hostile peers against a live Storage SCP on loopback: silent, stalling, flooding, garbage,
unknown SOP classes and AE titles. Each is answered or dropped within the SCP's (short) timeout,
and an ordinary C-STORE still succeeds during and after the attack.

Every loop here is bounded in count and in time; only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.sop_class import Verification

from dicom.received import ReceivedInstance
from gateway.dimse import ul
from gateway.dimse.scp import StorageSCP
from tests.samples import pydicom_sample

AE_TITLE = "SPHERE"
TIMEOUT = 1.0  # the SCP's: nothing received for this long drops the association
LIMIT = 3  # the SCP's association limit
GRACE = 2.0  # how late past TIMEOUT a drop may come on a loaded 2-core machine
REFUSED_NOT_AUTHORIZED = 0x0124


# --- the SCP under attack -----------------------------------------------------------------------


@dataclass
class Target:
    scp: StorageSCP
    stored: list[tuple[str, str]] = field(default_factory=list)  # (SOP instance, calling AE)
    allow: set[str] | None = None  # calling AE titles the callback stores for (None: all)

    @property
    def port(self) -> int:
        return self.scp.port


def start_target(**kwargs: object) -> Target:
    target = Target(None)  # type: ignore[arg-type]  # its SCP is set just below

    def on_store(event: ReceivedInstance) -> int:
        ds, calling_ae = event.dataset, event.calling_ae
        if target.allow is not None and calling_ae not in target.allow:
            return REFUSED_NOT_AUTHORIZED
        target.stored.append((ds.SOPInstanceUID, calling_ae))
        return 0x0000

    options: dict = {"timeout_s": TIMEOUT, "max_associations": LIMIT, **kwargs}
    target.scp = StorageSCP(AE_TITLE, "127.0.0.1", 0, on_store, **options).start()
    return target


@pytest.fixture
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    target = start_target(**getattr(request, "param", {}))
    try:
        yield target
    finally:
        started = time.monotonic()
        target.scp.stop()
        # stop() aborts whatever hostile connections are left: it must not wait on them.
        assert time.monotonic() - started < TIMEOUT + GRACE


_CT = pydicom_sample("CT_small.dcm")


def store(port: int, calling_ae: str = "MODALITY") -> int | None:
    """One ordinary C-STORE with pynetdicom: its status, or None if no association."""
    ds = deepcopy(_CT)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status) if "Status" in status else None


def assert_serves(target: Target, calling_ae: str = "MODALITY") -> None:
    """The SCP is up and stores: a C-STORE succeeds and reaches the callback."""
    before = len(target.stored)
    assert target.scp.running
    assert store(target.port, calling_ae) == 0x0000
    assert len(target.stored) == before + 1 and target.stored[-1][1] == calling_ae


def wait_idle(target: Target, within: float = TIMEOUT + GRACE, most: int = 0) -> None:
    """Wait until at most `most` connections are served (bounded by `within` seconds)."""
    deadline = time.monotonic() + within
    while target.scp.open_associations > most and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.scp.open_associations <= most, "connections left open past the timeout"


# --- hostile peers ------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def until_closed(sock: socket.socket, within: float = TIMEOUT + GRACE) -> tuple[bytes, float]:
    """What the SCP sends until it closes the connection, and when it closed (seconds from
    now); fails if it is still open after `within` seconds."""
    started = time.monotonic()
    received = b""
    while True:
        left = started + within - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {within:g}s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            continue
        if not chunk:
            return received, time.monotonic() - started
        received += chunk
        if len(received) > 1 << 20:
            raise AssertionError("the SCP keeps talking")


def assert_dropped(received: bytes) -> None:
    """Nothing, or an A-ABORT: a drop, not an answer."""
    assert not received or (len(received) == 10 and received[0] == ul.ABORT), received[:32]


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    sock.settimeout(TIMEOUT + GRACE)
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    pdu_type, _, length = ul.PDU_HEADER.unpack(header)
    assert length < 1 << 20
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return pdu_type, header + body


VERIFY = [(Verification, [ImplicitVRLittleEndian])]
CT = [(CTImageStorage, [ExplicitVRLittleEndian])]


def associate(
    port: int,
    contexts: ul.Contexts = VERIFY,
    calling_ae: str = "HOSTILE",
    called_ae: str = AE_TITLE,
) -> tuple[socket.socket, int, bytes]:
    sock = connect(port)
    sock.sendall(ul.associate_rq_pdu(calling_ae, called_ae, contexts, 16384))
    pdu_type, pdu = read_pdu(sock)
    return sock, pdu_type, pdu


def echo_rq(cx_id: int = 1) -> bytes:
    command = ul.encode_command(
        {
            ul.AFFECTED_SOP_CLASS: Verification,
            ul.COMMAND_FIELD: ul.C_ECHO_RQ,
            ul.MESSAGE_ID: 1,
            ul.DATASET_TYPE: ul.NO_DATASET,
        }
    )
    return ul._fragments(cx_id, command, True, 0)


def release(sock: socket.socket) -> None:
    sock.sendall(ul.RELEASE_RQ_PDU)
    assert read_pdu(sock)[0] == ul.RELEASE_RP
    sock.close()


# --- the checks can fail ------------------------------------------------------------------------


def test_serves_check_fails_once_the_scp_is_stopped() -> None:
    target = start_target()
    assert_serves(target)
    target.scp.stop()
    with pytest.raises(AssertionError):
        assert_serves(target)
    assert store(target.port) is None


def test_drop_check_fails_on_a_peer_left_open() -> None:
    # A listener that accepts and never closes: until_closed must give up, not wait forever.
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = connect(server.getsockname()[1])
        with sock, pytest.raises(AssertionError, match="still open"):
            until_closed(sock, within=0.5)


# --- silent and stalling peers ------------------------------------------------------------------


def test_silent_peers_are_dropped_and_do_not_block_service(target: Target) -> None:
    silent = [connect(target.port) for _ in range(2 * LIMIT)]
    try:
        assert_serves(target)  # silent connections hold no association slot
        for sock in silent:
            received, after = until_closed(sock)
            assert_dropped(received)
    finally:
        for sock in silent:
            sock.close()
    wait_idle(target)
    assert_serves(target)


HALF_PDUS = {
    "3 bytes of a header": b"\x01\x00\x00",
    "half an A-ASSOCIATE-RQ": ul.associate_rq_pdu("STALL", AE_TITLE, VERIFY, 0)[:40],
    "a header claiming 1 MB": ul.PDU_HEADER.pack(ul.ASSOCIATE_RQ, 0, 1 << 20) + b"\x00" * 100,
}


@pytest.mark.parametrize("half", HALF_PDUS.values(), ids=HALF_PDUS.keys())
def test_half_pdu_then_stall_is_dropped_within_timeout(target: Target, half: bytes) -> None:
    with connect(target.port) as sock:
        sock.sendall(half)
        started = time.monotonic()
        assert_serves(target)  # meanwhile
        received, after = until_closed(sock)
        assert_dropped(received)
        assert time.monotonic() - started >= TIMEOUT * 0.5  # it was the timeout, not an error
    wait_idle(target)
    assert_serves(target)


@pytest.mark.parametrize("cut", [3, 6, 9, 14, 30])
def test_half_message_in_an_association_is_dropped(target: Target, cut: int) -> None:
    sock, pdu_type, _ = associate(target.port)
    with sock:
        assert pdu_type == ul.ASSOCIATE_AC
        sock.sendall(echo_rq()[:cut])
        received, _ = until_closed(sock)
        assert_dropped(received)
    wait_idle(target)
    assert_serves(target)


def test_trickling_peer_is_dropped(target: Target) -> None:
    rq = ul.associate_rq_pdu("TRICKLE", AE_TITLE, VERIFY, 0)
    dropped = False
    with connect(target.port) as sock:
        started = time.monotonic()
        for byte in rq[:6]:  # bounded: one byte every 0.6 timeouts, ~3.6 timeouts in all
            time.sleep(0.6 * TIMEOUT)
            if select.select([sock], [], [], 0)[0]:  # the SCP sent A-ABORT or closed
                dropped = True
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                dropped = True
                break
        elapsed = time.monotonic() - started
    assert dropped, f"still served after {elapsed:.1f}s of trickle"


# --- too many at once ---------------------------------------------------------------------------


# Held slots must outlive the test's steps on a slow machine (the idle timeout is tested elsewhere)
@pytest.mark.parametrize("target", [{"timeout_s": 10.0}], indirect=True)
def test_associations_above_the_limit_are_rejected(target: Target) -> None:
    def attempt(_: int) -> tuple[socket.socket, int, bytes]:
        return associate(target.port)

    results: list[tuple[socket.socket, int, bytes]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(attempt(i))) for i in range(3 * LIMIT)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT + GRACE)
    assert len(results) == 3 * LIMIT
    try:
        accepted = [sock for sock, kind, _ in results if kind == ul.ASSOCIATE_AC]
        rejected = [pdu for _, kind, pdu in results if kind == ul.ASSOCIATE_RJ]
        assert len(accepted) == LIMIT and len(rejected) == 2 * LIMIT
        # transient, service provider (presentation), local limit exceeded
        assert all(pdu[7:10] == bytes([2, 3, 2]) for pdu in rejected)
        assert store(target.port) is None  # full: a real peer is refused too, and told so
        release(accepted[0])
        # The slot frees just after the A-RELEASE-RP is sent: wait for it (bounded).
        wait_idle(target, most=LIMIT - 1)
        assert_serves(target)  # a slot freed: served again
    finally:
        for sock, _, _ in results:
            sock.close()
    wait_idle(target)
    assert_serves(target)


def test_silent_connections_are_bounded(target: Target) -> None:
    silent = [connect(target.port) for _ in range(4 * LIMIT)]
    try:
        time.sleep(0.3)
        assert target.scp.open_associations <= LIMIT
    finally:
        for sock in silent:
            sock.close()


# --- garbage ------------------------------------------------------------------------------------

_rng = random.Random(20261128)
GARBAGE = {
    "http request": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "tls client hello": bytes.fromhex("160301020001000200fc03") + bytes(32),
    "zeros": bytes(4096),
    "ones": b"\xff" * 4096,
    "random": bytes(_rng.randrange(256) for _ in range(4096)),
    "release before association": ul.RELEASE_RQ_PDU,
    "p-data before association": echo_rq(),
    "a-associate-ac to the acceptor": ul.PDU_HEADER.pack(ul.ASSOCIATE_AC, 0, 4) + bytes(4),
    "a-associate-rq of 4 GB": ul.PDU_HEADER.pack(ul.ASSOCIATE_RQ, 0, 0xFFFF_FFFF) + bytes(64),
    "unknown pdu type": ul.PDU_HEADER.pack(0x42, 0, 4) + bytes(4),
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_is_dropped_at_once(target: Target, garbage: bytes) -> None:
    with connect(target.port) as sock:
        sock.sendall(garbage)
        received, after = until_closed(sock)
    assert_dropped(received)
    assert after < TIMEOUT * 0.8, "garbage should be refused when read, not at the timeout"
    wait_idle(target)
    assert_serves(target)


def test_garbage_rq_body_is_refused(target: Target) -> None:
    rng = random.Random(7)
    for _ in range(20):  # bounded
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
        with connect(target.port) as sock:
            sock.sendall(ul.PDU_HEADER.pack(ul.ASSOCIATE_RQ, 0, len(body)) + body)
            received, after = until_closed(sock)
        assert_dropped(received)
        assert after < TIMEOUT * 0.8
    wait_idle(target)
    assert_serves(target)


AFTER_ASSOCIATION = {
    "p-data on an unknown context": echo_rq(cx_id=99),
    "dataset fragment without command": ul._fragments(1, b"\x00" * 16, False, 0),
    "pdv longer than its pdu": ul.PDU_HEADER.pack(ul.P_DATA_TF, 0, 10)
    + ul.PDV_HEADER.pack(200, 1, 3)
    + bytes(4),
    "unsupported dimse command": ul._fragments(
        1, ul.encode_command({ul.COMMAND_FIELD: ul.C_FIND_RQ, ul.DATASET_TYPE: 0x0101}), True, 0
    ),
    "second a-associate-rq": ul.associate_rq_pdu("AGAIN", AE_TITLE, VERIFY, 0),
    "release claiming 4 GB": ul.PDU_HEADER.pack(ul.RELEASE_RQ, 0, 0xFFFF_FFFF) + bytes(4),
    "malformed command set": ul._fragments(1, struct.pack("<HHL", 0, 0x0100, 200) + b"\1", True, 0),
}


@pytest.mark.parametrize("garbage", AFTER_ASSOCIATION.values(), ids=AFTER_ASSOCIATION.keys())
def test_garbage_in_an_association_aborts_it(target: Target, garbage: bytes) -> None:
    sock, pdu_type, _ = associate(target.port)
    with sock:
        assert pdu_type == ul.ASSOCIATE_AC
        sock.sendall(echo_rq())  # a good message first: answered
        assert read_pdu(sock)[0] == ul.P_DATA_TF
        sock.sendall(garbage)
        received, after = until_closed(sock)
    assert received[:1] == bytes([ul.ABORT])
    assert after < TIMEOUT * 0.8
    wait_idle(target)
    assert_serves(target)


def test_non_ascii_uid_in_a_request_is_answered(target: Target) -> None:
    """A C-ECHO-RQ whose SOP class UID holds non-ASCII bytes gets an answer, not an abort
    (the answer echoes the UID: it must be encodable)."""
    sock, pdu_type, _ = associate(target.port)
    with sock:
        assert pdu_type == ul.ASSOCIATE_AC
        command = ul.encode_command(
            {ul.COMMAND_FIELD: ul.C_ECHO_RQ, ul.MESSAGE_ID: 5, ul.DATASET_TYPE: ul.NO_DATASET}
        )
        command += struct.pack("<HHL", 0, ul.AFFECTED_SOP_CLASS, 4) + b"1.\xe9\x00"
        sock.sendall(ul._fragments(1, command, True, 0))
        kind, pdu = read_pdu(sock)
        assert kind == ul.P_DATA_TF
        rsp = ul.parse_command(pdu[12:])
        assert ul.us(rsp[ul.MESSAGE_ID_RESPONDED]) == 5 and ul.us(rsp[ul.STATUS]) == 0
        release(sock)
    assert_serves(target)


# --- unknown SOP classes, syntaxes, AE titles ---------------------------------------------------


@pytest.mark.parametrize(
    ("contexts", "result"),
    [
        ([("1.2.3.4.5.6.7.8.9", [ExplicitVRLittleEndian])], 3),  # abstract syntax not supported
        ([(CTImageStorage, ["1.2.3.4.5.6"])], 4),  # transfer syntaxes not supported
    ],
    ids=["unknown sop class", "unknown transfer syntax"],
)
def test_unknown_sop_class_or_syntax_is_refused(
    target: Target, contexts: ul.Contexts, result: int
) -> None:
    sock, pdu_type, pdu = associate(target.port, contexts)
    with sock:
        # The association is accepted with its one context refused (not rejected outright).
        assert pdu_type == ul.ASSOCIATE_AC
        ac = A_ASSOCIATE_AC()
        ac.decode(pdu)
        (cx,) = ac.to_primitive().presentation_context_definition_results_list
        assert cx.result == result
        assert ul.parse_associate_ac(pdu, contexts, "HOSTILE", AE_TITLE).contexts == {}
        # Sending on the refused context anyway: aborted at once.
        sock.sendall(echo_rq(cx_id=1))
        received, after = until_closed(sock)
    assert received[:1] == bytes([ul.ABORT]) and after < TIMEOUT * 0.8
    assert_serves(target)
    assert all(ae == "MODALITY" for _, ae in target.stored)


def test_calling_ae_titles_are_checked_when_an_allow_list_is_given(target: Target) -> None:
    """Without an allow-list any calling AE title associates (the storage callback decides who
    may store, and gets the calling AE); with one, any other title is rejected, permanently."""
    sock, pdu_type, _ = associate(target.port, CT, calling_ae="NOBODY", called_ae="NOT_SPHERE")
    with sock:
        assert pdu_type == ul.ASSOCIATE_AC
        release(sock)
    target.allow = {"MODALITY"}
    assert store(target.port, calling_ae="INTRUDER") == REFUSED_NOT_AUTHORIZED
    assert store(target.port, calling_ae="MODALITY") == 0x0000
    assert [ae for _, ae in target.stored] == ["MODALITY"]

    strict = start_target(allowed_callers={"MODALITY"})
    try:
        sock, pdu_type, pdu = associate(strict.port, CT, calling_ae="INTRUDER")
        sock.close()
        # permanent, service-user, calling AE title not recognised
        assert pdu_type == ul.ASSOCIATE_RJ and pdu[7:10] == bytes([1, 1, 3])
        assert store(strict.port, calling_ae="INTRUDER") is None
        assert store(strict.port, calling_ae="MODALITY") == 0x0000
    finally:
        strict.scp.stop()


def test_a_dataset_over_the_limit_aborts_its_association(monkeypatch) -> None:
    monkeypatch.setattr(ul, "MAX_DATASET", 4096)  # CT_small is ~39 KB
    small = start_target()
    try:
        assert store(small.port) is None or small.stored == []
        assert small.stored == []
    finally:
        small.scp.stop()


def test_a_deflate_bomb_is_refused_not_inflated(monkeypatch) -> None:
    import tracemalloc
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from dicom import received
    from dicom.received import decode_dataset

    monkeypatch.setattr(received, "MAX_DATASET", 8 << 20)
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 64 << 20)  # 64 MiB of zeros
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(element) + packer.compress(bytes(64 << 20)) + packer.flush()
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="inflates past 8 MiB"):
            decode_dataset(bomb, DeflatedExplicitVRLittleEndian, CTImageStorage, "1.2.3")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"{peak >> 20} MiB for a {len(bomb) >> 10} KB bomb"


def test_our_scu_meets_a_peer_that_answers_garbage() -> None:
    """Association answers that do not decode are a DimseError, whatever pynetdicom raises."""
    from gateway.dimse.scu import DimseError, Peer, Scu

    answers = [
        ul.PDU_HEADER.pack(ul.ASSOCIATE_AC, 0, 20) + bytes(range(20)),
        ul.PDU_HEADER.pack(ul.ASSOCIATE_RJ, 0, 4) + b"\xff\xff\xff\xff",
        ul.PDU_HEADER.pack(ul.ASSOCIATE_AC, 0, 0xFFFF_FFFF) + bytes(16),
    ]
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        for answer in answers:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)
                time.sleep(0.2)

    threading.Thread(target=serve, daemon=True).start()
    try:
        for _ in answers:
            with pytest.raises(DimseError):  # not pynetdicom's ValueError, KeyError...
                Scu("SPHERE", timeout_s=3).echo(Peer("PEER", "127.0.0.1", port))
    finally:
        server.close()


# --- a real sender during an attack -------------------------------------------------------------


@contextlib.contextmanager
def attack(port: int, seconds: float) -> Iterator[threading.Event]:
    """For at most `seconds`: silent connections, stalled half PDUs and garbage connections,
    over and over (at most 25 held at once). Yields an event set when the attack is over."""
    done = threading.Event()
    held: list[socket.socket] = []

    def run() -> None:
        deadline = time.monotonic() + seconds
        rng = random.Random(3)
        i = 0
        while not done.is_set() and time.monotonic() < deadline:  # held sockets stay bounded
            i += 1
            try:
                sock = connect(port)
                kind = i % 3
                if kind == 1:
                    sock.sendall(HALF_PDUS["half an A-ASSOCIATE-RQ"])
                elif kind == 2:
                    sock.sendall(bytes(rng.randrange(256) for _ in range(512)))
                held.append(sock)
                if len(held) > 24:  # bounded: the oldest goes
                    held.pop(0).close()
            except OSError:
                pass
            time.sleep(0.02)
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        done.set()
        thread.join(seconds + 5)
        for sock in held:
            sock.close()


def test_pynetdicom_store_during_an_attack(target: Target) -> None:
    with attack(target.port, seconds=4 * TIMEOUT) as over:
        for _ in range(40):  # bounded; as long as the attack lasts
            assert_serves(target)
            if over.wait(0.1):
                break
    wait_idle(target, within=TIMEOUT + 2 * GRACE)
    assert_serves(target)


def dcmtk(tool: str) -> str:
    if shutil.which(tool) is None:
        pytest.skip(f"dcmtk {tool} not installed")
    return tool


@pytest.mark.peers
def test_storescu_during_an_attack(target: Target, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    ds = deepcopy(_CT)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(path, enforce_file_format=True)
    args = [dcmtk("storescu"), "-aet", "MODALITY", "-aec", AE_TITLE, "-to", "10", "-ta", "10"]
    args += ["-td", "10", "127.0.0.1", str(target.port), str(path)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    echo = [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", AE_TITLE, "-to", "10"]
    echo += ["127.0.0.1", str(target.port)]
    with attack(target.port, seconds=4 * TIMEOUT) as over:
        for _ in range(20):  # bounded; as long as the attack lasts
            run = subprocess.run(args, env=env, capture_output=True, timeout=30)
            assert run.returncode == 0, run.stderr
            assert subprocess.run(echo, env=env, capture_output=True, timeout=30).returncode == 0
            if over.wait(0.1):
                break
    assert target.stored[-1] == (ds.SOPInstanceUID, "MODALITY")
    wait_idle(target, within=TIMEOUT + 2 * GRACE)
    run = subprocess.run(args, env=env, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
