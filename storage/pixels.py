"""Raw pixel bytes of one instance's frames, in the form a volume stores them.

Native (uncompressed) little-endian pixels are passed through without a copy; big-endian ones
are byte-swapped, planar colour is interleaved, and compressed ones are decoded with pydicom
and its plugins (every syntax the Storage SCP accepts; see README). Colour is stored as RGB:
YBR_FULL and YBR_FULL_422 are converted, a palette is applied (8 bits a sample). What changes
in the header because of that (e.g. YBR decoded to RGB, a lossy original marked) is returned
as patches; an entry patched to None is removed (the palette's tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from dicom import colour, decoders, lossy
from dicom.json_model import first

decoders.register()
_DTYPES = {
    (8, 0): "uint8",
    (8, 1): "int8",
    (16, 0): "uint16",
    (16, 1): "int16",
    (32, 0): "uint32",
    (32, 1): "int32",
}
_PIXEL_DATA = BaseTag(0x7FE00010)
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
    frames: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, self.cols) if self.samples == 1 else (self.rows, self.cols, self.samples)

    @property
    def nbytes(self) -> int:
        """Bytes of one frame."""
        return self.rows * self.cols * self.samples * np.dtype(self.dtype).itemsize

    @property
    def total(self) -> int:
        """Bytes of all frames."""
        return self.nbytes * self.frames


def has_pixels(ds: Dataset) -> bool:
    """Whether `ds` is an image (has any pixel data element)."""
    return "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds


def extract(
    ds: Dataset, header: dict[str, Any] | None = None
) -> tuple[PixelLayout, bytes | memoryview, dict[str, Any]]:
    """Layout, little-endian bytes of the frames one after the other and header patches
    {tag: DICOM JSON entry}.

    `header`, the DICOM JSON model of `ds` when the caller has it, saves decoding the image
    attributes a second time.
    """
    if 0x7FE00010 not in ds._dict:
        raise PixelError("float pixel data is not supported")
    get = _json_getter(header) if header is not None else ds.get
    frames = get("NumberOfFrames")
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise PixelError("invalid NumberOfFrames") from exc
    if n_frames < 1:
        raise PixelError("invalid NumberOfFrames")
    try:
        rows, cols = int(get("Rows")), int(get("Columns"))
        bits = int(get("BitsAllocated"))
        rep = int(get("PixelRepresentation", 0) or 0)
        samples = int(get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise PixelError("image lacks Rows, Columns or BitsAllocated") from exc
    dtype = _DTYPES.get((bits, rep))
    if dtype is None:
        raise PixelError(f"BitsAllocated {bits} is not supported")
    if samples not in (1, 3) or rows <= 0 or cols <= 0:
        raise PixelError("only 1 or 3 samples per pixel and non-empty frames are supported")
    photometric = str(get("PhotometricInterpretation", "") or "")
    if photometric == "PALETTE COLOR":
        return _palette(ds, PixelLayout(rows, cols, samples, dtype, n_frames))
    layout = PixelLayout(rows, cols, samples, dtype, n_frames)
    elem = ds._dict[_PIXEL_DATA]
    # Read the bytes of a raw element directly: pydicom's conversion would only copy them.
    # (A receiver may hand over a view of the bytes it received.)
    raw = None
    if type(elem) is RawDataElement and type(elem.value) in (bytes, memoryview):
        raw = elem.value
    if raw is None:
        raw = ds.PixelData
    ts = _transfer_syntax(ds)
    encapsulated = bytes(raw[:4]) == _ITEM_TAG and len(raw) != layout.total
    if encapsulated or (ts is not None and ts.is_compressed and len(raw) < layout.total):
        layout, data, patches = _decoded(ds, layout, photometric, ts)
        patches.update(lossy.patches(ts, raw, layout.total, get))
        return layout, data, patches
    if samples == 3 and photometric in ("YBR_FULL_422", "YBR_FULL"):
        return _decoded(ds, layout, photometric, ts)
    if len(raw) < layout.total:
        raise PixelError("pixel data shorter than Rows x Columns x SamplesPerPixel x frames")
    patches = {}
    little = ts.is_little_endian if ts is not None else ds.original_encoding[1] is not False
    planar = samples == 3 and int(get("PlanarConfiguration", 0) or 0) == 1
    if little and not planar:
        return layout, memoryview(raw)[: layout.total], patches
    item = np.dtype(dtype)
    arr = np.frombuffer(
        raw, dtype=item if little else item.newbyteorder(">"), count=layout.total // item.itemsize
    )
    if planar:  # colour-by-plane within each frame
        arr = arr.reshape(n_frames, samples, rows, cols).transpose(0, 2, 3, 1)
        patches.update(_INTERLEAVED)
    return layout, np.ascontiguousarray(arr, dtype=item.newbyteorder("<")).tobytes(), patches


def _decoded(
    ds: Dataset, layout: PixelLayout, photometric: str, ts: Any
) -> tuple[PixelLayout, bytes, dict[str, Any]]:
    try:
        plugin = decoders.plugin_for(ts, int(ds.get("BitsStored") or 0))
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        arr = ds.pixel_array
    except Exception as exc:  # decoder missing or data broken; pydicom raises many types
        name = str(ts) if ts is not None else "unknown"
        raise PixelError(f"cannot decode pixel data (transfer syntax {name})") from exc
    arr = np.ascontiguousarray(arr, dtype=np.dtype(layout.dtype).newbyteorder("<"))
    if arr.shape != ((layout.frames, *layout.shape) if layout.frames > 1 else layout.shape):
        raise PixelError("decoded pixel data does not match Rows x Columns x SamplesPerPixel")
    patches: dict[str, Any] = {}
    if layout.samples == 3:
        # pydicom hands back interleaved RGB for YBR and planar sources.
        patches.update(_INTERLEAVED)
        if photometric != "RGB":
            patches.update(_RGB)
    return layout, arr.tobytes(), patches


def _palette(ds: Dataset, layout: PixelLayout) -> tuple[PixelLayout, bytes, dict[str, Any]]:
    """A palette-colour image as 8-bit RGB (16-bit table entries keep their high byte)."""
    ts = _transfer_syntax(ds)
    try:
        plugin = decoders.plugin_for(ts, int(ds.get("BitsStored") or 0)) if ts else None
        if plugin:
            ds.pixel_array_options(decoding_plugin=plugin)
        rgb = colour.palette_rgb(ds)
    except Exception as exc:  # a missing or broken table, undecodable data
        raise PixelError("cannot apply the palette colour lookup table") from exc
    out = PixelLayout(layout.rows, layout.cols, 3, "uint8", layout.frames)
    if rgb.size != out.total:
        raise PixelError("palette colour pixel data does not match its description")
    patches: dict[str, Any] = {**colour.RGB_HEADER}
    patches.update({tag: None for tag in colour.PALETTE_TAGS})
    if ts is not None and ts.is_compressed:
        patches.update(lossy.patches(ts, ds.PixelData, layout.total, ds.get))
    return out, rgb.tobytes(), patches


def _json_getter(header: dict[str, Any]) -> Any:
    """`Dataset.get` over a DICOM JSON model, for the single-valued image attributes."""

    def get(keyword: str, default: Any = None) -> Any:
        tag = _TAGS[keyword]
        if header.get(tag) is None:
            return default
        value = first(header, tag)
        return "" if value is None else value  # present but empty, as pydicom's ''

    return get


_TAGS = {
    "NumberOfFrames": "00280008",
    "Rows": "00280010",
    "Columns": "00280011",
    "BitsAllocated": "00280100",
    "PixelRepresentation": "00280103",
    "SamplesPerPixel": "00280002",
    "PhotometricInterpretation": "00280004",
    "PlanarConfiguration": "00280006",
    "LossyImageCompression": lossy.LOSSY,
    "LossyImageCompressionMethod": lossy.METHOD,
}


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    elem = meta._dict.get(0x00020010) if meta is not None else None
    if type(elem) is RawDataElement and type(elem.value) is bytes:
        # Received file meta stays raw; pydicom's own conversion costs ~20 us per instance.
        text = elem.value.decode("ascii", "replace").rstrip("\x00 ")
        return UID(text) if text else None
    ts = elem.value if elem is not None else None
    return UID(ts) if ts else None
