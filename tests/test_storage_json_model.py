"""Dataset <-> DICOM JSON model without pixel data (dicom.json_model)."""

from __future__ import annotations

import json
import warnings

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom import json_model

# Files shipped inside the pydicom wheel: CT with many private tags, MR, an SR (nested
# sequences), an ECG (waveform bulk data), an MR with an overlay and an icon image.
SAMPLES = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "reportsi.dcm",
    "waveform_ecg.dcm",
    "examples_overlay.dcm",
]


def _sample(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _reference(ds: Dataset) -> dict:
    """pydicom's own JSON model, minus what ours leaves out on purpose."""
    ref = ds.to_json_dict()
    return {
        k: v
        for k, v in ref.items()
        if k not in ("7FE00010", "7FE00008", "7FE00009")
        and not k.startswith("0002")
        and not k.endswith("0000")
    }


@pytest.mark.parametrize("name", SAMPLES)
def test_matches_pydicom_and_round_trips(name):
    ds = _sample(name)
    ours = json_model.to_json_dict(ds, bulk_threshold=10**9)
    assert json.dumps(ours, sort_keys=True) == json.dumps(_reference(ds), sort_keys=True)

    back = json_model.from_json(json.dumps(ours))
    again = json_model.to_json_dict(back, bulk_threshold=10**9)
    assert again == ours
    assert "PixelData" not in back


def test_bulk_data_and_file_meta_are_left_out_but_nested_pixels_kept():
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.add_new(0x00090010, "LO", "VENDOR")
    ds.add_new(0x00091001, "OB", b"\x01" * 100)  # small binary: kept inline
    ds.add_new(0x00091002, "OB", b"\x02" * 5000)  # large binary: bulk data, left out
    icon = Dataset()
    icon.Rows = icon.Columns = 2
    icon.add_new(0x7FE00010, "OB", b"\x00\x01\x02\x03")
    ds.IconImageSequence = Sequence([icon])
    ds.add_new(0x7FE00010, "OW", b"\x00" * 64)
    out = json_model.to_json_dict(ds, bulk_threshold=1024)
    assert "00091001" in out and "InlineBinary" in out["00091001"]
    assert "00091002" not in out
    assert "7FE00010" not in out
    assert not any(k.startswith("0002") for k in out)
    assert "7FE00010" in out["00880200"]["Value"][0]


def test_empty_and_multi_valued_elements():
    ds = Dataset()
    ds.PatientName = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PixelSpacing = [0.5, 0.25]
    ds.add_new(0x00280034, "IS", None)  # empty
    ds.ReferencedSOPSequence = Sequence()
    out = json_model.to_json_dict(ds)
    assert out["00100010"] == {"vr": "PN"}
    assert out["00080008"] == {"vr": "CS", "Value": ["DERIVED", "SECONDARY"]}
    assert out["00280030"] == {"vr": "DS", "Value": [0.5, 0.25]}
    assert out["00081199"] == {"vr": "SQ", "Value": []}
    assert json_model.to_json_dict(json_model.from_json(out)) == out
