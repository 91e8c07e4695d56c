"""How a pull reaches a PACS: one `Retriever` per source and protocol. The pull plans with
`find_studies` and `find_series`, then calls `retrieve` per series (from several threads); the
retriever brings the instances to `Receiver`s, which refuse what is not expected, de-identify and
spool. C-MOVE, C-GET and DICOMweb (QIDO-RS + WADO-RS) are here: another protocol is one more class
with the same methods.

`open_retrievers(core, project)` builds one per source the settings name; nothing else reads them.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from functools import partial
from io import BytesIO
from typing import Any, Protocol, TypeVar

from pydicom.filereader import read_dataset
from pydicom.uid import UID

from core import Core, NotSetUp, SphereError, metrics
from core.settings import Source
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import DimseError, Mover, Peer, RetrieveResult, Scu, SeriesHit, StudyHit
from gateway.dimse.service import ReceivedInstance
from gateway.pull.guard import SourceError, guarded
from gateway.pull.receiver import Receiver, ReceiverConfig, in_worker
from gateway.web.client import DicomwebClient, DicomwebError

# What the Storage SCP's worker processes import, once, in the fork server they are forked from.
WORKER_MODULES = ["gateway.pull.receiver"]
T = TypeVar("T")


class PortInUse(SphereError):
    """Our Storage SCP's port is taken or not ours to use (the message names it)."""


class Retriever(Protocol):
    """A PACS the pull plans with and retrieves from. A context manager: entering makes it
    ready to receive (an SCP listening, a receiver open), leaving releases what it holds.
    Network failures raise `SourceError`."""

    name: str  # the source's name, recorded with each series pulled from it
    protocol: str  # "move", "get", "dicomweb"
    max_concurrent: int  # series retrieved at once: the source's association or request limit

    def __enter__(self) -> Retriever: ...

    def __exit__(self, *exc: object) -> None: ...

    def echo(self) -> None:
        """Check that the source answers; `SourceError` if it does not."""

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        """Studies matching one cohort item exactly (kind: accession, patient_id, study_uid)."""

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        """The series of one study, with the source's instance counts."""

    def image_size(self, study_uid: str, series_uid: str) -> tuple[int, int, int, int] | None:
        """Rows, columns, bits allocated, frames of an instance of the series (a plan's size
        estimate), or None when the source does not say."""

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        """Bring every instance of one series to the receivers; thread-safe."""


class _Source:
    """What every retriever shares: its protocol's errors become `SourceError`, named by it."""

    errors: type[Exception] = Exception
    name: str

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            with self.in_use():
                return fn(*args)
        except self.errors as e:
            raise SourceError(f"{self}: {e}", answered=_answered(e)) from None

    def in_use(self) -> Any:
        """Counts an association (or HTTP exchange) with the source while it is open."""
        return metrics.get().connections.labels(self.name).track_inprogress()


def _answered(e: Exception) -> bool:
    """Whether the source answered at all: a DIMSE status, or an HTTP answer."""
    if isinstance(e, DimseError):
        return e.status is not None
    return "cannot be reached" not in str(e)


class _ReceivesHere(_Source):
    """A retriever whose instances arrive in this process: one receiver, open while entered."""

    cfg: ReceiverConfig
    _receiver: Receiver | None = None

    def __enter__(self) -> _ReceivesHere:
        self._receiver = Receiver(self.cfg)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    @property
    def receiver(self) -> Receiver:
        if self._receiver is None:
            raise RuntimeError("retriever used outside its `with` block")
        return self._receiver


# -- DIMSE ------------------------------------------------------------------------------------


