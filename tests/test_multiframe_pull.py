"""Multi-frame and colour instances pulled from a real Orthanc by the real pull (C-MOVE): an
Enhanced CT, US cines (JPEG YBR_FULL_422, RGB), YBR_FULL and palette US images, an XA cine and
a DX, all in the study of a classic CT of the same phantom. Each is stored de-identified with the
pixels a reader of the original gets (colour as RGB), frame times and colour models kept; the
loader gives the Enhanced CT exactly as the classic series (HU, affine) and bone density gives
both the same answer; no planted identifier, nested in functional groups or not, reaches the
store or the catalog."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from zarr.storage import MemoryStore

from core import users
from core.core import Core
from core.settings import Settings, Source
from deid.vault import TRUSTED_THIRD_PARTY
from gateway.api import Gateway
from harness.leaks import scan_database, scan_store
from harness.localpacs import free_port
from harness.multiframe import MultiFrameStudy, write_samples
from harness.phantoms import make_phantom
from harness.serve import sphere_serving
from processing.bone_density import BoneDensity
from processing.loader import load_series
from processing.runner import run_pipeline
from storage.series import SeriesReader, SeriesWriter
from tests.orthanc_fixture import seeded_orthanc
from tests.test_pull import approved, make_gateway

pytestmark = pytest.mark.peers
PHANTOM = dict(shape_yx=(160, 160), pixel_mm=2.0, slice_spacing_mm=2.5, seed=1)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> MultiFrameStudy:
    vol, truth = make_phantom(**PHANTOM)
    out = tmp_path_factory.mktemp("multiframe")
    return write_samples(vol, truth, out, per_frame_rescale=True, reverse_frames=True)


@pytest.fixture(scope="module")
def scp_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, study, scp_port):
    with seeded_orthanc(tmp_path_factory.mktemp("orthanc"), study.files, scp_port) as orthanc:
        yield orthanc


def pull(gw: Gateway, study: MultiFrameStudy) -> dict:
    """Pull the study into `gw`'s project "mf": its stored series by original series UID."""
    approved(gw, "mf", [study.accession])
    report = gw.pull("mf")
    assert report.ok, report
    assert report.instances == len(study.files)
    with Core(gw.settings) as core:
        p = core.project("mf")
        rows = core.catalog.series(p.id, status="complete")
        return {
            core.vault.lookup("mf", r.series_uid, role=TRUSTED_THIRD_PARTY, actor="t"): r
            for r in rows
        }


@pytest.fixture(scope="module")
def pulled(tmp_path_factory, study, pacs, scp_port):
    """The study pulled into a gateway by C-MOVE: (gateway, stored series by original UID)."""
    gw = make_gateway(tmp_path_factory.mktemp("gw"), pacs, scp_port)
    return gw, pull(gw, study)


def _reader(gw, row) -> SeriesReader:
    with Core(gw.settings) as core:
        return SeriesReader(core.store, row.storage_key)


def _check_samples(gw: Gateway, rows: dict, study: MultiFrameStudy) -> None:
    assert len(rows) == 1 + len(study.samples)
    for name, s in study.samples.items():
        reader = _reader(gw, rows[s.series_uid])
        assert reader.n_images == 1 and reader.attrs["n_slices"] == s.n_frames, name
        ds = reader.instance(0)
        assert ds.SOPClassUID == s.sop_class and ds.SOPInstanceUID != s.sop_uid
        got = ds.pixel_array if s.n_frames > 1 else ds.pixel_array[None]
        assert np.array_equal(got, s.pixels), name
        if s.pixels.ndim == 4:  # colour: RGB, the model it came in kept
            assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
            if s.photometric != "RGB":
                assert reader.attrs["source_photometric"] == [s.photometric]
        if s.frame_time_ms:
            assert float(ds.FrameTime) == s.frame_time_ms
            assert reader.attrs["frame_time_ms"] == s.frame_time_ms


def test_every_sample_is_stored_with_the_pixels_a_reader_gets(pulled, study):
    gw, rows = pulled
    _check_samples(gw, rows, study)
    # The functional groups are kept (positions, rescale), what identifies in them is not:
    # the irradiation event's UID is replaced, as UIDs are everywhere (the leak scan below).
    source = dcmread(study.samples["enhanced_ct"].path, stop_before_pixels=True)
    stored = _reader(gw, rows[study.samples["enhanced_ct"].series_uid]).instance(0)
    groups = stored.PerFrameFunctionalGroupsSequence
    assert len(groups) == study.samples["enhanced_ct"].n_frames
    assert all("PlanePositionSequence" in g and "CTPositionSequence" in g for g in groups)
    event = "IrradiationEventIdentificationSequence"
    uid = stored.SharedFunctionalGroupsSequence[0][event][0].IrradiationEventUID
    original = source.SharedFunctionalGroupsSequence[0][event][0].IrradiationEventUID
    assert uid == gw.keys("mf").uid(original)
    jpeg = _reader(gw, rows[study.samples["us_cine_ybr422"].series_uid]).instance(0)
    assert jpeg.LossyImageCompression == "01"  # a lossy original stays marked


