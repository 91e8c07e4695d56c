"""DIMSE SCU towards the hospital PACS: C-ECHO, C-FIND (Study Root, study and series level),
C-MOVE and C-GET of one series, over the upper layer in `ul.py`.

Each `Scu` method opens its own association and releases it, so one `Scu` serves several threads
(the pull runs a few C-MOVEs at once); `Scu.connect` keeps one association for several requests.
Failures raise `DimseError` subclasses whose messages carry AE titles, statuses and counts only,
never identifiers of the data.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dicom.received import ReceivedInstance
from dicom.status import is_pending, is_success
from gateway.dimse import ul
from gateway.dimse.common import (
    GET_STORAGE_CLASSES,
    NO_PIXELS,
    OFTEN_COMPRESSED,
    STORAGE_TRANSFER_SYNTAXES,
    UNCOMPRESSED,
    AssociationAborted,
    AssociationRejected,
    DimseError,
    DimseTimeout,
    PeerUnreachable,
)
from gateway.dimse.service import OnStore, call_on_store

__all__ = [
    "Association",
    "AssociationAborted",
    "AssociationRejected",
    "DimseError",
    "DimseTimeout",
    "Peer",
    "PeerUnreachable",
    "Scu",
    "SubOperations",
]

_WILDCARDS = ("*", "?", "\\")
_MAX_CONTEXTS = 128  # a requestor may propose at most 128 presentation contexts
# A C-GET's syntaxes besides the first one of UNCOMPRESSED, which every class has anyway.
_AS_HELD = [uid for uid in STORAGE_TRANSFER_SYNTAXES if uid != UNCOMPRESSED[0]]


@dataclass(frozen=True)
class Peer:
    """A remote DICOM node: called AE title, host, port."""

    ae_title: str
    host: str
    port: int


@dataclass
class SubOperations:
    """Final (or last known) status and sub-operation counts of a C-MOVE / C-GET."""

    status: int | None = None  # None: no final response arrived
    completed: int = 0
    failed: int = 0
    warning: int = 0
    remaining: int = 0
    received: int = 0  # C-GET only: datasets handed to on_store

    @property
    def ok(self) -> bool:
        """Success status and no failed sub-operation."""
        return self.status is not None and is_success(self.status) and self.failed == 0

    def __str__(self) -> str:
        status = "none" if self.status is None else f"0x{self.status:04X}"
        return (
            f"status {status}, completed {self.completed}, failed {self.failed}, "
            f"warning {self.warning}, remaining {self.remaining}"
        )


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _exact(name: str, value: str) -> str:
    # A cohort item must match one study exactly; DICOM has no escape for wildcards.
    if any(w in value for w in _WILDCARDS):
        raise ValueError(f"{name} must not contain wildcards (* ? \\)")
    return value


class Association:
    """An open association from the SCU (use via `Scu.connect`); not thread-safe."""

    def __init__(self, scu: Scu, peer: Peer, ch: ul.Channel, neg: ul.Negotiated) -> None:
        self.scu = scu
        self.peer = peer
        self.ch = ch
        self.neg = neg
        self._message_id = 0
        self.released = False

    def _where(self) -> str:
        return f"{self.scu.calling_ae} -> {self.peer.ae_title}"

    def _context(self, sop_class: str, what: str) -> int:
        cx_id = self.neg.context_for(sop_class)
        if cx_id is None:
            raise AssociationRejected(f"{what}: peer accepted no context for it ({self._where()})")
        return cx_id

    def _next_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _encode(self, ds: Dataset, cx_id: int) -> bytes:
        syntax = self.ch.contexts[cx_id]
        fp = DicomBytesIO()
        fp.is_little_endian = syntax.is_little_endian
        fp.is_implicit_VR = syntax.is_implicit_VR
        write_dataset(fp, ds)
        return fp.getvalue()

    def _decode(self, data: bytes, cx_id: int) -> Dataset:
        syntax = self.ch.contexts[cx_id]
        return read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)

    def _send(
        self,
        what: str,
        cx_id: int,
        command: bytes,
        dataset: bytes | None = None,
        result: SubOperations | None = None,
    ) -> None:
        """Send one message, or raise the DimseError a broken connection amounts to."""
        try:
            self.ch.send_message(cx_id, command, dataset)
        except OSError as exc:
            tail = f"; {result}" if result is not None else ""
            raise AssociationAborted(
                f"{what}: association dropped by the peer, {type(exc).__name__} "
                f"({self._where()}){tail}",
                result=result,
            ) from exc

    def _read(
        self, what: str, timeout: float, answered: bool, result: SubOperations | None = None
    ) -> tuple[int, dict[int, bytes], bytes | None]:
        """The next message, or the DimseError the failure to get one amounts to."""
        self.ch.sock.settimeout(timeout)
        tail = f"; {result}" if result is not None else ""
        try:
            return self.ch.read_message()
        except TimeoutError:
            err: DimseError = DimseTimeout(
                f"{what}: no response within {timeout:g}s ({self._where()}){tail}", result=result
            )
        except (ul.PeerGone, ConnectionError, ul.PeerAborted) as exc:
            how = f"aborted {exc}" if isinstance(exc, ul.PeerAborted) else "dropped by the peer"
            # A PACS that refuses a calling AE for a service often just ends the association.
            hint = (
                ""
                if answered
                else f" before any answer (is {self.scu.calling_ae} allowed to {what} there?)"
            )
            err = AssociationAborted(
                f"{what}: association {how}{hint} ({self._where()}){tail}", result=result
            )
        except (ul.ReleaseRequested, ul.ProtocolError, OSError) as exc:
            err = AssociationAborted(
                f"{what}: protocol error, {type(exc).__name__} ({self._where()}){tail}",
                result=result,
            )
        self.ch.abort()
        raise err

    def echo(self) -> None:
        """C-ECHO; raises DimseError unless the peer answers success."""
        cx_id = self._context(Verification, "C-ECHO")
        cmd = {
            ul.AFFECTED_SOP_CLASS: Verification,
            ul.COMMAND_FIELD: ul.C_ECHO_RQ,
            ul.MESSAGE_ID: self._next_id(),
            ul.DATASET_TYPE: ul.NO_DATASET,
        }
        self._send("C-ECHO", cx_id, ul.encode_command(cmd))
        _, rsp, _ = self._read("C-ECHO", self.scu.timeout_s, answered=False)
        status = ul.us(rsp.get(ul.STATUS))
        if status is None or not is_success(status):
            raise DimseError(f"C-ECHO: status {_hex(status)} ({self._where()})", status=status)

    def find(self, query: Dataset) -> list[Dataset]:
        """Study Root C-FIND; the identifiers of all pending responses."""
        sop = StudyRootQueryRetrieveInformationModelFind
        cx_id = self._context(sop, "C-FIND")
        cmd = {
            ul.AFFECTED_SOP_CLASS: sop,
            ul.COMMAND_FIELD: ul.C_FIND_RQ,
            ul.MESSAGE_ID: self._next_id(),
            ul.PRIORITY: 0,
            ul.DATASET_TYPE: ul.HAS_DATASET,
        }
        self._send("C-FIND", cx_id, ul.encode_command(cmd), self._encode(query, cx_id))
        answers: list[Dataset] = []
        while True:
            rx_cx, rsp, data = self._read("C-FIND", self.scu.timeout_s, answered=bool(answers))
            status = ul.us(rsp.get(ul.STATUS))
            if status is not None and is_pending(status):
                if data is not None:
                    answers.append(self._decode(data, rx_cx))
                continue
            if status is not None and is_success(status):
                return answers
            raise DimseError(
                f"C-FIND refused: status {_hex(status)} ({self._where()})", status=status
            )

    def retrieve(
        self,
        what: str,
        query: Dataset,
        dest_ae: str | None = None,
        handler: OnStore | None = None,
        on_progress: Callable[[SubOperations], None] | None = None,
    ) -> SubOperations:
        """C-MOVE (to `dest_ae`) or C-GET (C-STOREs on this association go to `handler`, as
        to a Storage SCP's `on_store`)."""
        is_get = dest_ae is None
        sop = (
            StudyRootQueryRetrieveInformationModelGet
            if is_get
            else StudyRootQueryRetrieveInformationModelMove
        )
        cx_id = self._context(sop, what)
        cmd: dict[int, int | str] = {
            ul.AFFECTED_SOP_CLASS: sop,
            ul.COMMAND_FIELD: ul.C_GET_RQ if is_get else ul.C_MOVE_RQ,
            ul.MESSAGE_ID: self._next_id(),
            ul.PRIORITY: 0,
            ul.DATASET_TYPE: ul.HAS_DATASET,
        }
        if dest_ae is not None:
            cmd[ul.MOVE_DESTINATION] = dest_ae
        result = SubOperations()
        self._send(what, cx_id, ul.encode_command(cmd), self._encode(query, cx_id), result)
        answered = False
        while True:
            rx_cx, rsp, data = self._read(what, self.scu.retrieve_timeout_s, answered, result)
            answered = True
            field_ = ul.us(rsp.get(ul.COMMAND_FIELD))
            if field_ == ul.C_STORE_RQ and data is not None and handler is not None:
                self._store(rx_cx, rsp, data, handler, result)
                continue
            if field_ != (ul.C_GET_RSP if is_get else ul.C_MOVE_RSP):
                self.ch.abort()
                raise AssociationAborted(
                    f"{what}: unexpected DIMSE command {_hex(field_)} ({self._where()}); {result}",
                    result=result,
                )
            for attr, elem in (
                ("completed", ul.COMPLETED),
                ("failed", ul.FAILED),
                ("warning", ul.WARNING),
                ("remaining", ul.REMAINING),
            ):
                value = ul.us(rsp.get(elem))
                if value is not None:
                    setattr(result, attr, value)
            status = ul.us(rsp.get(ul.STATUS))
            if status is not None and is_pending(status):
                if on_progress is not None:
                    on_progress(result)
                continue
            result.status = status
            if rsp.get(ul.REMAINING) is None:
                result.remaining = 0  # absent from a final response: nothing left
            return result

    def _store(
        self,
        cx_id: int,
        rq: dict[int, bytes],
        data: bytes,
        handler: OnStore,
        result: SubOperations,
    ) -> None:
        sop_class = ul.ui(rq.get(ul.AFFECTED_SOP_CLASS))
        sop_instance = ul.ui(rq.get(ul.AFFECTED_SOP_INSTANCE))
        syntax = self.ch.contexts[cx_id]
        event = ReceivedInstance(sop_class, sop_instance, syntax, data, self.peer.ae_title)
        status = call_on_store(handler, event)
        result.received += 1
        rsp = ul.response_command(
            ul.C_STORE_RSP, ul.us(rq.get(ul.MESSAGE_ID)) or 0, status, sop_class, sop_instance
        )
        self._send("C-STORE", cx_id, rsp, None, result)

    def release(self) -> None:
        """A-RELEASE; falls back to closing the connection if the peer does not answer."""
        if self.released:
            return
        self.released = True
        try:
            self.ch.sock.settimeout(self.scu.timeout_s)
            self.ch.send(ul.RELEASE_RQ_PDU)
            for _ in range(64):  # late answers may come first; a peer that never stops is cut
                if self.ch.read_pdu()[0] == ul.RELEASE_RP:
                    break
        except (OSError, ul.PeerGone, ul.ProtocolError):
            pass
        finally:
            self.ch.close()

    def abort(self) -> None:
        self.released = True
        self.ch.abort()


def _hex(value: int | None) -> str:
    return "none" if value is None else f"0x{value:04X}"


class Scu:
    """The gateway's SCU. `timeout_s` bounds connect, association and each DIMSE response;
    `retrieve_timeout_s` (default: the same) bounds the wait between two C-MOVE/C-GET responses,
    for PACS that send no pending responses. Thread-safe: each call has its own association."""

    def __init__(
        self,
        calling_ae: str = "SPHERE",
        timeout_s: float = 30.0,
        *,
        retrieve_timeout_s: float | None = None,
        max_pdu: int = 0,
    ) -> None:
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.retrieve_timeout_s = retrieve_timeout_s or timeout_s
        self.max_pdu = max_pdu  # what we accept; 0 = unlimited
        self.qr_contexts: list[tuple[str, list[str]]] = [
            (uid, UNCOMPRESSED)
            for uid in (
                Verification,
                StudyRootQueryRetrieveInformationModelFind,
                StudyRootQueryRetrieveInformationModelMove,
            )
        ]

    @contextmanager
    def connect(
        self,
        peer: Peer,
        contexts: ul.Contexts | None = None,
        scp_roles: list[str] | None = None,
    ) -> Iterator[Association]:
        """An association to `peer` (default contexts: C-ECHO, C-FIND, C-MOVE), released on exit,
        aborted if the block raises."""
        contexts = contexts or self.qr_contexts
        where = f"{self.calling_ae} -> {peer.ae_title}@{peer.host}:{peer.port}"
        try:
            sock = socket.create_connection((peer.host, peer.port), timeout=self.timeout_s)
        except TimeoutError as exc:
            raise DimseTimeout(f"no TCP connection within {self.timeout_s:g}s ({where})") from exc
        except OSError as exc:
            raise PeerUnreachable(f"cannot connect ({where}): {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch = ul.Channel(sock)
        try:
            neg = self._negotiate(ch, peer, contexts, scp_roles or [], where)
        except BaseException:
            ch.close()
            raise
        assoc = Association(self, peer, ch, neg)
        try:
            yield assoc
        except BaseException as exc:
            if isinstance(exc, DimseError) and exc.status is not None:
                assoc.release()  # the peer answered (with a failure): part politely
            else:
                assoc.abort()
            raise
        assoc.release()

    def _negotiate(
        self,
        ch: ul.Channel,
        peer: Peer,
        contexts: ul.Contexts,
        scp_roles: list[str],
        where: str,
    ) -> ul.Negotiated:
        rq = ul.associate_rq_pdu(self.calling_ae, peer.ae_title, contexts, self.max_pdu, scp_roles)
        try:
            ch.send(rq)
            pdu_type, pdu = ch.read_pdu()
        except TimeoutError as exc:
            raise DimseTimeout(
                f"no association response within {self.timeout_s:g}s ({where})"
            ) from exc
        except (OSError, ul.PeerGone) as exc:
            raise AssociationAborted(
                f"peer closed the connection during association ({where})"
            ) from exc
        except ul.ProtocolError as exc:
            raise AssociationAborted(f"unreadable association answer: {exc} ({where})") from exc
        try:
            if pdu_type == ul.ASSOCIATE_RJ:
                why = ul.describe_reject(pdu)
                raise AssociationRejected(f"association rejected ({where}): {why}")
            if pdu_type == ul.ABORT:
                raise AssociationAborted(f"association aborted {ul.describe_abort(pdu)} ({where})")
            if pdu_type != ul.ASSOCIATE_AC:
                raise AssociationAborted(
                    f"unexpected PDU 0x{pdu_type:02X} during association ({where})"
                )
            neg = ul.parse_associate_ac(pdu, contexts, self.calling_ae, peer.ae_title)
        except ul.ProtocolError as exc:
            raise AssociationAborted(f"unreadable association answer: {exc} ({where})") from exc
        if not neg.contexts:
            ch.send(ul.abort_pdu(0, 0))
            raise AssociationRejected(f"no presentation context accepted ({where})")
        ch.peer_max_pdu = neg.peer_max_pdu
        ch.contexts = neg.contexts
        return neg

    # --- services ------------------------------------------------------------------------

    def echo(self, peer: Peer) -> None:
        """C-ECHO; raises DimseError unless the peer answers success."""
        with self.connect(peer) as assoc:
            assoc.echo()

    def find_studies(
        self,
        peer: Peer,
        *,
        accession: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
    ) -> list[Dataset]:
        """Study-level C-FIND on exact keys (at least one); returns every match's identifier
        (UIDs, Patient ID, Accession Number, Study Date, Modalities in Study, counts)."""
        if not (accession or patient_id or study_uid):
            raise ValueError("give accession, patient_id or study_uid")
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = _exact("study_uid", study_uid or "")
        q.PatientID = _exact("patient_id", patient_id or "")
        q.AccessionNumber = _exact("accession", accession or "")
        q.StudyDate = ""
        q.ModalitiesInStudy = ""
        q.NumberOfStudyRelatedSeries = None
        q.NumberOfStudyRelatedInstances = None
        with self.connect(peer) as assoc:
            return assoc.find(q)

    def find_series(self, peer: Peer, study_uid: str) -> list[Dataset]:
        """Series-level C-FIND within one study: each series' identifier (UIDs, Modality,
        Series Number, Number of Series Related Instances)."""
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = _exact("study_uid", study_uid)
        q.SeriesInstanceUID = ""
        q.Modality = ""
        q.SeriesNumber = None
        q.NumberOfSeriesRelatedInstances = None
        with self.connect(peer) as assoc:
            return assoc.find(q)

    def find_image_size(
        self, peer: Peer, study_uid: str, series_uid: str
    ) -> tuple[int, int, int, int] | None:
        """Rows, columns, bits allocated and frames of an instance of a series, as an
        image-level C-FIND answers them (for a pull's plan); None when it gives none."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID = _exact("study_uid", study_uid)
        q.SeriesInstanceUID = _exact("series_uid", series_uid)
        q.SOPInstanceUID = ""
        q.Rows = None
        q.Columns = None
        q.BitsAllocated = None
        q.NumberOfFrames = None
        with self.connect(peer) as assoc:
            answers = assoc.find(q)
        for ds in answers:
            rows, cols, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
            if rows and cols and bits:
                return rows, cols, bits, _int(ds, "NumberOfFrames") or 1
        return None

    def move_series(
        self,
        peer: Peer,
        study_uid: str,
        series_uid: str,
        dest_ae: str,
        *,
        on_progress: Callable[[SubOperations], None] | None = None,
    ) -> SubOperations:
        """C-MOVE one series to `dest_ae` (the gateway's Storage SCP).

        Returns the final counts and status, a failure status included (e.g. 0xA801 "move
        destination unknown"): check `.ok`. Raises DimseError, with `.result` = the counts so far,
        when the association breaks or times out before the final response.
        """
        mover = Mover(self, peer)  # on an association of its own
        try:
            return mover.move_series(study_uid, series_uid, dest_ae, on_progress=on_progress)
        finally:
            mover.close()

    def find_sop_classes(self, peer: Peer, study_uid: str) -> list[str]:
        """The SOP classes of a study's instances (SOP Classes in Study, a study-level C-FIND);
        [] when the PACS does not say."""
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = _exact("study_uid", study_uid)
        q.SOPClassesInStudy = ""
        with self.connect(peer) as assoc:
            answers = assoc.find(q)
        found: dict[str, None] = {}
        for ds in answers:
            uids = ds.get("SOPClassesInStudy") or []
            for uid in [uids] if isinstance(uids, str) else uids:
                found[str(uid)] = None
        return [uid for uid in found if uid]

    def get_series(
        self,
        peer: Peer,
        study_uid: str,
        series_uid: str,
        on_store: OnStore,
        *,
        on_progress: Callable[[SubOperations], None] | None = None,
        sop_classes: list[str] | None = None,
    ) -> SubOperations:
        """C-GET one series over its own association; each instance goes to `on_store(event)`
        (as the Storage SCP's handler), whose return value is the C-STORE status sent back.
        `sop_classes` (those of the study, see `find_sop_classes`) are offered in every syntax
        the Storage SCP takes, so the PACS sends what it holds as it holds it. Same result and
        errors as move_series."""
        q = _series_query(study_uid, series_uid)
        with self.connect(peer, get_contexts(sop_classes), GET_STORAGE_CLASSES) as assoc:
            return assoc.retrieve("C-GET", q, handler=on_store, on_progress=on_progress)


class Mover:
    """C-MOVEs of series to one peer over one association, kept open from one call to the next:
    a pull asks for series after series, and each new association costs the PACS and the pull
    ~10 ms of setting up and parting. Not thread-safe (one per thread); `close()` releases."""

    def __init__(self, scu: Scu, peer: Peer) -> None:
        self.scu, self.peer = scu, peer
        self._open: ExitStack | None = None
        self._assoc: Association | None = None
        self.associations = 0  # opened so far

    def move_series(
        self,
        study_uid: str,
        series_uid: str,
        dest_ae: str,
        *,
        on_progress: Callable[[SubOperations], None] | None = None,
    ) -> SubOperations:
        """As `Scu.move_series`. A kept association the PACS has closed meanwhile (many end
        idle ones) is replaced once, when it broke before any answer."""
        q = _series_query(study_uid, series_uid)
        kept = self._assoc is not None
        assoc = self._assoc or self._connect()
        try:
            return assoc.retrieve("C-MOVE", q, dest_ae=dest_ae, on_progress=on_progress)
        except BaseException as exc:
            self._end(exc)
            if kept and isinstance(exc, AssociationAborted) and _unanswered(exc.result):
                return self.move_series(study_uid, series_uid, dest_ae, on_progress=on_progress)
            raise

    def close(self) -> None:
        """Release the association, if one is open."""
        self._end(None)

    def _connect(self) -> Association:
        stack = ExitStack()
        self._assoc = stack.enter_context(self.scu.connect(self.peer))
        self._open = stack
        self.associations += 1
        return self._assoc

    def _end(self, exc: BaseException | None) -> None:
        """Release (or, after an error that needs it, abort) the association; see Scu.connect."""
        stack, self._open, self._assoc = self._open, None, None
        if stack is not None:
            if exc is None:
                stack.close()
            else:
                stack.__exit__(type(exc), exc, exc.__traceback__)


def _unanswered(result: object) -> bool:
    return (
        isinstance(result, SubOperations)
        and result.status is None
        and not (result.completed or result.failed or result.warning or result.remaining)
    )


def get_contexts(sop_classes: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """A C-GET association's contexts: every storage class uncompressed, then one context per
    other syntax the Storage SCP takes for the image classes among `sop_classes`
    (OFTEN_COMPRESSED when the PACS did not say) while they fit in 128. A PACS answers one
    syntax per context and sends an instance as it holds it only where that syntax was accepted
    (else it transcodes), so each syntax needs a context of its own."""
    contexts: list[tuple[str, list[str]]] = [
        (StudyRootQueryRetrieveInformationModelGet, UNCOMPRESSED)
    ]
    contexts += [(uid, UNCOMPRESSED) for uid in GET_STORAGE_CLASSES]
    wanted = sop_classes or OFTEN_COMPRESSED
    for uid in dict.fromkeys(wanted):
        if uid not in GET_STORAGE_CLASSES or uid in NO_PIXELS:
            continue
        if len(contexts) + len(_AS_HELD) > _MAX_CONTEXTS:
            break  # the rest come uncompressed: the PACS transcodes them
        contexts += [(uid, [syntax]) for syntax in _AS_HELD]
    return contexts


def _series_query(study_uid: str, series_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = _exact("study_uid", study_uid)
    q.SeriesInstanceUID = _exact("series_uid", series_uid)
    return q
