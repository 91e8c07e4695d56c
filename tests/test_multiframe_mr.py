"""An Enhanced MR (harness.multiframe, the classic CT's phantom as one multi-frame MR instance)
pulled from a real Orthanc by C-MOVE: stored as one volume with the classic series' geometry,
loaded with the same array and affine, served frame by frame over WADO-RS, and no identifier
planted in its functional groups (frame comments, date-times, a private block, references to
the classic slices) reaches the store or the catalog."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from pydicom import dcmread

from core.core import Core
from deid.engine import Deidentifier
from deid.profile import Profile
from harness.leaks import scan_database, scan_store
from harness.localpacs import free_port
from harness.multiframe import MultiFrameStudy, write_samples
from harness.phantoms import make_phantom
from processing.loader import load_series
from tests.orthanc_fixture import seeded_orthanc
from tests.test_multiframe_pull import (
    _reader,
    _uids,
    investigator_client,
    pull,
    raw_leaks,
    torch_equal,
)
from tests.test_pull import make_gateway

pytestmark = pytest.mark.peers
TINY = dict(shape_yx=(64, 64), pixel_mm=5.0, slice_spacing_mm=5.0)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> MultiFrameStudy:
    vol, truth = make_phantom(**TINY)
    return write_samples(vol, truth, tmp_path_factory.mktemp("mr"), only=("enhanced_mr",))


@pytest.fixture(scope="module")
def pulled(tmp_path_factory, study):
    """The classic CT and the Enhanced MR pulled by C-MOVE: (gateway, series by original UID)."""
    port = free_port()
    with seeded_orthanc(tmp_path_factory.mktemp("orthanc"), study.files, port) as orthanc:
        gw = make_gateway(tmp_path_factory.mktemp("gw"), orthanc, port)
        return gw, pull(gw, study)


def test_enhanced_mr_is_stored_as_one_volume_with_the_classic_geometry(pulled, study):
    gw, rows = pulled
    mr = study.samples["enhanced_mr"]
    reader = _reader(gw, rows[mr.series_uid])
    classic = _reader(gw, rows[study.classic.series_uid])
    assert reader.n_images == 1 and reader.attrs["n_slices"] == mr.n_frames
    assert reader.attrs["modality"] == "MR"
    for attr in ("shape", "spacing", "affine"):
        assert np.allclose(reader.attrs[attr], classic.attrs[attr]), attr
    ds = reader.instance(0)
    assert ds.SOPClassUID == mr.sop_class and ds.SOPInstanceUID != mr.sop_uid
    assert np.array_equal(ds.pixel_array, mr.pixels)
    # MR's groups kept; each frame still references its classic slice, by its new UID
    keys = gw.keys("mf")
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.MRTimingAndRelatedParametersSequence[0].RepetitionTime) == 500.0
    stored_slices = {classic.instance(i).SOPInstanceUID for i in range(classic.n_images)}
    refs = [g.ReferencedImageSequence[0] for g in ds.PerFrameFunctionalGroupsSequence]
    assert {r.ReferencedSOPInstanceUID for r in refs} == stored_slices
    evidence = ds.ReferencedImageEvidenceSequence[0]
    assert evidence.StudyInstanceUID == keys.uid(study.study_uid)


def test_enhanced_mr_loads_as_the_classic_series(pulled, study):
    gw, rows = pulled
    with Core(gw.settings) as core:
        classic = load_series(core.store, rows[study.classic.series_uid].storage_key)
        mr = load_series(core.store, rows[study.samples["enhanced_mr"].series_uid].storage_key)
    assert torch_equal(mr, classic)
    assert np.allclose(mr.affine.numpy(), classic.affine.numpy())
    assert np.allclose(mr.meta["spacing"], classic.meta["spacing"])
    assert mr.meta["modality"] == "MR"


def test_enhanced_mr_is_served_frame_by_frame(pulled, study):
    gw, _rows = pulled
    with investigator_client(gw) as client:
        mr = study.samples["enhanced_mr"]
        uids = _uids(gw.keys("mf"), study, "enhanced_mr")
        last = mr.n_frames
        frames = client.retrieve_instance_frames(*uids, frame_numbers=[1, 7, last])
        assert frames == [mr.pixels[n - 1].tobytes() for n in (1, 7, last)]
        with pytest.raises(requests.HTTPError) as e:
            client.retrieve_instance_frames(*uids, frame_numbers=[last + 1])
        assert e.value.response.status_code == 404
        metadata = client.retrieve_instance_metadata(*uids)
        assert metadata["00080016"]["Value"] == [mr.sop_class]
        assert metadata["00280008"]["Value"] == [last]


def test_no_identifier_of_the_enhanced_mr_reaches_the_store_or_catalog(pulled, study, tmp_path):
    gw, _rows = pulled
    with Core(gw.settings) as core:
        leaks = scan_store(core.store, study.phi)
    assert leaks == [], leaks[:5]
    assert scan_database(gw.settings.resolved_catalog_url(), study.phi) == []
    # Positive controls: stored as it came, and de-identified but for its per-frame groups put
    # back, the scan finds what was planted in those groups (frame comments, a private block,
    # the classic slices referenced).
    path = study.samples["enhanced_mr"].path
    surname = study.classic.patient_name.split("^")[0]
    assert {study.classic.patient_id, surname} <= raw_leaks(path, study.phi, tmp_path / "raw")
    original = dcmread(path)
    ds = Deidentifier(Profile(), gw.keys("mf")).apply(dcmread(path))
    ds.PerFrameFunctionalGroupsSequence = original.PerFrameFunctionalGroupsSequence
    found = raw_leaks(ds, study.phi, tmp_path / "groups")
    slice_uid = original.PerFrameFunctionalGroupsSequence[0].ReferencedImageSequence[0]
    assert {study.classic.patient_id, surname, slice_uid.ReferencedSOPInstanceUID} <= found
