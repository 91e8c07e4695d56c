"""How a pull reaches a PACS: one `Retriever` per protocol. The pull plans with `find_studies` and
`find_series`, then calls `retrieve` per series (from several threads); the retriever brings the
instances to `Receiver`s, which de-identify and spool them. C-MOVE and C-GET are here; another
protocol (DICOMweb) is one more class with the same methods.

`open_retriever(core, project)` picks the one the settings name; nothing else looks at them.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Protocol

from core import Core, NotSetUp
from core.settings import Settings
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import Mover, Peer, RetrieveResult, Scu, SeriesHit, StudyHit
from gateway.pull.receiver import Receiver, ReceiverConfig

# What the Storage SCP's worker processes import, once, in the fork server they are forked from.
WORKER_MODULES = ["gateway.pull.receiver"]


class Retriever(Protocol):
    """A PACS the pull plans with and retrieves from. A context manager: entering makes it
    ready to receive (an SCP listening, say), leaving releases what it holds."""

    name: str  # shown in the audit trail: "move", "get", ...
    max_concurrent: int  # series retrieved at once: the PACS's association limit

    def __enter__(self) -> Retriever: ...

    def __exit__(self, *exc: object) -> None: ...

    def echo(self) -> None:
        """Check that the PACS answers; raise if it does not."""

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        """Studies matching one cohort item exactly (kind: accession, patient_id, study_uid)."""

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        """The series of one study, with the PACS's instance counts."""

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        """Bring every instance of one series to the receivers; thread-safe."""


class DimseRetriever:
    """What C-MOVE and C-GET share: C-ECHO and C-FIND (Study Root) on the PACS."""

    name = "dimse"

    def __init__(self, scu: Scu, peer: Peer, cfg: ReceiverConfig, max_concurrent: int) -> None:
        self.scu, self.peer, self.cfg = scu, peer, cfg
        self.max_concurrent = max(1, max_concurrent)

    def echo(self) -> None:
        self.scu.echo(self.peer)

    def find_studies(self, kind: str, value: str) -> list[StudyHit]:
        return self.scu.find_studies(self.peer, **{kind: value})

    def find_series(self, study_uid: str) -> list[SeriesHit]:
        return self.scu.find_series(self.peer, study_uid)

    def __str__(self) -> str:
        return f"PACS {self.peer.ae_title} at {self.peer.host}:{self.peer.port}"


class MoveRetriever(DimseRetriever):
    """C-MOVE to our own Storage SCP, whose worker processes run the receivers. Each pulling
    thread keeps its association to the PACS from one series to the next."""

    name = "move"

    def __init__(
        self,
        scu: Scu,
        peer: Peer,
        cfg: ReceiverConfig,
        max_concurrent: int,
        *,
        host: str,
        port: int,
        workers: int,
    ) -> None:
        super().__init__(scu, peer, cfg, max_concurrent)
        self.host, self.port, self.workers = host, port, workers
        self._scp: StorageSCP | None = None
        self._movers: dict[int, Mover] = {}  # by pulling thread
        self._lock = threading.Lock()

    def __enter__(self) -> MoveRetriever:
        s = self.cfg.settings
        self._scp = StorageSCP(
            ae_title=self.scu.calling_ae,
            host=self.host,
            port=self.port,
            workers=self.workers,
            handler_factory=partial(Receiver, self.cfg),
            # Room for more than the pull opens: a PACS may hold one open after a C-MOVE.
            max_associations=max(8, 4 * self.max_concurrent),
            timeout_s=s.timeout_s,
            preload=WORKER_MODULES if self.workers else None,
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            movers, self._movers = self._movers, {}
        for mover in movers.values():
            mover.close()
        if self._scp is not None:
            self._scp.stop()
            self._scp = None

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        return self._mover().move_series(study_uid, series_uid, self.scu.calling_ae)

    def _mover(self) -> Mover:
        with self._lock:
            mover = self._movers.get(threading.get_ident())
            if mover is None:
                mover = self._movers[threading.get_ident()] = Mover(self.scu, self.peer)
        return mover


class GetRetriever(DimseRetriever):
    """C-GET: the instances come back on our own association, to a receiver in this process
    (for a PACS that cannot open a connection back to us)."""

    name = "get"

    def __init__(self, scu: Scu, peer: Peer, cfg: ReceiverConfig, max_concurrent: int) -> None:
        super().__init__(scu, peer, cfg, max_concurrent)
        self._receiver: Receiver | None = None

    def __enter__(self) -> GetRetriever:
        self._receiver = Receiver(self.cfg)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None

    def retrieve(self, study_uid: str, series_uid: str) -> RetrieveResult:
        receiver = self._receiver
        if receiver is None:
            raise RuntimeError("GetRetriever used outside its `with` block")
        result = self.scu.get_series(self.peer, study_uid, series_uid, receiver.on_store)
        receiver.on_release()
        return result


def open_retriever(core: Core, project: str, *, actor: str | None = None) -> DimseRetriever:
    """The retriever the settings name (`SPHERE_PACS__RETRIEVE`), receiving for `project`."""
    s: Settings = core.settings
    cfg = ReceiverConfig.of(core, project, actor)
    scu = Scu(s.ae_title, s.timeout_s)
    peer = Peer(s.pacs.ae_title, s.pacs.host, s.pacs.port)
    if s.pacs.retrieve == "move":
        return MoveRetriever(
            scu,
            peer,
            cfg,
            s.max_associations,
            host=s.host,
            port=s.port,
            workers=s.receive_workers,
        )
    if s.pacs.retrieve == "get":
        return GetRetriever(scu, peer, cfg, s.max_associations)
    raise NotSetUp(f"SPHERE_PACS__RETRIEVE is '{s.pacs.retrieve}': it must be 'move' or 'get'")