class DimseRetriever(_Source):
    """What C-MOVE and C-GET share: C-ECHO and C-FIND (Study Root) on the PACS."""

    protocol = "dimse"
    errors = DimseError

    def __init__(self, name: str, scu: Scu, peer: Peer, cfg: ReceiverConfig, limit: int) -> None:
        self.name, self.scu, self.peer, self.cfg = name, scu, peer, cfg
        self.max_concurrent = max(1, limit)

    def echo(self) -> None:
        self._call(self.scu.echo, self.peer)

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        return self._call(partial(self.scu.find_studies, self.peer, **{kind: value}))

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        return self._call(self.scu.find_series, self.peer, study_uid)

    def image_size(self, study_uid: str, series_uid: str) -> tuple[int, int, int, int] | None:
        """Rows, columns, bits, frames of one of the series' instances, if the PACS says."""
        return self._call(self.scu.find_image_size, self.peer, study_uid, series_uid)

    def __str__(self) -> str:
        return f"PACS {self.peer.ae_title} at {self.peer.host}:{self.peer.port}"


class _SharedSCP:
    """Our Storage SCP, one per pull whatever the number of C-MOVE sources: started by the
    first retriever that enters, stopped by the last that leaves."""

    def __init__(self, cfg: ReceiverConfig, host: str, port: int, workers: int) -> None:
        self.cfg, self.host, self.port, self.workers = cfg, host, port, workers
        self.users = 0
        self.limit = 0  # associations the PACS may open at once, all sources together
        self._scp: StorageSCP | None = None
        self._lock = threading.Lock()

    def enter(self, ae_title: str) -> None:
        with self._lock:
            if self._scp is None:
                self._scp = self._start(ae_title)
            self.users += 1

    def _start(self, ae_title: str) -> StorageSCP:
        """Our Storage SCP, listening; `PortInUse` when its port is taken (another pull on
        this host, another program)."""
        try:
            return StorageSCP(
                ae_title=ae_title,
                host=self.host,
                port=self.port,
                workers=self.workers,
                handler_factory=partial(in_worker, self.cfg),
                # Room for more than the pull opens: a PACS may hold one open after a C-MOVE.
                max_associations=max(8, 4 * self.limit),
                timeout_s=self.cfg.settings.timeout_s,
                preload=WORKER_MODULES if self.workers else None,
                allowed_callers=self.cfg.settings.allowed_callers,
            ).start()
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                raise
            raise PortInUse(
                f"the Storage SCP cannot listen on {self.host}:{self.port} "
                f"({os.strerror(e.errno)}): another pull on this host, or another program? "
                "Set SPHERE_PORT (and SPHERE_HOST) to a port the PACS knows for this node"
            ) from None

    def leave(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0 and self._scp is not None:
                self._scp.stop()
                self._scp = None


class MoveRetriever(DimseRetriever):
    """C-MOVE to our own Storage SCP, whose worker processes run the receivers. Each pulling
    thread keeps its association to the PACS from one series to the next."""

    protocol = "move"

    def __init__(
        self, name: str, scu: Scu, peer: Peer, cfg: ReceiverConfig, limit: int, scp: _SharedSCP
    ) -> None:
        super().__init__(name, scu, peer, cfg, limit)
        self.scp = scp
        scp.limit += self.max_concurrent
        self._movers: dict[int, Mover] = {}  # by pulling thread
        self.keep_open = True  # each thread's association kept from one series to the next
        self._lock = threading.Lock()

    def __enter__(self) -> MoveRetriever:
        self.scp.enter(self.scu.calling_ae)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            movers, self._movers = self._movers, {}
        for mover in movers.values():
            mover.close()
        self.scp.leave()

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        if not self.keep_open:  # an association only while it moves (a cluster-wide limit)
            mover = Mover(self.scu, self.peer)
            try:
                return self._call(mover.move_series, study_uid, series_uid, self.scu.calling_ae)
            finally:
                mover.close()
        with self._lock:
            held = self._movers.get(threading.get_ident())
            if held is None:
                held = self._movers[threading.get_ident()] = Mover(self.scu, self.peer)
        return self._call(held.move_series, study_uid, series_uid, self.scu.calling_ae)


class GetRetriever(DimseRetriever, _ReceivesHere):
    """C-GET: the instances come back on our own association, to a receiver in this process
    (for a PACS that cannot open a connection back to us)."""

    protocol = "get"

    def __init__(self, name: str, scu: Scu, peer: Peer, cfg: ReceiverConfig, limit: int) -> None:
        super().__init__(name, scu, peer, cfg, limit)
        self._classes: dict[str, list[str]] = {}  # SOP classes by study, as the PACS says
        self._lock = threading.Lock()

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        receiver = self.receiver
        get = partial(
            self.scu.get_series, on_receive=receiver.on_receive, sop_classes=self._of(study_uid)
        )
        result = self._call(get, self.peer, study_uid, series_uid)
        receiver.on_release()
        return result

    def _of(self, study_uid: str) -> list[str]:
        """The study's SOP classes (asked once per study): offered compressed as well."""
        with self._lock:
            known = self._classes.get(study_uid)
        if known is None:
            known = self._call(self.scu.find_sop_classes, self.peer, study_uid)
            with self._lock:
                self._classes[study_uid] = known
        return known


# -- DICOMweb ---------------------------------------------------------------------------------

_QIDO_KEY = {
    "accession": "AccessionNumber",
    "patient_id": "PatientID",
    "study_uid": "StudyInstanceUID",
}
_STUDY_FIELDS = "00080061,00201206,00201208"  # ModalitiesInStudy, related series, instances


class DicomwebRetriever(_ReceivesHere):
    """QIDO-RS to plan, WADO-RS to retrieve: each instance of the multipart stream goes to a
    receiver in this process, exactly as a C-STORE would (refused unless expected, de-identified,
    spooled), and is counted; the pull verifies the count against QIDO's."""

    protocol = "dicomweb"
    errors = DicomwebError

    def __init__(self, name: str, client: DicomwebClient, cfg: ReceiverConfig, limit: int) -> None:
        self.name, self.client, self.cfg = name, client, cfg
        self.max_concurrent = max(1, limit)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.client.close()

    def echo(self) -> None:
        self._call(self.client.search, "studies", {"limit": "1"})

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        if any(w in value for w in "*?\\"):
            raise ValueError(f"{kind} must not contain wildcards (* ? \\)")
        key = _QIDO_KEY[kind]
        found = self._call(
            self.client.search, "studies", {key: value, "includefield": _STUDY_FIELDS}
        )
        hits = [_study_hit(d) for d in found]
        # Only exact matches count: a server may match fuzzily or case-insensitively.
        attr = {"accession": "accession", "patient_id": "patient_id", "study_uid": "study_uid"}
        return [h for h in hits if getattr(h, attr[kind]) == value]

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        params = {"includefield": "00201209"}  # NumberOfSeriesRelatedInstances
        found = self._call(self.client.search, f"studies/{study_uid}/series", params)
        return [_series_hit(study_uid, d) for d in found]

    def image_size(self, study_uid: str, series_uid: str) -> tuple[int, int, int, int] | None:
        """Rows, columns, bits, frames of one of the series' instances, if the server says."""
        path = f"studies/{study_uid}/series/{series_uid}/instances"
        params = {"limit": "1", "includefield": "00280010,00280011,00280100,00280008"}
        for d in self._call(self.client.search, path, params):
            rows, cols, bits = _int(d, "00280010"), _int(d, "00280011"), _int(d, "00280100")
            if rows and cols and bits:
                return rows, cols, bits, _int(d, "00280008") or 1
        return None

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        receiver = self.receiver
        ok = bad = 0
        caller = f"dicomweb:{self.name}"
        try:
            with self.in_use():
                for data in self.client.series_instances(study_uid, series_uid):
                    try:
                        inst = _part10(data)
                        status = receiver.on_receive(inst, caller)
                    except ValueError:  # not a DICOM file: counted as failed, the rest goes on
                        status = 0xC000
                    if status == 0:
                        ok += 1
                    else:
                        bad += 1
        except DicomwebError as e:
            raise SourceError(f"{self}: {e}") from None
        finally:
            receiver.on_release()  # what came whole is flushed and kept for the next attempt
        return RetrieveResult(status=0, completed=ok, failed=bad)

    def __str__(self) -> str:
        return f"DICOMweb source {self.name} at {self.client.where}"


def _part10(data: bytes) -> ReceivedInstance:
    """A DICOM Part 10 file as the receiver takes it: the dataset still encoded, with what its
    file meta says of it."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM Part 10 file")
    end = 144 + int.from_bytes(data[140:144], "little")  # after (0002,0000) group length
    meta = read_dataset(BytesIO(data[132:end]), False, True)
    syntax, sop_class = meta.get("TransferSyntaxUID"), meta.get("MediaStorageSOPClassUID")
    sop = meta.get("MediaStorageSOPInstanceUID")
    if not (syntax and sop_class and sop):
        raise ValueError("DICOM file meta without its transfer syntax or SOP")
    return ReceivedInstance(str(sop_class), str(sop), UID(str(syntax)), data[end:])


def _value(d: dict[str, Any], tag: str) -> Any:
    values = (d.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _int(d: dict[str, Any], tag: str) -> int | None:
    v = _value(d, tag)
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _study_hit(d: dict[str, Any]) -> StudyHit:
    mods = (d.get("00080061") or {}).get("Value") or []
    return StudyHit(
        study_uid=str(_value(d, "0020000D") or ""),
        patient_id=str(_value(d, "00100020") or ""),
        accession=str(_value(d, "00080050") or ""),
        study_date=str(_value(d, "00080020") or ""),
        modalities=tuple(str(m) for m in mods if m),
        n_series=_int(d, "00201206"),
        n_instances=_int(d, "00201208"),
    )


def _series_hit(study_uid: str, d: dict[str, Any]) -> SeriesHit:
    return SeriesHit(
        study_uid=study_uid,
        series_uid=str(_value(d, "0020000E") or ""),
        modality=str(_value(d, "00080060") or ""),
        series_number=_int(d, "00200011"),
        n_instances=_int(d, "00201209"),
    )


# -- from settings ----------------------------------------------------------------------------


def open_retrievers(core: Core, project: str, *, actor: str | None = None) -> list[Any]:
    """One retriever per source the settings name (the default first), receiving for
    `project`. Nothing is opened until a retriever is entered."""
    s = core.settings
    cfg = ReceiverConfig.of(core, project, actor)
    scp = _SharedSCP(cfg, s.host, s.port, s.receive_workers)
    names = [src.name for src in s.all_sources()]
    if len(set(names)) != len(names):
        raise NotSetUp("SPHERE_SOURCES: each source needs a name of its own")
    who = actor or core.actor
    return [
        guarded(core, src, _retriever(core, src, cfg, scp), project, who) for src in s.all_sources()
    ]


def _retriever(core: Core, src: Source, cfg: ReceiverConfig, scp: _SharedSCP) -> Any:
    s = core.settings
    limit = src.max_concurrent or s.max_associations
    if src.protocol == "dicomweb":
        if not src.url:
            raise NotSetUp(f"source {src.name}: a DICOMweb source needs its url")
        try:
            client = DicomwebClient(
                src.url,
                username=src.username,
                password=src.password,
                token=src.token,
                ca_bundle=str(src.ca_bundle) if src.ca_bundle else None,
                timeout_s=s.timeout_s,
                retries=s.retries,
                backoff_s=s.backoff_s,
                max_connections=limit,
            )
        except ValueError as e:
            raise NotSetUp(f"source {src.name}: {e}") from None
        return DicomwebRetriever(src.name, client, cfg, limit)
    scu = Scu(s.ae_title, s.timeout_s)
    peer = Peer(src.ae_title, src.host, src.port)
    if src.protocol == "move":
        return MoveRetriever(src.name, scu, peer, cfg, limit, scp)
    if src.protocol == "get":
        return GetRetriever(src.name, scu, peer, cfg, limit)
    raise NotSetUp(f"source {src.name}: protocol must be move, get or dicomweb")