@pytest.mark.parametrize("protocol", ["get", "dicomweb"])
def test_c_get_and_dicomweb_pulls_store_the_same(tmp_path, study, pacs, scp_port, protocol):
    if protocol == "get":
        gw = make_gateway(tmp_path, pacs, scp_port, retrieve="get")
    else:
        source = Source(name="web", protocol="dicomweb", url=f"{pacs.url}/dicom-web")
        gw = Gateway(Settings(home=tmp_path, port=scp_port, sources=[source], fsync=False))
    _check_samples(gw, pull(gw, study), study)


def test_enhanced_ct_loads_as_the_classic_series_and_is_measured_alike(pulled, study):
    gw, rows = pulled
    with Core(gw.settings) as core:
        classic = load_series(core.store, rows[study.classic.series_uid].storage_key)
        enhanced_key = rows[study.samples["enhanced_ct"].series_uid].storage_key
        enhanced = load_series(core.store, enhanced_key)
    assert torch_equal(enhanced, classic)
    assert np.allclose(enhanced.affine.numpy(), classic.affine.numpy())
    assert np.allclose(enhanced.meta["spacing"], classic.meta["spacing"])

    report = run_pipeline(gw.settings, "mf", BoneDensity(), workers=1, progress=False)
    with Core(gw.settings) as core:
        results = core.catalog.results(core.project("mf").id, "bone-density")
    by_series = {r.series_uid: r for r in results}
    e = by_series[rows[study.samples["enhanced_ct"].series_uid].series_uid]
    c = by_series[rows[study.classic.series_uid].series_uid]
    assert e.status == c.status == "ok", report.outcomes
    assert e.values == c.values
    # The SEG of the Enhanced CT (frames written head to feet) marks the same places.
    assert _seg_frames(gw, e.seg_series_uid) == _seg_frames(gw, c.seg_series_uid)


def _seg_frames(gw, seg_series_uid: str) -> set[tuple[float, int, int]]:
    """(z of the frame, segment number, voxels marked) of each frame of a stored SEG."""
    with Core(gw.settings) as core:
        p = core.project("mf")
        row = next(r for r in core.catalog.series(p.id) if r.series_uid == seg_series_uid)
        assert row.storage_key is not None
        seg = SeriesReader(core.store, row.storage_key).instance(0)
    masks = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    out = set()
    for item, mask in zip(seg.PerFrameFunctionalGroupsSequence, masks, strict=True):
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out.add((round(z, 2), number, int(mask.sum())))
    return out


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a.as_tensor() == b.as_tensor()).all())


def test_no_identifier_reaches_the_store_or_catalog(pulled, study, tmp_path):
    gw, _rows = pulled
    with Core(gw.settings) as core:
        leaks = scan_store(core.store, study.phi)
    leaks += scan_database(gw.settings.resolved_catalog_url(), study.phi)
    assert leaks == [], leaks[:5]
    # Positive control: the Enhanced CT stored without de-identification is caught, inside
    # its per-frame groups (frame comments, a private block) as in its top-level attributes.
    # So is a colour cine (in its headers: the pixels are decoded, stored as RGB).
    for name in ("enhanced_ct", "us_cine_ybr422"):
        found = raw_leaks(study.samples[name].path, study.phi, tmp_path / name)
        surname = study.classic.patient_name.split("^")[0]
        assert study.classic.patient_id in found and surname in found, name


def raw_leaks(source: Path | Dataset, phi: list[str], work: Path) -> set[str]:
    """The identifiers the leak scan finds in `source` stored as it is (no de-identification)."""
    store = MemoryStore()
    w = SeriesWriter(work, fsync=False)
    w.add(source if isinstance(source, Dataset) else dcmread(source))
    w.commit(store, "raw/series")
    return {leak.needle for leak in scan_store(store, phi)}


# -- served by `sphere serve`, read with dicomweb-client ----------------------------------------


