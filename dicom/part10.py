"""Part 10 files of stored instances: a DICOM JSON header and the frame's pixels, written as
pydicom writes the rebuilt Dataset (Explicit VR Little Endian, native pixels).

    ds = rebuild(header, frame)            # the Dataset (WADO-RS of one instance, the loader)
    body = write(ds)                       # its Part 10 bytes
    enc = Encoder()                        # a series: the same bytes, much cheaper
    sop, chunks = enc.encode(header, frame)

Building a Dataset from JSON and writing it costs ~10 ms of Python per instance whatever its
size: for a series that bounds an export or a series retrieval at a few tens of MB/s. Most
elements of a series' headers are the same in every instance (patient, study, equipment, pixel
description), so `Encoder` encodes each distinct element once, by pydicom's own
`write_data_element` as `write_dataset` calls it, and reuses its bytes; the pixel data element
is written around the frame's bytes, which are handed on, not copied. What makes the two ways
differ (an element left ambiguous, file meta that pydicom refuses) takes the Dataset's way.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
from pydicom.charset import default_encoding
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import validate_file_meta, write_data_element, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

PIXEL_DATA = 0x7FE00010
_CHARSET = "00080005"
_text = json.JSONEncoder(separators=(",", ":")).encode  # an element's value, as a cache key
_META_START = 128 + 4 + 12  # preamble, DICM, the group length element
_MAX_CACHED = 100_000  # distinct elements an encoder keeps (a long series' per-instance ones)

Chunk = bytes | memoryview


def rebuild(header: dict[str, Any], frame: np.ndarray | None) -> Dataset:
    """The instance as a Dataset: the header, the frame as native little-endian pixel data."""
    ds = Dataset.from_json(header)
    if frame is not None:
        ds.add_new(PIXEL_DATA, _pixel_vr(frame), bytes(_pixel_bytes(frame)))
    ds.file_meta = _file_meta(
        ds.SOPClassUID if "SOPClassUID" in ds else None,
        ds.SOPInstanceUID if "SOPInstanceUID" in ds else None,
    )
    return ds


def write(ds: Dataset) -> bytes:
    """A Part 10 file of a rebuilt instance: what WADO-RS serves and an export holds."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Encoder:
    """Part 10 bytes of one series' instances, equal to `write(rebuild(header, frame))`."""

    def __init__(self) -> None:
        self._elements: dict[str, bytes] = {}
        self._charsets: dict[str, Any] = {}
        self._metas: dict[str, tuple[bytes, bytes] | None] = {}  # by SOP Class UID

    def encode(self, header: dict[str, Any], frame: np.ndarray | None) -> tuple[str, list[Chunk]]:
        """(SOP Instance UID, the file's bytes in pieces: join them or write them in order)."""
        sop_class, sop = _single(header.get("00080016")), _single(header.get("00080018"))
        tags = sorted((int(k, 16), k) for k in header)
        if sop_class is None or sop is None or any(t >> 16 in (0, 2) for t, _ in tags):
            return self._slow(header, frame)
        charset = json.dumps(header.get(_CHARSET))
        encodings = self._charsets.get(charset)
        if encodings is None:
            one = Dataset.from_json({_CHARSET: header[_CHARSET]} if _CHARSET in header else {})
            encodings = self._charsets[charset] = one.get("SpecificCharacterSet", default_encoding)
        keys = [
            (tag, key, f"{charset}\0{key}\0{_text(header[key])}")
            for tag, key in tags
            if not (tag & 0xFFFF == 0 and tag >> 16 > 6)  # retired group lengths: not written
            and not (frame is not None and tag == PIXEL_DATA)  # the frame's replaces it
        ]
        if len(self._elements) >= _MAX_CACHED:
            self._elements.clear()
        missing = {key: cached for _, key, cached in keys if cached not in self._elements}
        if any(" or " in cached for cached in missing.values()):
            return self._slow(header, frame)  # an ambiguous VR: pydicom corrects it in context
        if missing:
            ds = Dataset.from_json({key: header[key] for key in missing})
            for key, cached in missing.items():
                self._elements[cached] = _element(ds, key, encodings)
        at = next((i for i, (tag, _, _) in enumerate(keys) if tag > PIXEL_DATA), len(keys))
        if frame is None:
            at = len(keys)
        elements = [self._elements[cached] for _, _, cached in keys]
        head = b"".join([self._meta(sop_class, sop), *elements[:at]])
        if frame is None:
            return sop, [head]
        tail = b"".join(elements[at:])  # what sorts after the pixel data
        return sop, [head, *_pixel_element(frame), *([tail] if tail else [])]

    def _meta(self, sop_class: str, sop: str) -> bytes:
        """The preamble and file meta. Of a series' instances only the SOP Instance UID (and
        so the group length) differ: pydicom writes the first, whose bytes around the UID
        are kept and checked to give the same again; the UID and length are put in between."""
        if sop_class not in self._metas:
            written = _preamble_and_meta(sop_class, sop)
            uid = _ui(0x00020003, sop)
            at = written.find(uid, _META_START)
            parts = (written[_META_START:at], written[at + len(uid) :]) if at > 0 else None
            if parts and _templated(*parts, sop) != written:
                parts = None
            self._metas[sop_class] = parts
            return written
        parts = self._metas[sop_class]
        return _templated(*parts, sop) if parts else _preamble_and_meta(sop_class, sop)

    def _slow(self, header: dict[str, Any], frame: np.ndarray | None) -> tuple[str, list[Chunk]]:
        ds = rebuild(header, frame)
        return str(ds.SOPInstanceUID), [write(ds)]


