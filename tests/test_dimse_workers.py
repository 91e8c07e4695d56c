"""The Storage SCP with worker processes, against real peers: Orthanc C-MOVEs, dcmtk storescu.

The handlers run in the workers, so they report through files: one per stored instance (named by
SOP Instance UID, holding the worker's pid) and one per association event.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom.received import ReceivedInstance
from gateway.dimse.forkserver import ForkServer
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import AssociationRejected, Peer, Scu
from tests.orthanc_fixture import GATEWAY_AE, Seeded
from tests.test_dimse import assert_no_phi, intruder_push

pytestmark = pytest.mark.peers

# Workers forked from the fork server (which imports this module once) instead of fresh ones.
PRELOAD = ["tests.test_dimse_workers"]


def _wait_for(predicate, timeout_s: float = 20.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@dataclass(frozen=True)
class Recorder:
    """Handler factory (picklable). `explode`: series whose instances raise; `hold`: series
    whose instances wait for `out/go`; `meet`: on_store waits until that many associations
    were opened (across workers); `only_from`: other calling AEs are refused with 0x0124."""

    out: Path
    explode: str = ""
    hold: str = ""
    meet: int = 0
    only_from: str = ""
    fail_factory: bool = False

    def __call__(self) -> RecordingHandler:
        if self.fail_factory:
            raise RuntimeError("cannot open the spool")
        for sub in ("stored", "events"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        return RecordingHandler(self)


class RecordingHandler:
    def __init__(self, cfg: Recorder) -> None:
        self.cfg = cfg
        self.pid = os.getpid()

    def _event(self, name: str) -> None:
        (self.cfg.out / "events" / f"{name}-{self.pid}").write_text("")

    def on_association(self, assoc_id: int, calling_ae: str) -> None:
        self._event(f"open-{assoc_id}")

    def on_release(self, assoc_id: int) -> None:
        self._event(f"end-{assoc_id}")

    def on_store(self, event: ReceivedInstance) -> int:
        ds, calling_ae = event.dataset, event.calling_ae
        cfg = self.cfg
        if cfg.only_from and calling_ae != cfg.only_from:
            return 0x0124  # refused: not authorized
        series = ds.SeriesInstanceUID
        if series == cfg.explode:
            raise RuntimeError(f"cannot spool {ds.PatientName} {ds.SOPInstanceUID}")
        if series == cfg.hold:
            self._event("holding")
            _wait_for((cfg.out / "go").exists, 60)
        if cfg.meet:
            _wait_for(lambda: len(events(cfg.out, "open")) >= cfg.meet, 10)
        (cfg.out / "stored" / ds.SOPInstanceUID).write_text(str(self.pid))
        return 0


def events(out: Path, kind: str) -> list[str]:
    return [p.name for p in (out / "events").glob(f"{kind}-*")]


def stored(out: Path) -> dict[str, int]:
    """SOP Instance UID -> pid of the worker that stored it."""
    return {p.name: int(p.read_text()) for p in (out / "stored").iterdir()}


def scu(timeout_s: float = 30.0) -> Scu:
    return Scu(GATEWAY_AE, timeout_s=timeout_s)


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def series_jobs(seeded: Seeded) -> list[tuple[str, str]]:
    return [(st.study_uid, se.series_uid) for st in seeded.corpus.studies for se in st.series]


@pytest.mark.parametrize("preload", [None, PRELOAD])
def test_two_concurrent_moves_go_to_two_workers(
    preload: list[str] | None, pacs_peer: Peer, seeded: Seeded, start_scp, tmp_path: Path
) -> None:
    scp = start_scp(None, handler_factory=Recorder(tmp_path, meet=2), workers=2, preload=preload)
    assert len(scp.worker_pids) == 2
    jobs = series_jobs(seeded)[:2]
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda j: scu().move_series(pacs_peer, j[0], j[1], GATEWAY_AE), jobs)
        )
    assert all(r.ok for r in results)
    got = stored(tmp_path)
    expected = seeded.sop_uids[jobs[0][1]] | seeded.sop_uids[jobs[1][1]]
    assert set(got) == expected
    assert set(got.values()) == set(scp.worker_pids)  # both workers stored instances
    assert scp.received == len(expected) and scp.failed == 0
    # Each association's end reached its handler, in the worker that served it.
    assert _wait_for(lambda: len(events(tmp_path, "end")) == len(events(tmp_path, "open")))
    assert len(events(tmp_path, "open")) >= 2
    assert _wait_for(lambda: scp.open_associations == 0)


@pytest.mark.parametrize("preload", [None, PRELOAD])
def test_handler_exception_is_a_failure_and_the_worker_keeps_serving(
    preload: list[str] | None,
    pacs_peer: Peer,
    seeded: Seeded,
    start_scp,
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
) -> None:
    (bad_study, bad), (good_study, good) = series_jobs(seeded)[:2]
    scp = start_scp(
        None, handler_factory=Recorder(tmp_path, explode=bad), workers=2, preload=preload
    )
    pids = scp.worker_pids
    result = scu().move_series(pacs_peer, bad_study, bad, GATEWAY_AE)
    assert not result.ok and result.completed == 0
    assert scp.failed >= 1
    result = scu().move_series(pacs_peer, good_study, good, GATEWAY_AE)
    assert result.ok
    assert set(stored(tmp_path)) == seeded.sop_uids[good]
    assert scp.worker_pids == pids  # no worker died over it
    err = capfd.readouterr().err
    assert "RuntimeError" in err  # the worker logged the failure, to stderr
    assert_no_phi(err, seeded)


@pytest.mark.parametrize("preload", [None, PRELOAD])
def test_killed_worker_aborts_its_association_and_is_replaced(
    preload: list[str] | None, pacs_peer: Peer, seeded: Seeded, start_scp, tmp_path: Path
) -> None:
    (study, held), (other_study, other) = series_jobs(seeded)[:2]
    scp = start_scp(None, handler_factory=Recorder(tmp_path, hold=held), workers=2, preload=preload)
    with ThreadPoolExecutor(1) as pool:
        move = pool.submit(scu().move_series, pacs_peer, study, held, GATEWAY_AE)
        assert _wait_for(lambda: events(tmp_path, "holding"))
        victim = int(events(tmp_path, "holding")[0].rsplit("-", 1)[1])
        os.kill(victim, signal.SIGKILL)
        result = move.result(timeout=60)  # the C-MOVE ends: no hang
    assert not result.ok
    assert not (set(stored(tmp_path)) & seeded.sop_uids[held])
    # A replacement worker comes up; the SCP serves as before.
    assert _wait_for(lambda: len(scp.worker_pids) == 2 and victim not in scp.worker_pids)
    (tmp_path / "go").write_text("")
    result = scu().move_series(pacs_peer, other_study, other, GATEWAY_AE)
    assert result.ok
    assert set(stored(tmp_path)) == seeded.sop_uids[other]


@pytest.mark.parametrize("workers", [0, 2])
def test_storescu_push_refused_by_handler(
    seeded: Seeded, start_scp, tmp_path: Path, workers: int
) -> None:
    factory = Recorder(tmp_path, only_from="ORTHANC")
    scp = start_scp(None, register=False, handler_factory=factory, workers=workers)
    intruder_push(scp.port, seeded.corpus.files[0])
    assert stored(tmp_path) == {}
    assert scp.received == 1 and scp.failed == 1
    # The association's open and end reached the handler (in-process or in a worker).
    assert _wait_for(lambda: len(events(tmp_path, "end")) == 1)
    assert len(events(tmp_path, "open")) == 1


def test_association_limit_across_workers(start_scp, tmp_path: Path) -> None:
    scp = start_scp(
        None, register=False, handler_factory=Recorder(tmp_path), workers=2, max_associations=1
    )
    peer = Peer(GATEWAY_AE, "127.0.0.1", scp.port)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", scp.port, ae_title=GATEWAY_AE)
    try:
        assert held.is_established
        with pytest.raises(AssociationRejected):
            scu().echo(peer)  # would have gone to the idle worker
    finally:
        held.release()
    assert _wait_for(lambda: len(events(tmp_path, "end")) == 1)
    # the slot frees just after the A-RELEASE-RP (and after on_release's event): wait for it
    assert _wait_for(lambda: scp.open_associations == 0)
    scu().echo(peer)


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    before = children()
    scp = StorageSCP(
        GATEWAY_AE, "127.0.0.1", 0, handler_factory=Recorder(tmp_path), workers=2, timeout_s=5
    )
    with scp:
        pids = scp.worker_pids
        assert len(pids) == 2 and set(pids) <= children()
        scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))
        # An association left open is aborted by stop(), not waited for.
        ae = AE(ae_title="LINGERER")
        ae.add_requested_context(Verification)
        lingering = ae.associate("127.0.0.1", scp.port, ae_title=GATEWAY_AE)
        assert lingering.is_established
    assert children() == before
    assert not any(psutil.pid_exists(p) for p in pids)  # exited and reaped: no zombies
    assert _wait_for(lambda: lingering.is_aborted, 10)  # the peer saw it end


def test_forked_workers_end_with_the_scp_and_the_fork_server_serves_again(tmp_path: Path) -> None:
    def forked_scp() -> StorageSCP:
        factory = Recorder(tmp_path)
        return StorageSCP(
            GATEWAY_AE, "127.0.0.1", 0, handler_factory=factory, workers=2, preload=PRELOAD
        )

    with forked_scp() as scp:
        server = ForkServer.shared(PRELOAD).process.pid
        pids = scp.worker_pids
        assert len(pids) == 2 and all(psutil.Process(p).ppid() == server for p in pids)
        scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))
    assert _wait_for(lambda: not any(psutil.pid_exists(p) for p in pids))  # gone, not zombies
    os.kill(server, signal.SIGKILL)  # a fork server that died is replaced by the next pool
    assert _wait_for(
        lambda: not psutil.pid_exists(server) or psutil.Process(server).status() == "zombie"
    )
    with forked_scp() as scp:
        assert len(scp.worker_pids) == 2
        scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))
    assert ForkServer.shared(PRELOAD).process.pid != server


def test_failing_factory_fails_start_and_leaves_nothing(tmp_path: Path) -> None:
    before = children()
    scp = StorageSCP(
        GATEWAY_AE, "127.0.0.1", 0, handler_factory=Recorder(tmp_path, fail_factory=True), workers=2
    )
    with pytest.raises(RuntimeError, match="failed to start"):
        scp.start()
    assert not scp.running
    assert children() == before
    # The port was released: a good SCP can listen at once.
    with StorageSCP(GATEWAY_AE, "127.0.0.1", 0, handler_factory=Recorder(tmp_path)) as ok:
        scu().echo(Peer(GATEWAY_AE, "127.0.0.1", ok.port))


def test_unpicklable_factory_is_refused_at_start(tmp_path: Path) -> None:
    lock = threading.Lock()

    def unpicklable() -> Any:  # not a Handler either: refused before that matters
        return lock

    scp = StorageSCP(GATEWAY_AE, "127.0.0.1", 0, handler_factory=unpicklable, workers=1)
    with pytest.raises(TypeError, match="picklable"):
        scp.start()
    assert not scp.running