@contextmanager
def investigator_client(gw: Gateway) -> Iterator[DICOMwebClient]:
    """`sphere serve` (a process of its own) on the gateway's home; a DICOMweb client of an
    investigator of project mf."""
    token = users.add(gw.core, "ivy")
    users.grant(gw.core, "mf", "ivy", "investigator")
    with sphere_serving(gw.settings) as base:
        url = f"{base}/projects/mf/dicom-web"
        yield DICOMwebClient(url, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def served(pulled):
    gw, rows = pulled
    with investigator_client(gw) as client:
        yield client, gw.keys("mf")


def _uids(keys, study: MultiFrameStudy, name: str) -> tuple[str, str, str]:
    s = study.samples[name]
    return keys.uid(study.study_uid), keys.uid(s.series_uid), keys.uid(s.sop_uid)


def test_frames_of_multi_frame_and_colour_instances_are_served(served, study):
    client, keys = served
    enhanced = study.samples["enhanced_ct"]
    uids = _uids(keys, study, "enhanced_ct")
    frames = client.retrieve_instance_frames(*uids, frame_numbers=[1, 5, 9])
    assert frames == [enhanced.pixels[n - 1].tobytes() for n in (1, 5, 9)]  # frame-number order
    explicit = (("application/octet-stream", "1.2.840.10008.1.2.1"),)
    (last,) = client.retrieve_instance_frames(
        *uids, frame_numbers=[enhanced.n_frames], media_types=explicit
    )
    assert last == enhanced.pixels[-1].tobytes()
    with pytest.raises(requests.HTTPError) as e:
        client.retrieve_instance_frames(*uids, frame_numbers=[enhanced.n_frames + 1])
    assert e.value.response.status_code == 404
    # Frames are stored decoded: a compressed syntax is not offered (406), never mislabelled.
    jpeg = (("image/jpeg", "1.2.840.10008.1.2.4.50"),)
    with pytest.raises(requests.HTTPError) as e:
        client.retrieve_instance_frames(*uids, frame_numbers=[1], media_types=jpeg)
    assert e.value.response.status_code == 406
    (found,) = client.search_for_instances(*uids[:2])
    assert found["00280008"]["Value"] == [enhanced.n_frames]  # QIDO's NumberOfFrames
    (whole,) = client.retrieve_series(*uids[:2])  # a series of one multi-frame instance
    assert np.array_equal(whole.pixel_array, enhanced.pixels)
    ds = client.retrieve_instance(*uids)
    assert int(ds.NumberOfFrames) == enhanced.n_frames
    assert np.array_equal(ds.pixel_array, enhanced.pixels)
    assert len(ds.PerFrameFunctionalGroupsSequence) == enhanced.n_frames

    cine = study.samples["us_cine_ybr422"]  # stored as RGB: frames are interleaved RGB
    (second,) = client.retrieve_instance_frames(*_uids(keys, study, "us_cine_ybr422"), [2])
    assert second == cine.pixels[1].tobytes()
    metadata = client.retrieve_instance_metadata(*_uids(keys, study, "us_cine_ybr422"))
    assert metadata["00280004"]["Value"] == ["RGB"] and metadata["00280008"]["Value"] == [6]


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_colour_and_cine_are_rendered_frame_by_frame(served, study):
    client, keys = served
    png = ("image/png",)
    rgb = study.samples["us_cine_rgb"]
    uids = _uids(keys, study, "us_cine_rgb")
    first = _png(client.retrieve_instance_rendered(*uids, media_types=png))
    assert np.array_equal(first, rgb.pixels[0])  # a cine renders as its first frame
    third = _png(client.retrieve_instance_frames_rendered(*uids, [3], media_types=png))
    assert np.array_equal(third, rgb.pixels[2])
    palette = study.samples["us_palette"]
    shown = _png(client.retrieve_instance_rendered(*_uids(keys, study, "us_palette"), png))
    assert np.array_equal(shown, palette.pixels[0])
    xa = study.samples["xa_cine"]
    frame = _png(client.retrieve_instance_frames_rendered(*_uids(keys, study, "xa_cine"), [6], png))
    assert frame.shape == xa.pixels.shape[1:] and frame.std() > 0
    series_png = client.retrieve_series_rendered(*_uids(keys, study, "enhanced_ct")[:2], png)
    assert _png(series_png).shape == study.samples["enhanced_ct"].pixels.shape[1:]


def test_an_enhanced_ct_in_two_instances_is_pulled_whole_and_clean(tmp_path):
    """Two instances of one Enhanced CT series (the second like the first but for its frames)
    take the whole de-identification way, not the receiver's shortcut for look-alikes."""
    vol, truth = make_phantom(shape_yx=(64, 64), pixel_mm=5.0, slice_spacing_mm=5.0)
    study = write_samples(vol, truth, tmp_path / "src", enhanced_parts=2, only=("enhanced_ct",))
    files = [study.samples["enhanced_ct"].path, study.samples["enhanced_ct_2"].path]
    port = free_port()
    with seeded_orthanc(tmp_path / "orthanc", files, port) as orthanc:
        gw = make_gateway(tmp_path / "gw", orthanc, port)
        approved(gw, "mf", [study.accession])
        assert gw.pull("mf").ok
    keys = gw.keys("mf")
    with Core(gw.settings) as core:
        (row,) = core.catalog.series(core.project("mf").id, status="complete")
        reader = SeriesReader(core.store, row.storage_key)
        for i in range(2):
            ds = reader.instance(i)
            name = {keys.uid(s.sop_uid): n for n, s in study.samples.items()}[ds.SOPInstanceUID]
            assert np.array_equal(ds.pixel_array, study.samples[name].pixels)
        leaks = scan_store(core.store, study.phi)
    assert leaks == [] and scan_database(gw.settings.resolved_catalog_url(), study.phi) == []