def _single(entry: Any) -> str | None:
    values = (entry or {}).get("Value") or []
    return values[0] if len(values) == 1 and isinstance(values[0], str) and values[0] else None


def _file_meta(sop_class: Any, sop: Any) -> FileMetaDataset:
    meta = FileMetaDataset()
    if sop_class is not None:
        meta.MediaStorageSOPClassUID = sop_class
    if sop is not None:
        meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _preamble_and_meta(sop_class: str, sop: str) -> bytes:
    """What `dcmwrite(enforce_file_format=True)` writes before the dataset."""
    meta = _file_meta(UID(sop_class), UID(sop))
    validate_file_meta(meta, enforce_standard=True)
    fp = _explicit_le()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    return fp.getvalue()


def _ui(tag: int, uid: str) -> bytes:
    """A UI element in Explicit VR Little Endian (padded with a NUL to even length)."""
    value = uid.encode("ascii") + (b"\x00" if len(uid) % 2 else b"")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(value)) + value


def _templated(before: bytes, after: bytes, sop: str) -> bytes:
    """Preamble, DICM, the group length, then the meta elements with `sop` in its place."""
    body = before + _ui(0x00020003, sop) + after
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + length + body


def _element(ds: Dataset, key: str, encodings: Any) -> bytes:
    """One top-level element's bytes, as `write_dataset` writes it."""
    fp = _explicit_le()
    write_data_element(fp, ds[int(key, 16)], encodings)
    return fp.getvalue()


def _explicit_le() -> DicomBytesIO:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    return fp


def _pixel_vr(frame: np.ndarray) -> str:
    return "OB" if frame.dtype.itemsize == 1 else "OW"


def _pixel_bytes(frame: np.ndarray) -> memoryview:
    """The frame's little-endian bytes: a view where the array already is (no copy)."""
    arr = np.ascontiguousarray(frame, dtype=frame.dtype.newbyteorder("<"))
    return arr.data.cast("B")


def _pixel_element(frame: np.ndarray) -> list[Chunk]:
    """(7FE0,0010) with its explicit length, the frame's bytes, and a pad byte to even length."""
    data = _pixel_bytes(frame)
    pad = len(data) % 2
    head = struct.pack("<HH2sHI", 0x7FE0, 0x0010, _pixel_vr(frame).encode(), 0, len(data) + pad)
    return [head, data, b"\x00"] if pad else [head, data]
