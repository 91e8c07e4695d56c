"""Multi-frame and colour samples (harness.multiframe): what they hold, read back with pydicom;
burned-in text in colour and cine images quarantined, or blanked in every frame and stored."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import apply_color_lut
from zarr.storage import MemoryStore

from deid.engine import Deidentifier, Quarantined
from deid.keys import ProjectKeys
from deid.profile import Profile, Region
from harness.multiframe import MultiFrameStudy, write_samples
from harness.phantoms import make_phantom
from processing.loader import load_series
from processing.outputs import segmentable
from storage.series import SeriesReader, SeriesWriter

DCIODVFY = shutil.which("dciodvfy") or str(Path(sys.executable).parent / "dciodvfy")
TINY = dict(shape_yx=(64, 64), pixel_mm=5.0, slice_spacing_mm=5.0)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> MultiFrameStudy:
    vol, truth = make_phantom(**TINY)
    return write_samples(vol, truth, tmp_path_factory.mktemp("mf"), per_frame_rescale=True)


def _hu(ds) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_samples_decode_to_the_pixels_they_promise(samples):
    for name, s in samples.samples.items():
        ds = dcmread(s.path)
        arr = ds.pixel_array
        arr = arr if int(ds.get("NumberOfFrames", 1) or 1) > 1 else arr[None]
        if s.photometric == "PALETTE COLOR":
            arr = (apply_color_lut(arr, ds) >> 8).astype(np.uint8)
        assert np.array_equal(arr, s.pixels), name
        assert ds.SOPClassUID == s.sop_class and ds.StudyInstanceUID == samples.study_uid
    assert samples.samples["us_cine_ybr422"].transfer_syntax == "1.2.840.10008.1.2.4.50"
    assert samples.samples["us_cine_rgb"].frame_time_ms == pytest.approx(33.3)


def test_enhanced_ct_holds_the_classic_series_voxels_and_geometry(samples):
    enhanced = dcmread(samples.samples["enhanced_ct"].path)
    classic = [dcmread(f) for f in samples.classic.files]
    assert int(enhanced.NumberOfFrames) == len(classic)
    shared = enhanced.SharedFunctionalGroupsSequence[0]
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in iop] == [float(v) for v in classic[0].ImageOrientationPatient]
    frames = enhanced.pixel_array
    for k, (item, ds) in enumerate(
        zip(enhanced.PerFrameFunctionalGroupsSequence, classic, strict=True)
    ):
        pos = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in pos] == [float(v) for v in ds.ImagePositionPatient]
        rescale = item.PixelValueTransformationSequence[0]
        hu = frames[k] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
        assert np.array_equal(hu, _hu(ds))
    intercepts = {
        float(i.PixelValueTransformationSequence[0].RescaleIntercept)
        for i in enhanced.PerFrameFunctionalGroupsSequence
    }
    assert len(intercepts) == 2  # rescale differs frame to frame


def test_identifiers_are_planted_inside_the_functional_groups(samples):
    raw = samples.samples["enhanced_ct"].path.read_bytes()
    item = raw[raw.index(b"\x00\x52\x30\x92") :]  # PerFrameFunctionalGroupsSequence onwards
    surname = samples.classic.patient_name.split("^")[0]
    assert surname.encode() in item and samples.classic.patient_id.encode() in item
    assert samples.classic.study_date.encode() in item
    assert set(samples.phi) >= {s.sop_uid for s in samples.samples.values()}


CINE = ("us_cine_ybr422", "us_cine_rgb", "sc_ybr_full", "us_palette", "xa_cine")


@pytest.fixture(scope="module")
def burned(tmp_path_factory) -> MultiFrameStudy:
    vol, truth = make_phantom(**TINY)
    out = tmp_path_factory.mktemp("burned")
    return write_samples(vol, truth, out, burned_in_text=True, only=CINE)


def test_burned_in_text_in_colour_and_cine_is_quarantined_or_blanked(burned, tmp_path):
    keys = ProjectKeys(b"multiframe-test-secret-0123456789ab")
    blank = Profile(burned_in="blank", regions=(Region(0, 0, 64, 12, rows=48, columns=64),))
    for name in CINE:
        s = burned.samples[name]
        text = s.pixels[:, :12]
        assert (text >= 200).any(), name  # the (anti-aliased) text is there
        with pytest.raises(Quarantined, match="BurnedInAnnotation is YES"):
            Deidentifier(Profile(), keys).apply(dcmread(s.path))
        ds = Deidentifier(blank, keys).apply(dcmread(s.path))
        assert ds.BurnedInAnnotation == "NO"
        store = MemoryStore()
        writer = SeriesWriter(tmp_path / name, fsync=False)
        writer.add(ds)
        writer.commit(store, f"p/{name}")
        stored = np.asarray(SeriesReader(store, f"p/{name}").volume[:])
        assert stored.shape[0] == s.n_frames
        top = stored[:, :12].reshape(s.n_frames, -1, *stored.shape[3:])
        # every frame's band is black (in RGB: a palette's entry 0 or YBR 0 are not), the
        # rest as it was
        assert (top == 0).all(), name
        assert np.array_equal(stored[:, 12:], s.pixels[:, 12:]), name


def _iod_errors(path: Path) -> set[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "Assertion" not in text, text[-500:]
    return {re.sub(r"= <[^>]*>", "= <>", ln.strip()) for ln in text.splitlines() if "Error" in ln}


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dicom3tools not installed")
def test_samples_are_valid_iods_and_stay_valid_stored_and_rebuilt(samples, tmp_path):
    """dciodvfy finds no error in a sample, nor in the instance the store rebuilds (what WADO-RS
    serves) after de-identification; colour comes back RGB, frames in their order."""
    for name, s in samples.samples.items():
        _valid_stored_and_rebuilt(name, s.path, tmp_path)


def _valid_stored_and_rebuilt(name: str, path: Path, tmp_path: Path) -> None:
    assert _iod_errors(path) == set(), name
    ds = Deidentifier(Profile(), ProjectKeys(b"multiframe-test-secret-0123456789ab")).apply(
        dcmread(path)
    )
    store = MemoryStore()
    writer = SeriesWriter(tmp_path / name, fsync=False)
    writer.add(ds)
    writer.commit(store, f"p/{name}")
    rebuilt = tmp_path / f"{name}.dcm"
    SeriesReader(store, f"p/{name}").instance(0).save_as(rebuilt, enforce_file_format=True)
    assert _iod_errors(rebuilt) == set(), name


@pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dicom3tools not installed")
def test_enhanced_mr_holds_the_classic_series_and_is_a_valid_iod(tmp_path):
    """The Enhanced MR (written on request) has the classic series' positions, orientation,
    spacing and values, each frame referencing its slice; dciodvfy finds no error in it, nor
    in what the store rebuilds after de-identification."""
    vol, truth = make_phantom(**TINY)
    study = write_samples(vol, truth, tmp_path / "src", only=("enhanced_mr",))
    assert set(study.samples) == {"enhanced_mr"}
    mr = dcmread(study.samples["enhanced_mr"].path)
    classic = [dcmread(f) for f in study.classic.files]
    assert mr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1" and mr.Modality == "MR"
    shared = mr.SharedFunctionalGroupsSequence[0]
    iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in iop] == [float(v) for v in classic[0].ImageOrientationPatient]
    spacing = shared.PixelMeasuresSequence[0].PixelSpacing
    assert [float(v) for v in spacing] == [float(v) for v in classic[0].PixelSpacing]
    rescale = shared.PixelValueTransformationSequence[0]
    for k, (item, ds) in enumerate(zip(mr.PerFrameFunctionalGroupsSequence, classic, strict=True)):
        pos = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in pos] == [float(v) for v in ds.ImagePositionPatient]
        assert item.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
        values = mr.pixel_array[k] * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
        assert np.array_equal(values, _hu(ds))
    _valid_stored_and_rebuilt("enhanced_mr", study.samples["enhanced_mr"].path, tmp_path)


def test_an_enhanced_ct_split_in_instances_loads_as_the_classic_series(tmp_path):
    """Two Enhanced CT instances of one series, frames dealt out in turn, rescale in the shared
    groups: one volume, in the classic series' order and HU; each instance rebuilt with its
    own frames; no SEG over them."""
    vol, truth = make_phantom(**TINY)
    study = write_samples(
        vol,
        truth,
        tmp_path / "src",
        enhanced_parts=2,
        only=("enhanced_ct",),
    )
    store = MemoryStore()
    for key, files in {
        "classic": study.classic.files,
        "split": [study.samples["enhanced_ct"].path, study.samples["enhanced_ct_2"].path],
    }.items():
        writer = SeriesWriter(tmp_path / key, fsync=False)
        for f in files[::-1]:
            writer.add(dcmread(f))
        writer.commit(store, f"p/{key}")
    classic, split = load_series(store, "p/classic"), load_series(store, "p/split")
    assert bool((classic.as_tensor() == split.as_tensor()).all())
    assert np.allclose(classic.affine.numpy(), split.affine.numpy())
    reader = SeriesReader(store, "p/split")
    assert reader.n_images == 2 and reader.frame_slices(1)[:2] == [1, 3]
    for i, name in enumerate(("enhanced_ct", "enhanced_ct_2")):
        ds = reader.instance(i)
        assert ds.SOPInstanceUID == study.samples[name].sop_uid
        assert np.array_equal(ds.pixel_array, study.samples[name].pixels)
    assert not segmentable(reader) and segmentable(SeriesReader(store, "p/classic"))
