"""Pytest fixtures: a loopback Orthanc seeded with synthetic CT (the stand-in hospital PACS), and a
factory for the gateway's Storage SCP registered in that Orthanc as a C-MOVE destination.

Listed in tests/conftest.py via `pytest_plugins`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from dicom.received import ReceivedInstance
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import Peer
from gateway.dimse.service import OnStore
from harness.localpacs import ORTHANC_BIN, LocalOrthanc
from harness.synthetic import SyntheticCorpus, generate

GATEWAY_AE = "SPHERE"


def _need(binary: str) -> None:
    if shutil.which(binary) is None and not Path(binary).exists():
        pytest.skip(f"{binary} not installed")


@contextmanager
def seeded_orthanc(folder: Path, files: Sequence[Path], scp_port: int) -> Iterator[LocalOrthanc]:
    """An Orthanc holding `files` that knows the gateway's Storage SCP (GATEWAY_AE at
    `scp_port`) as a C-MOVE destination: the PACS of a pull test."""
    modalities = {GATEWAY_AE: (GATEWAY_AE, "127.0.0.1", scp_port)}
    with LocalOrthanc(folder, modalities=modalities) as orthanc:
        assert orthanc.upload(list(files)) == len(files)
        yield orthanc


@dataclass
class Seeded:
    """A corpus and what Orthanc holds of it: SOP Instance UIDs by series."""

    corpus: SyntheticCorpus
    sop_uids: dict[str, set[str]] = field(default_factory=dict)  # series UID -> SOP UIDs
    files: dict[str, Path] = field(default_factory=dict)  # SOP UID -> source file


def seed_corpus(out_dir: Path, **kwargs: int) -> Seeded:
    """Generate a synthetic corpus and index its instances by series."""
    corpus = generate(out_dir, **kwargs)
    seeded = Seeded(corpus)
    for path in corpus.files:
        ds = dcmread(path, stop_before_pixels=True)
        sop = str(ds.SOPInstanceUID)
        seeded.sop_uids.setdefault(str(ds.SeriesInstanceUID), set()).add(sop)
        seeded.files[sop] = path
    return seeded


@pytest.fixture(scope="session")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    """2 patients x 1 study x 2 series (12 and 6 slices of 64x64 CT)."""
    return seed_corpus(
        tmp_path_factory.mktemp("corpus"),
        n_patients=2,
        studies_per_patient=1,
        series_per_study=2,
        slices=12,
        size=64,
    )


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory, seeded: Seeded) -> Iterator[LocalOrthanc]:
    """A running Orthanc holding the `seeded` corpus; the gateway's AE is declared in it."""
    _need(ORTHANC_BIN)
    pacs = LocalOrthanc(
        tmp_path_factory.mktemp("orthanc"), modalities={"sphere": (GATEWAY_AE, "127.0.0.1", 1)}
    )
    with pacs:
        assert pacs.upload(seeded.corpus.files) == len(seeded.corpus.files)
        yield pacs


@pytest.fixture()
def pacs_peer(orthanc: LocalOrthanc) -> Peer:
    return Peer(orthanc.aet, "127.0.0.1", orthanc.dicom_port)


@dataclass
class Received:
    """What a test Storage SCP got: datasets and the calling AE titles."""

    datasets: list[Dataset] = field(default_factory=list)
    calling: list[str] = field(default_factory=list)

    @property
    def sop_uids(self) -> set[str]:
        return {str(ds.SOPInstanceUID) for ds in self.datasets}


def collecting(received: Received, status: int = 0x0000) -> OnStore:
    """An on_store that keeps every dataset and answers `status`."""

    def on_store(event: ReceivedInstance) -> int:
        received.datasets.append(event.dataset)
        received.calling.append(event.calling_ae)
        return status

    return on_store


@pytest.fixture()
def start_scp(request: pytest.FixtureRequest) -> Iterator[Callable[..., StorageSCP]]:
    """Factory: `start_scp(on_store, **kwargs)` (or `start_scp(None, handler_factory=...)`) starts a
    Storage SCP on a free port, declares it in the session Orthanc (if `register`) as modality
    'sphere', and stops it after the test."""
    started: list[StorageSCP] = []

    def start(on_store: OnStore | None, register: bool = True, **kwargs: Any) -> StorageSCP:
        scp = StorageSCP(GATEWAY_AE, "127.0.0.1", 0, on_store, timeout_s=10, **kwargs).start()
        started.append(scp)
        if register:
            pacs: LocalOrthanc = request.getfixturevalue("orthanc")
            pacs.add_modality("sphere", GATEWAY_AE, "127.0.0.1", scp.port)
        return scp

    yield start
    for scp in started:
        scp.stop()
