"""How a pull reaches a PACS: one `Retriever` per source and protocol. The pull plans with
`find_studies` and `find_series`, then calls `retrieve` per series (from several threads); the
retriever brings the instances to `Receiver`s, which refuse what is not expected, de-identify and
spool. C-MOVE and C-GET are here, DICOMweb (QIDO-RS + WADO-RS) in `dicomweb`, which speaks no
DIMSE; the types they share are `source`'s. Another protocol is one more class with the same
methods.

`open_retrievers(core, project)` builds one per source the settings name; nothing else reads them.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import asdict
from functools import partial
from typing import Any

from pydicom import Dataset

from core import Core, NotSetUp, SphereError
from core.settings import Source
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import DimseError, Mover, Peer, Scu, SubOperations
from gateway.pull.base import ReceivesHere, SourceBase
from gateway.pull.dicomweb import DicomwebRetriever
from gateway.pull.guard import SourceError, guarded
from gateway.pull.receiver import ReceiverConfig, in_worker
from gateway.pull.source import Retriever, RetrieveResult, SeriesHit, StudyHit
from gateway.web.client import DicomwebClient

__all__ = ["DicomwebRetriever", "PortInUse", "Retriever", "SourceError", "open_retrievers"]

# What the Storage SCP's worker processes import, once, in the fork server they are forked from.
WORKER_MODULES = ["gateway.pull.receiver"]


class PortInUse(SphereError):
    """Our Storage SCP's port is taken or not ours to use (the message names it)."""


# -- DIMSE ------------------------------------------------------------------------------------


class DimseRetriever(SourceBase):
    """What C-MOVE and C-GET share: C-ECHO and C-FIND (Study Root) on the PACS."""

    protocol = "dimse"
    errors = DimseError

    def answered(self, e: Exception) -> bool:
        return isinstance(e, DimseError) and e.status is not None

    def __init__(self, name: str, scu: Scu, peer: Peer, cfg: ReceiverConfig, limit: int) -> None:
        self.name, self.scu, self.peer, self.cfg = name, scu, peer, cfg
        self.max_concurrent = max(1, limit)

    def echo(self) -> None:
        self._call(self.scu.echo, self.peer)

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        found = self._call(partial(self.scu.find_studies, self.peer, **{kind: value}))
        return [study_hit(ds) for ds in found]

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        found = self._call(self.scu.find_series, self.peer, study_uid)
        return [series_hit(ds, study_uid) for ds in found]

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
                return _result(
                    self._call(mover.move_series, study_uid, series_uid, self.scu.calling_ae)
                )
            finally:
                mover.close()
        with self._lock:
            held = self._movers.get(threading.get_ident())
            if held is None:
                held = self._movers[threading.get_ident()] = Mover(self.scu, self.peer)
        return _result(self._call(held.move_series, study_uid, series_uid, self.scu.calling_ae))


class GetRetriever(DimseRetriever, ReceivesHere):
    """C-GET: the instances come back on our own association, to a receiver in this process
    (for a PACS that cannot open a connection back to us)."""

    protocol = "get"

    def __init__(self, name: str, scu: Scu, peer: Peer, cfg: ReceiverConfig, limit: int) -> None:
        super().__init__(name, scu, peer, cfg, limit)
        self._classes: dict[str, list[str]] = {}  # SOP classes by study, as the PACS says
        self._lock = threading.Lock()

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        receiver = self.receiver
        get = partial(self.scu.get_series, sop_classes=self._of(study_uid))
        result = self._call(get, self.peer, study_uid, series_uid, receiver.on_store)
        receiver.on_release()
        return _result(result)

    def _of(self, study_uid: str) -> list[str]:
        """The study's SOP classes (asked once per study): offered compressed as well."""
        with self._lock:
            known = self._classes.get(study_uid)
        if known is None:
            known = self._call(self.scu.find_sop_classes, self.peer, study_uid)
            with self._lock:
                self._classes[study_uid] = known
        return known


def _result(sub: SubOperations) -> RetrieveResult:
    return RetrieveResult(**asdict(sub))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value)


def _number(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def study_hit(ds: Dataset) -> StudyHit:
    """A study-level C-FIND identifier as the pull plans with it."""
    mods = ds.get("ModalitiesInStudy") or []
    mods = [mods] if isinstance(mods, str) else list(mods)
    return StudyHit(
        study_uid=_text(ds, "StudyInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        accession=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        modalities=tuple(str(m) for m in mods if m),
        n_series=_number(ds, "NumberOfStudyRelatedSeries"),
        n_instances=_number(ds, "NumberOfStudyRelatedInstances"),
    )


def series_hit(ds: Dataset, study_uid: str) -> SeriesHit:
    """A series-level C-FIND identifier within `study_uid`."""
    return SeriesHit(
        study_uid=_text(ds, "StudyInstanceUID") or study_uid,
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        series_number=_number(ds, "SeriesNumber"),
        n_instances=_number(ds, "NumberOfSeriesRelatedInstances"),
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
