"""Malformed, ambiguous or maybe burned-in input is quarantined, with a reason holding no PHI."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from deid.engine import Deidentifier, Quarantined
from deid.keys import ProjectKeys
from deid.profile import Option, Profile, Region
from tests.adversarial import PHI, make_study, secondary_capture

KEYS = ProjectKeys(b"quarantine-test-secret-0123456789ab")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("adv"), n=2)


def quarantined(ds: Dataset, profile: Profile | None = None) -> str:
    with pytest.raises(Quarantined) as e:
        Deidentifier(profile or Profile(), KEYS).apply(ds)
    reason = e.value.reason
    assert not [p for p in PHI if p.lower() in reason.lower()], reason
    return reason


def patched(path: Path, old: bytes, new: bytes) -> Dataset:
    data = path.read_bytes()
    assert data.count(old) >= 1
    return pydicom.dcmread(io.BytesIO(data.replace(old, new, 1)))


def test_burned_in_annotation_is_quarantined_by_default(tmp_path):
    assert "BurnedInAnnotation is YES" in quarantined(
        pydicom.dcmread(secondary_capture(tmp_path / "yes.dcm", burned_in="YES"))
    )
    assert "missing" in quarantined(
        pydicom.dcmread(secondary_capture(tmp_path / "none.dcm", burned_in=None))
    )
    clean = pydicom.dcmread(secondary_capture(tmp_path / "no.dcm", burned_in="NO"))
    pixels = clean.PixelData
    Deidentifier(Profile(), KEYS).apply(clean)
    assert clean.PixelData == pixels


def test_blank_policy_blanks_configured_regions(tmp_path):
    profile = Profile(burned_in="blank", regions=(Region(0, 0, 32, 6, rows=32, columns=32),))
    ds = pydicom.dcmread(secondary_capture(tmp_path / "sc.dcm", burned_in=None))
    Deidentifier(profile, KEYS).apply(ds)
    img = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(32, 32)
    assert (img[:6] == 0).all() and (img[6:] == 200).all()
    assert ds.BurnedInAnnotation == "NO"
    assert "113101" in {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
    other_size = pydicom.dcmread(secondary_capture(tmp_path / "big.dcm", burned_in="YES", size=64))
    assert "no blanking region" in quarantined(other_size, profile)


@pytest.mark.parametrize("encoder", [("dcmcjpeg", "+eb", "+sr"), ("dcmcrle",)])
def test_compressed_images_are_decoded_to_be_blanked(tmp_path, encoder):
    """A JPEG (lossy) or RLE secondary capture: decoded to Explicit VR LE, blanked, and a lossy
    original marked; one that cannot be decoded is quarantined."""
    profile = Profile(burned_in="blank", regions=(Region(0, 0, 32, 6, rows=32, columns=32),))
    src = secondary_capture(tmp_path / "sc.dcm", burned_in=None)
    plain = pydicom.dcmread(src)
    want = np.tile(np.arange(100, 132, dtype=np.uint8), (32, 1))
    plain.PixelData = want.tobytes()
    plain.save_as(src)
    packed = tmp_path / "packed.dcm"
    subprocess.run([*encoder, str(src), str(packed)], check=True, capture_output=True)
    ds = pydicom.dcmread(packed)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    Deidentifier(profile, KEYS).apply(ds)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    img = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(32, 32)
    lossy = encoder[0] == "dcmcjpeg"
    assert (img[:6] == 0).all()
    assert np.abs(img[6:].astype(int) - want[6:]).max() <= (4 if lossy else 0)
    assert ds.BurnedInAnnotation == "NO"
    assert ds.get("LossyImageCompression") == ("01" if lossy else None)
    broken = pydicom.dcmread(packed)
    broken.PixelData = encapsulate([b"\xff\xd8 not an image \xff\xd9"])
    assert "could not be decoded" in quarantined(broken, profile)


def test_invalid_vr_is_quarantined(study):
    ds = patched(study.ct[0], b"\x10\x00\x10\x00PN", b"\x10\x00\x10\x00ZZ")
    assert quarantined(ds) == "invalid VR at (0010,0010)"


def test_vr_that_contradicts_the_dictionary_is_quarantined(study):
    ds = patched(study.ct[0], b"\x08\x00\x20\x00DA", b"\x08\x00\x20\x00LO")
    assert "does not match" in quarantined(ds)


def test_ui_value_that_is_not_a_uid_is_quarantined(study):
    ds = pydicom.dcmread(study.ct[0])
    ds.SOPInstanceUID = "1.2.826.0.1.WHITE"
    assert "not a UID at (0008,0018)" in quarantined(ds)
    nested = pydicom.dcmread(study.pr)
    nested.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID = "x1"
    assert "not a UID" in quarantined(nested)


def test_two_patient_ids_in_one_study_and_the_run_goes_on(study):
    d = Deidentifier(Profile(), KEYS)
    d.apply(pydicom.dcmread(study.ct[0]))
    intruder = pydicom.dcmread(study.ct[1])
    intruder.PatientID = "SOMEONE-ELSE"
    with pytest.raises(Quarantined, match="two Patient IDs"):
        d.apply(intruder)
    d.apply(pydicom.dcmread(study.ct[2]))  # the study's own patient goes on


def test_dicomdir_deflated_missing_id_and_documents_are_quarantined(study, tmp_path):
    ds = pydicom.dcmread(study.ct[0])
    ds.DirectoryRecordSequence = Sequence([Dataset()])
    assert "DICOMDIR" in quarantined(ds)

    deflated = pydicom.dcmread(study.ct[0])
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    deflated.save_as(path, enforce_file_format=True)
    assert "deflated" in quarantined(pydicom.dcmread(path))

    anonymous = pydicom.dcmread(study.ct[0])
    del anonymous.PatientID
    assert "no Patient ID" in quarantined(anonymous)

    pdf = pydicom.dcmread(study.sr)
    pdf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    assert "encapsulated document" in quarantined(pdf)


def test_quarantine_reasons_of_a_burned_in_ultrasound_name_no_one(tmp_path):
    ds = pydicom.dcmread(secondary_capture(tmp_path / "us.dcm", burned_in=None))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    ds.Modality = "US"
    reason = quarantined(ds, Profile(options=frozenset({Option.RETAIN_UIDS})))
    assert reason.startswith("burned-in annotation")


def test_date_that_cannot_be_shifted_is_quarantined(study):
    ds = patched(
        study.ct[0], b"\x08\x00\x20\x00DA\x08\x0020230405", b"\x08\x00\x20\x00DA\x08\x0020231345"
    )
    assert quarantined(ds) == "invalid DA value at (0008,0020)"
    dt = pydicom.dcmread(study.ct[0])
    dt.AcquisitionDateTime = "2023-04-05T10:15"
    assert quarantined(dt) == "invalid DT value at (0008,002A)"
