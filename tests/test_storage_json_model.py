"""Dataset <-> DICOM JSON model without pixel data (dicom.json_model)."""

from __future__ import annotations

import json
import struct
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from dicom import json_model
from tests.samples import pydicom_sample

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


def _reference(ds: Dataset) -> dict:
    """pydicom's own JSON model, minus what ours leaves out on purpose, with an empty value
    among several as null (PS3.18 F.2.5: pydicom writes "")."""
    ref = ds.to_json_dict()
    return {
        k: _f25(v)
        for k, v in ref.items()
        if k not in ("7FE00010", "7FE00008", "7FE00009")
        and not k.startswith("0002")
        and not k.endswith("0000")
    }


def _f25(entry: dict) -> dict:
    values = entry.get("Value") or []
    if entry["vr"] == "SQ":
        return {**entry, "Value": [{k: _f25(v) for k, v in item.items()} for item in values]}
    if not values or len(values) < 2:
        return entry
    empty = ("", {"Alphabetic": ""})
    return {**entry, "Value": [None if v in empty else v for v in values]}


@pytest.mark.parametrize("name", SAMPLES)
def test_matches_pydicom_and_round_trips(name):
    ds = pydicom_sample(name)
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


def test_an_empty_value_among_several_is_null_both_ways():
    """PS3.18 F.2.5: ImageType ORIGINAL\\PRIMARY\\\\AXIAL is ["ORIGINAL","PRIMARY",null,"AXIAL"],
    from a decoded dataset and from raw bytes alike, and null reads back as an empty value."""
    ds = Dataset()
    ds.ImageType = "ORIGINAL\\PRIMARY\\\\AXIAL"
    ds.PatientName = "Doe^John\\"
    ds.add_new(0x00204000, "LT", "")  # a single empty value stays valueless
    want = ["ORIGINAL", "PRIMARY", None, "AXIAL"]
    out = json_model.to_json_dict(ds)
    assert out["00080008"] == {"vr": "CS", "Value": want}
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^John"}, None]}
    assert out["00204000"] == {"vr": "LT"}
    raw = _explicit_le([(0x00080008, "CS", b"ORIGINAL\\PRIMARY\\\\AXIAL")])
    assert json_model.to_json_dict(read_dataset(BytesIO(raw), False, True))["00080008"] == {
        "vr": "CS",
        "Value": want,
    }
    assert '"Value":["ORIGINAL","PRIMARY",null,"AXIAL"]' in json_model.dumps(ds)
    back = json_model.from_json(json_model.dumps(ds))
    assert list(back.ImageType) == ["ORIGINAL", "PRIMARY", "", "AXIAL"]
    assert [str(n) for n in back.PatientName] == ["Doe^John", ""]
    assert json_model.to_json_dict(back) == out


def _explicit_le(elements: list[tuple[int, str, bytes]]) -> bytes:
    """Explicit VR little endian encoding of (tag, VR, value bytes), tags ascending."""
    out = bytearray()
    for tag, vr, value in elements:
        value += b"\x00" if vr in ("UI", "OB", "UN") and len(value) % 2 else b""
        value += b" " if len(value) % 2 else b""
        out += struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
        if vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"):
            out += b"\x00\x00" + struct.pack("<I", len(value))
        else:
            out += struct.pack("<H", len(value))
        out += value
    return bytes(out)


