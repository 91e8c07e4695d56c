"""An instance as it arrived, whatever brought it (a C-STORE, a WADO-RS part): the dataset still
encoded, decoded only when read (as pynetdicom's `event.dataset`). The DIMSE Storage SCP and the
DICOMweb retriever build these; the pull's receiver takes them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from io import BytesIO
from typing import BinaryIO

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from dicom import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

# The largest dataset taken in one instance (memory bound), inflated or not.
MAX_DATASET = 1 << 30


class Undecodable(ValueError):
    """The dataset cannot be parsed (or inflates past MAX_DATASET)."""


class Mismatch(ValueError):
    """The dataset's SOP Class or Instance UID is not the one its request named."""


def _ui(tag: int, value: str) -> RawDataElement:
    raw = value.encode("ascii")
    raw += b"\x00" * (len(raw) % 2)
    return RawDataElement(BaseTag(tag), "UI", len(raw), raw, 0, False, True)


_IMPLEMENTATION = _ui(0x00020012, IMPLEMENTATION_CLASS_UID)


def file_meta(syntax: str, sop_class: str, sop_instance: str) -> FileMetaDataset:
    """File meta information for a received instance."""
    # Raw elements: validated only if read, which saves ~50 us per instance.
    meta = FileMetaDataset()
    meta[0x00020002] = _ui(0x00020002, sop_class)
    meta[0x00020003] = _ui(0x00020003, sop_instance)
    meta[0x00020010] = _ui(0x00020010, syntax)
    meta[0x00020012] = _IMPLEMENTATION
    return meta


def decode_dataset(data: bytes, syntax: UID, sop_class: str, sop_instance: str) -> Dataset:
    """Parse a received dataset (values stay raw until read) and attach its file meta."""
    if syntax == DeflatedExplicitVRLittleEndian:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        data = inflate.decompress(data, MAX_DATASET)
        if inflate.unconsumed_tail:  # a deflate bomb: a few KB that inflate to gigabytes
            raise ValueError(f"deflated dataset inflates past {MAX_DATASET >> 20} MiB")
    ds = read_dataset(BytesIO(data), syntax.is_implicit_VR, syntax.is_little_endian)
    ds.file_meta = file_meta(syntax, sop_class, sop_instance)
    return ds


def part10_header(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    """Preamble, "DICM" and the file meta group, ready to be followed by the dataset bytes."""

    def elem(tag_elem: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":  # explicit VR with a 4-byte length
            return struct.pack("<HH2sHL", 2, tag_elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 2, tag_elem, vr, len(value)) + value

    def uid(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\x00" * (len(raw) % 2)

    version = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    version += b" " * (len(version) % 2)
    body = (
        elem(0x0001, b"OB", b"\x00\x01")
        + elem(0x0002, b"UI", uid(sop_class))
        + elem(0x0003, b"UI", uid(sop_instance))
        + elem(0x0010, b"UI", uid(syntax))
        + elem(0x0012, b"UI", uid(IMPLEMENTATION_CLASS_UID))
        + elem(0x0013, b"SH", version)
    )
    group_length = struct.pack("<HH2sHL", 2, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


@dataclass(frozen=True)
class ReceivedInstance:
    """One received instance, still encoded: spooled as-is or decoded on first read of
    `dataset` (in another process, say), which keeps the sender's round trip short."""

    sop_class: str
    sop_instance: str = field(repr=False)
    transfer_syntax: UID
    data: bytes = field(repr=False)  # the dataset as sent (deflated if the syntax says so)
    calling_ae: str = ""  # who sent it: an AE title, or "dicomweb:<source>"

    @cached_property
    def dataset(self) -> Dataset:
        """The dataset, decoded on first read (values stay raw until read); see `decode`."""
        return self.decode()

    def decode(self) -> Dataset:
        """A fresh decoding, with file meta, checked against the request: `Undecodable` or
        `Mismatch` otherwise."""
        try:
            ds = decode_dataset(self.data, self.transfer_syntax, self.sop_class, self.sop_instance)
            matches = (
                ds.get("SOPInstanceUID") == self.sop_instance
                and ds.get("SOPClassUID") == self.sop_class
            )
        except Exception as exc:  # the text may quote values: only the type goes on
            raise Undecodable(type(exc).__name__) from None
        if not matches:
            raise Mismatch("the dataset's SOP UIDs are not its request's")
        return ds

    def write(self, fp: BinaryIO) -> None:
        """Write as a DICOM Part 10 file, bytes unchanged."""
        fp.write(part10_header(self.sop_class, self.sop_instance, self.transfer_syntax))
        fp.write(self.data)
