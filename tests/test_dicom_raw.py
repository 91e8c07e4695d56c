"""Element boundaries read from encoded bytes agree with pydicom's parser."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from dicom.raw import element_spans, value_span
from harness.synthetic import generate
from tests.samples import pydicom_sample


def encode(ds: pydicom.Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


@pytest.mark.parametrize("implicit", [False, True])
def test_spans_match_pydicom_element_for_element(tmp_path, implicit):
    corpus = generate(tmp_path, n_patients=1, series_per_study=1, slices=1, size=16)
    samples = [pydicom.dcmread(corpus.files[0])]
    samples += [pydicom_sample(n) for n in ("CT_small.dcm", "rtplan.dcm")]
    for ds in samples:
        data = encode(ds, implicit)
        spans = element_spans(data, implicit)
        assert spans is not None
        assert sorted(spans) == sorted(read_dataset(BytesIO(data), implicit, True).keys())
        assert sum(e - s for s, e in spans.values()) == len(data)
        raw = read_dataset(BytesIO(data), implicit, True)._dict
        for tag, (s, e) in spans.items():  # each span is exactly that element
            assert list(read_dataset(BytesIO(data[s:e]), implicit, True).keys()) == [tag]
            value = value_span(data, (s, e), implicit)
            if value is None:  # undefined length: items follow, not a plain value
                assert raw[tag].length == 0xFFFFFFFF
            else:  # the value's bytes, as pydicom reads them
                assert data[value[0] : value[1]] == (raw[tag].value or b"")


def test_truncated_or_garbled_bytes_give_none(tmp_path):
    corpus = generate(tmp_path, n_patients=1, series_per_study=1, slices=1, size=16)
    data = encode(pydicom.dcmread(corpus.files[0]), False)
    assert element_spans(data[:-7], False) is None
    assert element_spans(data[:4] + b"\x00\x01" + data[6:], False) is None  # VR not letters
