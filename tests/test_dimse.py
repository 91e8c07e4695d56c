"""DICOM networking against real peers on loopback: Orthanc (the PACS), dcmtk tools, our SCP."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicom.received import ReceivedInstance
from gateway.dimse.scp import StorageSCP
from gateway.dimse.scu import (
    AssociationAborted,
    AssociationRejected,
    DimseError,
    DimseTimeout,
    Mover,
    Peer,
    PeerUnreachable,
    Scu,
)
from gateway.pull.retrievers import series_hit, study_hit
from harness.localpacs import LocalOrthanc
from tests.orthanc_fixture import GATEWAY_AE, Received, Seeded, collecting, seed_corpus

pytestmark = pytest.mark.peers

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str:
    """The dcmtk tool, or skip the test."""
    if shutil.which(tool) is None:
        pytest.skip(f"dcmtk {tool} not installed")
    return tool


def scu(timeout_s: float = 10.0) -> Scu:
    return Scu(GATEWAY_AE, timeout_s=timeout_s)


def assert_no_phi(text: str, seeded: Seeded) -> None:
    leaked = [p for p in seeded.corpus.phi if p in text]
    assert not leaked, f"{len(leaked)} identifying strings in the text"


# --- C-ECHO ------------------------------------------------------------------------------------


def test_echo_orthanc(pacs_peer: Peer) -> None:
    scu().echo(pacs_peer)


def test_orthanc_echoes_our_scp(orthanc: LocalOrthanc, start_scp) -> None:
    scp = start_scp(collecting(Received()))
    assert orthanc.echo_modality("sphere")
    scp.stop()
    assert not orthanc.echo_modality("sphere")


def test_echoscu_to_our_scp(start_scp) -> None:
    scp = start_scp(collecting(Received()), register=False)
    run = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOER", "-aec", GATEWAY_AE, "127.0.0.1", str(scp.port)],
        env=DCMTK_ENV,
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


def test_our_scu_echoes_our_scp(start_scp) -> None:
    scp = start_scp(collecting(Received()), register=False)
    scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))


# --- C-FIND ------------------------------------------------------------------------------------


def test_find_study_by_each_key(pacs_peer: Peer, seeded: Seeded) -> None:
    study = seeded.corpus.studies[1]
    for key in (
        {"accession": study.accession},
        {"patient_id": study.patient_id},
        {"study_uid": study.study_uid},
    ):
        hits = [study_hit(ds) for ds in scu().find_studies(pacs_peer, **key)]
        assert len(hits) == 1, key.keys()
        hit = hits[0]
        assert hit.study_uid == study.study_uid
        assert hit.patient_id == study.patient_id
        assert hit.accession == study.accession
        assert hit.study_date == study.study_date
        assert hit.modalities == ("CT",)
        assert hit.n_series == len(study.series)
        assert hit.n_instances == study.n_instances


def test_find_unknown_study_is_empty(pacs_peer: Peer) -> None:
    assert scu().find_studies(pacs_peer, accession="NOSUCHACC") == []


def test_find_refuses_wildcards_and_empty_queries(pacs_peer: Peer) -> None:
    with pytest.raises(ValueError):
        scu().find_studies(pacs_peer, patient_id="12*")
    with pytest.raises(ValueError):
        scu().find_studies(pacs_peer)


def test_find_series_counts(pacs_peer: Peer, seeded: Seeded) -> None:
    study = seeded.corpus.studies[0]
    hits = [series_hit(ds, "") for ds in scu().find_series(pacs_peer, study.study_uid)]
    assert {h.series_uid: h.n_instances for h in hits} == {
        s.series_uid: s.n_instances for s in study.series
    }
    assert all(h.modality == "CT" and h.study_uid == study.study_uid for h in hits)
    assert sorted(h.series_number or 0 for h in hits) == [1, 2]


def test_hits_repr_has_no_identifiers(pacs_peer: Peer, seeded: Seeded) -> None:
    study = seeded.corpus.studies[0]
    hits: list = [study_hit(d) for d in scu().find_studies(pacs_peer, study_uid=study.study_uid)]
    hits += [series_hit(d, "") for d in scu().find_series(pacs_peer, study.study_uid)]
    assert_no_phi(repr(hits), seeded)


# --- C-MOVE / C-GET ----------------------------------------------------------------------------


def test_move_series_every_instance_arrives(pacs_peer: Peer, seeded: Seeded, start_scp) -> None:
    got = Received()
    start_scp(collecting(got))
    study = seeded.corpus.studies[0]
    series = study.series[0]
    result = scu().move_series(pacs_peer, study.study_uid, series.series_uid, GATEWAY_AE)
    assert result.ok
    assert (result.completed, result.failed, result.warning, result.remaining) == (
        series.n_instances,
        0,
        0,
        0,
    )
    assert got.sop_uids == seeded.sop_uids[series.series_uid]
    assert set(got.calling) == {"ORTHANC"}
    # The dataset is the original, bytes for bytes where it matters, and carries its syntax.
    ds = got.datasets[0]
    original = dcmread(seeded.files[str(ds.SOPInstanceUID)])
    assert ds.PixelData == original.PixelData
    assert ds.PatientID == original.PatientID
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_a_mover_keeps_one_association_and_replaces_one_the_pacs_closed(
    pacs_peer: Peer, seeded: Seeded, start_scp
) -> None:
    got = Received()
    start_scp(collecting(got))
    study = seeded.corpus.studies[0]
    mover = Mover(scu(), pacs_peer)
    try:
        for series in study.series:
            result = mover.move_series(study.study_uid, series.series_uid, GATEWAY_AE)
            assert result.ok and result.completed == series.n_instances
        assert mover.associations == 1  # series after series on the same association
        # The PACS ends the kept association (as many do with idle ones): the next series
        # still arrives, on a new one.
        assert mover._assoc is not None and mover._assoc.ch.sock is not None  # the kept one
        mover._assoc.ch.sock.shutdown(socket.SHUT_WR)
        other = seeded.corpus.studies[1]
        series = other.series[0]
        result = mover.move_series(other.study_uid, series.series_uid, GATEWAY_AE)
        assert result.ok and result.completed == series.n_instances
        assert mover.associations == 2
    finally:
        mover.close()
    expected = sum(s.n_instances for s in study.series) + series.n_instances
    assert len(got.sop_uids) == expected


def test_move_raw_instances_spooled_as_part10_files(
    pacs_peer: Peer, seeded: Seeded, start_scp, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()

    def write(instance: ReceivedInstance) -> int:
        with open(spool / f"{len(list(spool.iterdir()))}.dcm", "wb") as fp:
            instance.write(fp)
        return 0

    start_scp(write)
    study = seeded.corpus.studies[1]
    series = study.series[0]
    result = scu().move_series(pacs_peer, study.study_uid, series.series_uid, GATEWAY_AE)
    assert result.ok
    files = sorted(spool.iterdir())
    assert len(files) == series.n_instances
    for path in files:
        ds = dcmread(path)  # a valid Part 10 file: preamble, meta, dataset
        original = dcmread(seeded.files[str(ds.SOPInstanceUID)])
        assert ds.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.PixelData == original.PixelData


def test_get_raw_instances(pacs_peer: Peer, seeded: Seeded) -> None:
    got: list[ReceivedInstance] = []
    study = seeded.corpus.studies[0]
    series = study.series[1]

    def keep(inst: ReceivedInstance) -> int:
        got.append(inst)
        return 0

    result = scu().get_series(
        pacs_peer,
        study.study_uid,
        series.series_uid,
        keep,
    )
    assert result.ok and result.received == series.n_instances
    assert {i.sop_instance for i in got} == seeded.sop_uids[series.series_uid]
    ds = got[0].dataset
    assert ds.SOPInstanceUID == got[0].sop_instance
    assert_no_phi(repr(got), seeded)


def test_move_progress_reports_pending_counts(pacs_peer: Peer, seeded: Seeded, start_scp) -> None:
    start_scp(collecting(Received()))
    study = seeded.corpus.studies[1]
    series = study.series[1]
    seen = []
    scu().move_series(
        pacs_peer,
        study.study_uid,
        series.series_uid,
        GATEWAY_AE,
        on_progress=lambda r: seen.append(r.completed + r.failed + r.remaining + r.warning),
    )
    assert seen and set(seen) == {series.n_instances}


def test_parallel_moves(pacs_peer: Peer, seeded: Seeded, start_scp) -> None:
    got = Received()
    start_scp(collecting(got))
    jobs = [(st.study_uid, se.series_uid) for st in seeded.corpus.studies for se in st.series]
    client = scu()
    with ThreadPoolExecutor(2) as pool:
        results = list(
            pool.map(lambda j: client.move_series(pacs_peer, j[0], j[1], GATEWAY_AE), jobs)
        )
    assert all(r.ok for r in results)
    assert got.sop_uids == set().union(*seeded.sop_uids.values())


def test_get_series_every_instance_arrives(pacs_peer: Peer, seeded: Seeded) -> None:
    got = Received()
    study = seeded.corpus.studies[1]
    series = study.series[0]
    result = scu().get_series(pacs_peer, study.study_uid, series.series_uid, collecting(got))
    assert result.ok
    assert result.completed == result.received == series.n_instances
    assert got.sop_uids == seeded.sop_uids[series.series_uid]
    assert set(got.calling) == {"ORTHANC"}
    original = dcmread(seeded.files[str(got.datasets[-1].SOPInstanceUID)])
    assert got.datasets[-1].PixelData == original.PixelData


def _non_ct_study(tmp_path: Path) -> list[Path]:
    """A study with a Secondary Capture image and a Basic Text SR, one series each."""
    study_uid = generate_uid()
    paths = []
    for n, (sop_class, modality) in enumerate(
        [(SecondaryCaptureImageStorage, "OT"), (BasicTextSRStorage, "SR")]
    ):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientID = "NONCT1"
        ds.PatientName = "OTHER^CLASSES"
        ds.Modality = modality
        ds.SeriesNumber = n + 1
        ds.InstanceNumber = 1
        if sop_class == SecondaryCaptureImageStorage:
            ds.ConversionType = "WSD"
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 8
            ds.BitsAllocated = ds.BitsStored = 8
            ds.HighBit = 7
            ds.PixelRepresentation = 0
            ds.PixelData = bytes(range(64))
        else:
            ds.ValueType = "CONTAINER"
            ds.ContinuityOfContent = "SEPARATE"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_get_other_sop_classes(orthanc: LocalOrthanc, pacs_peer: Peer, tmp_path: Path) -> None:
    paths = _non_ct_study(tmp_path)
    studies = {
        orthanc.request("POST", "/instances", p.read_bytes(), "application/dicom")["ParentStudy"]
        for p in paths
    }
    try:
        for path in paths:
            source = dcmread(path)
            got = Received()
            result = scu().get_series(
                pacs_peer, source.StudyInstanceUID, source.SeriesInstanceUID, collecting(got)
            )
            assert result.ok and result.completed == 1
            (ds,) = got.datasets
            assert ds.SOPClassUID == source.SOPClassUID
            assert ds.SOPInstanceUID == source.SOPInstanceUID
    finally:
        for study in studies:
            orthanc.request("DELETE", f"/studies/{study}")


def test_get_with_refusing_callback_counts_failures(pacs_peer: Peer, seeded: Seeded) -> None:
    study = seeded.corpus.studies[0]
    series = study.series[1]
    result = scu().get_series(
        pacs_peer, study.study_uid, series.series_uid, collecting(Received(), 0xA700)
    )
    assert not result.ok
    assert result.failed == series.n_instances


def test_one_association_for_several_requests(pacs_peer: Peer, seeded: Seeded, start_scp) -> None:
    got = Received()
    start_scp(collecting(got))
    study = seeded.corpus.studies[1]
    series = study.series[1]
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study.study_uid
    query.SeriesInstanceUID = series.series_uid
    with scu().connect(pacs_peer) as assoc:
        assoc.echo()
        assert len(assoc.find(query)) == 1
        result = assoc.retrieve("C-MOVE", query, dest_ae=GATEWAY_AE)
        assoc.echo()
    assert result.ok and got.sop_uids == seeded.sop_uids[series.series_uid]


def test_move_to_unknown_destination_fails(pacs_peer: Peer, seeded: Seeded) -> None:
    study = seeded.corpus.studies[0]
    result = scu().move_series(pacs_peer, study.study_uid, study.series[0].series_uid, "NOWHERE")
    assert not result.ok
    assert result.completed == 0


# --- errors ------------------------------------------------------------------------------------


def test_unknown_calling_ae_is_a_clear_error(pacs_peer: Peer, seeded: Seeded) -> None:
    study = seeded.corpus.studies[0]
    with pytest.raises(DimseError) as err:
        Scu("STRANGER", timeout_s=10).find_studies(pacs_peer, accession=study.accession)
    assert isinstance(err.value, AssociationAborted | AssociationRejected)
    assert "STRANGER" in str(err.value) and "ORTHANC" in str(err.value)
    assert_no_phi(str(err.value), seeded)


def test_unreachable_peer() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(PeerUnreachable):
            scu(timeout_s=5).echo(Peer("NOBODY", "127.0.0.1", port))


def test_silent_peer_times_out() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # the kernel completes the handshake; nobody ever answers
        with pytest.raises(DimseTimeout):
            scu(timeout_s=1).echo(Peer("SILENT", "127.0.0.1", s.getsockname()[1]))


def test_callback_exception_is_a_failure_status_and_scp_keeps_serving(
    pacs_peer: Peer, seeded: Seeded, start_scp, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(event):
        ds = event.dataset
        raise RuntimeError(f"cannot spool {ds.PatientName} {ds.SOPInstanceUID}")

    study = seeded.corpus.studies[0]
    series = study.series[1]
    with caplog.at_level(logging.DEBUG):
        scp = start_scp(explode)
        result = scu().move_series(pacs_peer, study.study_uid, series.series_uid, GATEWAY_AE)
    # Orthanc gives up the C-MOVE at the first failed sub-operation, with a failure status.
    assert not result.ok and result.status is not None and result.status >= 0xA000
    assert result.completed == 0
    assert scp.failed >= 1
    assert "RuntimeError" in caplog.text
    assert_no_phi(caplog.text, seeded)
    # Same server, a good callback now: it still serves.
    got = Received()
    scp.set_callback(collecting(got))
    result = scu().move_series(pacs_peer, study.study_uid, series.series_uid, GATEWAY_AE)
    assert result.ok and got.sop_uids == seeded.sop_uids[series.series_uid]


def intruder_push(port: int, path: str | Path) -> None:
    """dcmtk's storescu pushes `path` to the SCP at `port` as an unknown AE (INTRUDER): it must
    be refused, 0x0124 (not authorized)."""
    args = ["-aet", "INTRUDER", "-aec", GATEWAY_AE, "127.0.0.1", str(port)]
    run = subprocess.run(
        [dcmtk("storescu"), "-v", *args, str(path)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    assert "0x124" in run.stdout + run.stderr  # storescu reports the status it got


def test_storescu_push_refused_by_callback(seeded: Seeded, start_scp, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()

    def refuse_unsolicited(event):
        ds, calling_ae = event.dataset, event.calling_ae
        if calling_ae != "ORTHANC":
            return 0x0124  # Refused: not authorized
        ds.save_as(spool / f"{len(list(spool.iterdir()))}.dcm")
        return 0

    scp = start_scp(refuse_unsolicited, register=False)
    intruder_push(scp.port, seeded.corpus.files[0])
    assert list(spool.iterdir()) == []
    assert scp.received == 1 and scp.failed == 1


@pytest.mark.parametrize(
    ("option", "accepted"),
    [
        ("-xi", None),  # implicit VR only proposed
        ("-xd", [DeflatedExplicitVRLittleEndian]),
        ("-xb", [ExplicitVRBigEndian]),
    ],
)
def test_storescu_push_in_other_syntaxes(
    seeded: Seeded, start_scp, option: str, accepted: list[str] | None
) -> None:
    got = Received()
    scp = start_scp(collecting(got), register=False, transfer_syntaxes=accepted)
    path = seeded.corpus.files[1]
    # Small PDUs: the ~9 KB dataset arrives in several fragments to reassemble.
    args = [option, "--max-send-pdu", "4096", "-aet", "MODALITY", "-aec", GATEWAY_AE]
    args += ["127.0.0.1", str(scp.port), str(path)]
    run = subprocess.run([dcmtk("storescu"), *args], env=DCMTK_ENV, capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    (ds,) = got.datasets
    original = dcmread(path)
    expected = accepted[0] if accepted else ImplicitVRLittleEndian
    assert ds.file_meta.TransferSyntaxUID == expected
    assert ds.PatientName == original.PatientName
    assert (ds.pixel_array == original.pixel_array).all()


def test_malformed_dataset_is_refused_and_scp_keeps_serving(
    seeded: Seeded, start_scp, tmp_path: Path
) -> None:
    got = Received()
    scp = start_scp(collecting(got), register=False)
    # A Part 10 file whose dataset is garbage: sent as-is, not re-encoded.
    bad = tmp_path / "bad.dcm"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = dcmread(seeded.corpus.files[0])
    ds.file_meta = meta
    ds.save_as(bad, enforce_file_format=True)
    raw = bad.read_bytes()
    body = raw.index(b"\x08\x00")  # first dataset element after the meta group
    bad.write_bytes(raw[:body] + b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(200))

    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=GATEWAY_AE)
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(bad)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    assert status.Status >= 0xA000  # a failure status, not success or warning
    assert got.datasets == []
    # Still serving.
    scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))


def test_max_associations_rejects_the_extra_one(start_scp) -> None:
    scp = start_scp(collecting(Received()), register=False, max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", scp.port, ae_title=GATEWAY_AE)
    try:
        assert held.is_established
        with pytest.raises(AssociationRejected):
            scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))
    finally:
        held.release()
    deadline = time.monotonic() + 20  # the slot frees just after the A-RELEASE-RP is sent
    while scp.open_associations and time.monotonic() < deadline:
        time.sleep(0.02)
    scu().echo(Peer(GATEWAY_AE, "127.0.0.1", scp.port))


def test_orthanc_killed_mid_move(tmp_path: Path) -> None:
    seeded = seed_corpus(
        tmp_path / "corpus", n_patients=1, studies_per_patient=1, series_per_study=1, slices=40
    )
    study = seeded.corpus.studies[0]
    series = study.series[0]
    stored: list = []
    killed = threading.Event()

    def kill_during_sixth(event):
        ds = event.dataset
        if len(stored) == 5 and not killed.is_set():
            killed.set()
            pacs.kill()
        stored.append(ds)
        return 0

    with StorageSCP(GATEWAY_AE, "127.0.0.1", 0, kill_during_sixth, timeout_s=5) as scp:
        modalities = {"sphere": (GATEWAY_AE, "127.0.0.1", scp.port)}
        with LocalOrthanc(tmp_path / "pacs", modalities=modalities) as pacs:
            pacs.upload(seeded.corpus.files)
            peer = Peer(pacs.aet, "127.0.0.1", pacs.dicom_port)
            with pytest.raises(DimseError) as err:
                scu(timeout_s=5).move_series(peer, study.study_uid, series.series_uid, GATEWAY_AE)
    assert killed.is_set()
    assert isinstance(err.value, AssociationAborted)
    partial = err.value.result
    assert partial is not None and partial.status is None
    # Orthanc reported each sub-operation before it died during the sixth.
    assert 1 <= partial.completed < series.n_instances
    assert "completed" in str(err.value)
    assert_no_phi(str(err.value), seeded)


def test_localpacs_counts_and_dicomweb(orthanc: LocalOrthanc, seeded: Seeded) -> None:
    corpus = seeded.corpus
    assert orthanc.counts() == {
        "patients": len(corpus.studies),
        "studies": len(corpus.studies),
        "series": sum(len(s.series) for s in corpus.studies),
        "instances": corpus.n_instances,
    }
    assert len(orthanc.get("/dicom-web/studies")) == len(corpus.studies)


def test_a_repeated_association_request_gets_the_same_answer_and_another_its_own():
    from gateway.dimse import ul
    from gateway.dimse.service import Service, supported_contexts

    service = Service(supported_contexts(), 0, 5.0, None, store=lambda *a: 0)
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    rq_ct = ul.associate_rq_pdu("PACS", "SPHERE", [(ct, [ExplicitVRLittleEndian])], 0, [])
    rq_mr = ul.associate_rq_pdu("PACS", "SPHERE", [(mr, [ImplicitVRLittleEndian])], 0, [])
    first = service.negotiate(rq_ct)
    first.contexts.clear()  # one association's state never leaks into the next
    again = service.negotiate(rq_ct)
    assert again.abstract == {1: ct} and again.contexts == {1: ExplicitVRLittleEndian}
    assert again.ac_pdu == ul.negotiate(rq_ct, service.supported, 0).ac_pdu
    other = service.negotiate(rq_mr)
    assert other.abstract == {1: mr} and other.contexts == {1: ImplicitVRLittleEndian}