# Values as they arrive on the wire, odd ones included: padding, empty values among several,
# NULs, numbers with spaces or signs, invalid numbers, escapes, non-ASCII text.
RAW_CASES = [
    ("AE", b" STORE SCP "),
    ("AE", b"A\\ B "),
    ("AS", b"045Y"),
    ("CS", b"ORIGINAL\\PRIMARY\\\\AXIAL "),
    ("CS", b"  "),
    ("CS", b"A\\"),
    ("DA", b"20240101"),
    ("DA", b"20240101\\20240102 "),
    ("DT", b"20240101120000.5+0100 "),
    ("TM", b"120000.123456"),
    ("UI", b"1.2.840.10008.5.1.4.1.1.2\x00"),
    ("UI", b"1.2.3\\4.5.6\x00"),
    ("SH", b"SHORT \\ TEXT"),
    ("LO", b"Long string  "),
    ("LO", b"caf\xe9"),
    ("LO", b"\x1b-Ainfo"),
    ("LO", b"\x00\x00"),
    ("UC", b"a\\b\\c "),
    ("ST", b"short\\text with backslash  "),
    ("LT", b"line one\r\nline two \x00"),
    ("UT", b"unlimited text  "),
    ("UR", b"http://example.org/x "),
    ("PN", b"Doe^John  "),
    ("PN", b"Doe^John\\Roe^Jane"),
    ("PN", b"Doe^John\\"),
    ("PN", b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\xa4\xe4\xa4\xde"),
    ("PN", b"Doe^John==Doe"),
    ("PN", b"   "),
    ("IS", b" 12 "),
    ("IS", b"-3\\+4\\ 5"),
    ("IS", b"1\\\\2"),
    ("IS", b"1.0"),
    ("IS", b"    "),
    ("DS", b" 1.5 \\-2e3\\0.000001"),
    ("DS", b"1\\"),
    ("DS", b"  "),
    ("DS", b"1.2.3"),
    ("DS", b"nan"),
    ("US", struct.pack("<3H", 1, 2, 65535)),
    ("US", struct.pack("<H", 512)),
    ("SS", struct.pack("<2h", -1, 7)),
    ("UL", struct.pack("<I", 2**32 - 1)),
    ("SL", struct.pack("<i", -(2**31))),
    ("FL", struct.pack("<2f", 0.1, -3.5)),
    ("FD", struct.pack("<d", 1 / 3)),
    ("UV", struct.pack("<Q", 2**64 - 1)),
    ("SV", struct.pack("<q", -5)),
    ("US", b"\x01\x02\x03"),  # a length that does not fit the VR
    ("AT", struct.pack("<4H", 0x0010, 0x0010, 0x7FE0, 0x0010)),
    ("OB", b"\x00\x01\x02"),
    ("OW", struct.pack("<2H", 1, 2)),
    ("OF", struct.pack("<f", 2.5)),
    ("UN", b"\x01\x02\x03\x04"),
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("charset", [None, b"ISO_IR 100", b"ISO_IR 192", b"\\ISO 2022 IR 87"])
def test_raw_values_encode_as_pydicom_decodes_them(monkeypatch, charset):
    elements = [(0x00080005, "CS", charset)] if charset is not None else []
    # Private tags, one per case: no dictionary VR interferes with the one given.
    elements += [(0x00990010, "LO", b"TEST")]
    elements += [(0x00991000 + i, vr, value) for i, (vr, value) in enumerate(RAW_CASES)]
    data = _explicit_le(elements)

    fast = json_model.to_json_dict(read_dataset(BytesIO(data), False, True))
    monkeypatch.setattr(json_model, "_fast_path_allowed", lambda: False)
    slow = json_model.to_json_dict(read_dataset(BytesIO(data), False, True))
    assert len(slow) == len(elements)
    for key in slow:  # one at a time, for a readable failure (as text: NaN != NaN)
        assert (key, json.dumps(fast.get(key))) == (key, json.dumps(slow[key]))
    assert fast.keys() == slow.keys()


def test_raw_public_tags_in_implicit_and_big_endian_datasets(monkeypatch):
    ds = Dataset()
    ds.PatientName = "Doe^John"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [0.5, 0.25]
    ds.InstanceNumber = 7
    ds.Rows = 512
    ds.add_new(0x00280106, "SS", -5)  # US or SS in the dictionary
    ds.LUTDescriptor = [4096, 0, 12]
    ds.ReferencedSOPSequence = Sequence([Dataset()])
    ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    for little, implicit in ((True, True), (False, False)):
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = little, implicit
        write_dataset(buf, ds)
        fast = json_model.to_json_dict(read_dataset(BytesIO(buf.getvalue()), implicit, little))
        with monkeypatch.context() as m:
            m.setattr(json_model, "_fast_path_allowed", lambda: False)
            slow = json_model.to_json_dict(read_dataset(BytesIO(buf.getvalue()), implicit, little))
        assert fast == slow
        assert fast["00280010"] == {"vr": "US", "Value": [512]}


@pytest.mark.parametrize("name", SAMPLES)
def test_encode_gives_the_model_and_its_text_also_when_cached(name):
    for _ in range(2):  # the second time from the cache
        ds = pydicom_sample(name)
        model, text = json_model.encode(ds, bulk_threshold=4096)
        assert model == json_model.to_json_dict(pydicom_sample(name), bulk_threshold=4096)
        assert json.loads(text) == model


def test_encode_reuses_the_parts_of_unchanged_elements_and_encodes_the_rest():
    ds = pydicom_sample("CT_small.dcm")
    parts: dict = {}
    _, first = json_model.encode(ds, parts=parts)
    assert set(parts) == {int(t) for t in ds._dict if t >> 16 != 2 and t != 0x7FE00010}
    ds.InstanceNumber = 99
    ds.PatientName = "Other^Name"
    del ds.StudyID
    reuse = {t: p for t, p in parts.items() if t not in (0x00200013, 0x00100010, 0x00200010)}
    model, text = json_model.encode(ds, reuse=reuse)
    assert model == json_model.to_json_dict(ds)
    assert json.loads(text) == model
    assert model["00200013"]["Value"] == [99] and "00200010" not in model
    assert text != first
    # Taken as they are, unchecked: the caller vouches for them.
    stale = {0x00080060: ({"vr": "CS", "Value": ["MR"]}, '"00080060":{"vr":"CS","Value":["MR"]}')}
    model, text = json_model.encode(ds, reuse=stale)
    assert model["00080060"]["Value"] == ["MR"] and json.loads(text) == model


def test_first_and_values_of_a_json_element():
    model = {
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY"]},
        "00100010": {"vr": "PN"},  # present, empty
    }
    assert json_model.first(model, "00080060") == "CT"
    assert json_model.values(model, "00080008") == ["ORIGINAL", "PRIMARY"]
    for tag in ("00100010", "00200013"):  # empty, absent
        assert json_model.first(model, tag) is None
        assert json_model.values(model, tag) == []
