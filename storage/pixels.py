"""Raw pixel bytes of one single-frame instance, in the form a volume stores them.

Native (uncompressed) little-endian pixels are passed through without a copy; big-endian ones
are byte-swapped, planar colour is interleaved, and compressed ones are decoded with pydicom.
What changes in the header because of that (e.g. YBR decoded to RGB) is returned as patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

_DTYPES = {
    (8, 0): "uint8",
    (8, 1): "int8",
    (16, 0): "uint16",
    (16, 1): "int16",
    (32, 0): "uint32",
    (32, 1): "int32",
}
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # first bytes of encapsulated (compressed) pixel data
# Header patches, as DICOM JSON entries keyed by tag.
_INTERLEAVED = {"00280006": {"vr": "US", "Value": [0]}}  # PlanarConfiguration
_RGB = {"00280004": {"vr": "CS", "Value": ["RGB"]}}  # PhotometricInterpretation


class PixelError(ValueError):
    """Pixels this store cannot hold (no PHI in the message)."""


@dataclass(frozen=True, slots=True)
class PixelLayout:
    """Shape and type of one frame."""

    rows: int
    cols: int
    samples: int
    dtype: str  # numpy name, stored little-endian

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols) if self.samples == 1 else (self.rows, self.cols, self.samples)

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * self.samples * np.dtype(self.dtype).itemsize


def has_pixels(ds: Dataset) -> bool:
    """Whether `ds` is an image (has any pixel data element)."""
    return "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds


def extract(ds: Dataset) -> tuple[PixelLayout, bytes | memoryview, dict[str, Any]]:
    """Layout, little-endian frame bytes and header patches {tag: DICOM JSON entry}."""
    if "PixelData" not in ds:
        raise PixelError("float pixel data is not supported")
    frames = ds.get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise PixelError("invalid NumberOfFrames") from exc
    if n_frames != 1:
        raise PixelError("multi-frame instances are not supported")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        rep = int(ds.get("PixelRepresentation", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise PixelError("image lacks Rows, Columns or BitsAllocated") from exc
    dtype = _DTYPES.get((bits, rep))
    if dtype is None:
        raise PixelError(f"BitsAllocated {bits} is not supported")
    if samples not in (1, 3) or rows <= 0 or cols <= 0:
        raise PixelError("only 1 or 3 samples per pixel and non-empty frames are supported")
    layout = PixelLayout(rows, cols, samples, dtype)
    raw = ds.PixelData
    photometric = str(ds.get("PhotometricInterpretation", ""))
    ts = _transfer_syntax(ds)
    encapsulated = bytes(raw[:4]) == _ITEM_TAG and len(raw) != layout.nbytes
    if encapsulated or (ts is not None and ts.is_compressed and len(raw) < layout.nbytes):
        return _decoded(ds, layout, photometric, ts)
    if samples == 3 and photometric == "YBR_FULL_422":
        return _decoded(ds, layout, photometric, ts)
    if len(raw) < layout.nbytes:
        raise PixelError("pixel data shorter than Rows x Columns x SamplesPerPixel")
    patches: dict[str, Any] = {}
    little = ts.is_little_endian if ts is not None else ds.original_encoding[1] is not False
    planar = samples == 3 and int(ds.get("PlanarConfiguration", 0) or 0) == 1
    if little and not planar:
        return layout, memoryview(raw)[: layout.nbytes], patches
    item = np.dtype(dtype)
    arr = np.frombuffer(
        raw, dtype=item if little else item.newbyteorder(">"), count=layout.nbytes // item.itemsize
    )
    if planar:
        arr = arr.reshape(samples, rows, cols).transpose(1, 2, 0)
        patches.update(_INTERLEAVED)
    return layout, np.ascontiguousarray(arr, dtype=item.newbyteorder("<")).tobytes(), patches


def _decoded(
    ds: Dataset, layout: PixelLayout, photometric: str, ts: Any
) -> tuple[PixelLayout, bytes, dict[str, Any]]:
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder missing or data broken; pydicom raises many types
        name = str(ts) if ts is not None else "unknown"
        raise PixelError(f"cannot decode pixel data (transfer syntax {name})") from exc
    arr = np.ascontiguousarray(arr, dtype=np.dtype(layout.dtype).newbyteorder("<"))
    if arr.shape != layout.shape:
        raise PixelError("decoded pixel data does not match Rows x Columns x SamplesPerPixel")
    patches: dict[str, Any] = {}
    if layout.samples == 3:
        # pydicom hands back interleaved RGB for YBR and planar sources.
        patches.update(_INTERLEAVED)
        if photometric != "RGB":
            patches.update(_RGB)
    return layout, arr.tobytes(), patches


def _transfer_syntax(ds: Dataset) -> Any:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return ts if ts else None
