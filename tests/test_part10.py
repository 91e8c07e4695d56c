"""Part 10 files of a stored series without a Dataset per instance (`storage.series.part10_chunks`,
`dicom.part10.Encoder`, what an export and a series retrieval write): byte for byte what pydicom
writes of each rebuilt instance (`part10(reader.instance(i))`, what WADO-RS of one instance
serves), for CT, odd-length 8-bit multi-frame pixels, an instance with no pixels, elements after
the pixel data, two character sets through one encoder; with a control that the comparison
sees one wrong byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    generate_uid,
)

from dicom.json_model import first
from dicom.part10 import Encoder, rebuild, write
from storage.objectstore import open_store
from storage.series import SeriesReader, SeriesWriter, part10, part10_chunks, series_key
from tests.processing_data import body_volume, ct_series


def stored(tmp_path: Path, datasets: list[Dataset]) -> SeriesReader:
    ds0 = datasets[0]
    key = series_key("p", ds0.StudyInstanceUID, ds0.SeriesInstanceUID)
    store = open_store(str(tmp_path / "store"))
    writer = SeriesWriter(tmp_path / "spool" / ds0.SeriesInstanceUID, fsync=False)
    for ds in datasets:
        writer.add(ds)
    writer.commit(store, key)
    return SeriesReader(store, key)


def reference(reader: SeriesReader) -> list[bytes]:
    return [part10(reader.instance(i)) for i in range(len(reader))]


def fast(reader: SeriesReader, positions: list[int] | None = None) -> list[bytes]:
    return [b"".join(chunks) for _, chunks in part10_chunks(reader, positions)]


def ct(charset: str, seed: int) -> list[Dataset]:
    dss = ct_series(body_volume((5, 12, 10), seed=seed), seed=seed)
    for i, ds in enumerate(dss):
        ds.SOPInstanceUID = f"2.25.{seed}{'7' * (20 + i)}"  # odd and even lengths (padded)
        ds.SpecificCharacterSet = charset
        ds.PatientName = "JOSÉ^MARÍA"  # encoded differently in each character set
        ds.add_new(0x7FE10010, "LO", "SPHERE TEST")  # a private block after the pixel data
        ds.add_new(0x7FE11001, "LO", f"after {ds.InstanceNumber}")
    return dss


def multiframe_bytes(n_frames: int = 3, rows: int = 5, cols: int = 5) -> Dataset:
    """Multi-frame 8-bit secondary capture: 75 bytes of pixels, padded to even when written."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MultiFrameGrayscaleByteSecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.InstanceNumber = "PSEUDO9", "OT", 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = n_frames, rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    rng = np.random.default_rng(1)
    ds.PixelData = rng.integers(0, 255, (n_frames, rows, cols), dtype=np.uint8).tobytes()
    return ds


def test_a_ct_series_is_written_as_pydicom_writes_each_instance(tmp_path):
    reader = stored(tmp_path, ct("ISO_IR 100", 1))
    want = reference(reader)
    assert fast(reader) == want
    assert fast(reader, [3, 0]) == [want[3], want[0]]  # by position, as WADO-RS asks
    assert "JOSÉ".encode("latin-1") in want[0] and b"after" in want[0][-40:]


def test_one_encoder_keeps_character_sets_apart(tmp_path):
    latin = stored(tmp_path / "a", ct("ISO_IR 100", 2))
    utf8 = stored(tmp_path / "b", ct("ISO_IR 192", 3))
    enc = Encoder()  # the same element JSON (the name) in both: its bytes differ
    for reader in (latin, utf8):
        got = [b"".join(enc.encode(h, f)[1]) for h, f in reader.iter_raw()]
        assert got == reference(reader)
    assert "JOSÉ".encode() in reference(utf8)[0]


def test_odd_length_multiframe_pixels_and_an_instance_without_pixels(tmp_path):
    reader = stored(tmp_path, [multiframe_bytes()])
    (want,) = reference(reader)
    assert fast(reader) == [want] and len(want) % 2 == 0
    header = reader.header(0)
    sop = first(header, "00080018")
    no_pixels = {k: v for k, v in header.items() if k < "00280000"}
    got, chunks = Encoder().encode(no_pixels, None)
    assert got == sop and b"".join(chunks) == write(rebuild(no_pixels, None))


def test_what_the_encoder_leaves_to_pydicom_is_written_the_same(tmp_path):
    reader = stored(tmp_path, ct("ISO_IR 100", 4))
    header, frame = next(reader.iter_raw())
    ambiguous = {**header, "00280106": {"vr": "US or SS", "Value": [0]}}
    want = write(rebuild(ambiguous, frame))
    assert b"".join(Encoder().encode(ambiguous, frame)[1]) == want
    no_class = {k: v for k, v in header.items() if k != "00080016"}
    with pytest.raises(Exception) as slow:
        write(rebuild(no_class, frame))
    with pytest.raises(type(slow.value)):
        Encoder().encode(no_class, frame)


def test_control_the_comparison_sees_one_wrong_byte(tmp_path):
    reader = stored(tmp_path, ct("ISO_IR 100", 5))
    want = reference(reader)
    enc = Encoder()
    headers = list(reader.iter_raw())
    enc.encode(*headers[0])
    (name,) = [k for k in enc._elements if "\0" + "00100010" + "\0" in k]
    enc._elements[name] = enc._elements[name][:-1] + b"X"  # a stale cached element
    got = b"".join(enc.encode(*headers[1])[1])
    assert got != want[1] and len(got) == len(want[1])
