"""Burned-in annotation: which images may carry text in their pixels, and blanking regions of them.

Pixel data is never decoded for clean images. An image that has, or may have, burned-in text is
quarantined by default; with the 'blank' policy, configured rectangles are set to black in the
uncompressed pixel data (compressed ones are decoded first, to Explicit VR Little Endian, a lossy
original marked as such) and the image goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from deid.profile import Region
from dicom import colour, decoders, lossy
from dicom.json_model import first

decoders.register()

# SOP classes whose images often carry text: secondary captures, ultrasound, screenshots.
SUSPECT_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture family
    "1.2.840.10008.5.1.4.1.1.6.",  # Ultrasound image and multi-frame
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound multi-frame (retired)
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # Video endoscopic and VL endoscopic
)
SUSPECT_MODALITIES = frozenset({"SC", "OT", "US", "DOC", "XC", "ES", "GM"})
SUSPECT_IMAGE_TYPES = frozenset({"SCREEN SAVE", "DOSE_INFO", "DOSE REPORT", "SCREENSHOT"})
_DOSE_WORDS = ("dose report", "dose info", "patient protocol", "dose summary")
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def burned_in_reason(
    sop_class: str, modality: str, text: Callable[[int], str | None]
) -> str | None:
    """Why the image may have burned-in text (no PHI in the reason), or None when it is clean.

    `text(tag)` reads a string attribute without converting the dataset.
    """
    flag = (text(0x00280301) or "").strip().upper()
    if flag == "YES":
        return "burned-in annotation: BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    image_type = {v.strip().upper() for v in (text(0x00080008) or "").split("\\")}
    if image_type & SUSPECT_IMAGE_TYPES:
        return "burned-in annotation: screen capture or dose image without BurnedInAnnotation"
    if sop_class.startswith(SUSPECT_CLASS_PREFIXES) or modality in SUSPECT_MODALITIES:
        return "burned-in annotation: BurnedInAnnotation missing (secondary capture, ultrasound)"
    desc = " ".join((text(t) or "") for t in (0x0008103E, 0x00181030)).lower()
    if any(w in desc for w in _DOSE_WORDS):
        return "burned-in annotation: dose report image without BurnedInAnnotation"
    return None


def blank_regions(ds: Dataset, regions: tuple[Region, ...]) -> str | None:
    """Blank the regions fitting this image's size in place; returns why not when it cannot."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    rows, cols = int(ds.Rows), int(ds.Columns)
    fitting = [r for r in regions if r.fits(rows, cols)]
    if not fitting:
        return "burned-in annotation: no blanking region for this image size"
    if ts is not None and ts.is_compressed and not _decompress(ds, ts):
        return "burned-in annotation: compressed pixel data could not be decoded"
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR" or photometric.startswith("YBR"):
        # Black is no palette index nor YBR (0, 0, 0): blank in RGB, as storage keeps colour.
        try:
            colour.to_rgb_in_place(ds)
        except Exception:  # a broken table or pixel data; pydicom raises many types
            return "burned-in annotation: colour pixel data could not be converted to RGB"
    bits = int(ds.BitsAllocated)
    if bits not in (8, 16, 32) or "PixelData" not in ds:
        return "burned-in annotation: pixel data layout cannot be blanked"
    spp = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    planar = int(ds.get("PlanarConfiguration", 0) or 0)
    dtype = np.dtype(f"<u{bits // 8}")
    buf = bytearray(ds.PixelData)  # copied only for images that are blanked
    n = frames * rows * cols * spp
    if len(buf) < n * dtype.itemsize:
        return "burned-in annotation: pixel data shorter than its description"
    arr = np.frombuffer(buf, dtype=dtype, count=n)
    if spp > 1 and planar == 1:
        arr = arr.reshape(frames, spp, rows, cols).transpose(0, 2, 3, 1)
    else:
        arr = arr.reshape(frames, rows, cols, spp)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    stored = int(ds.get("BitsStored", bits))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if photometric == "MONOCHROME1":  # black is the largest value
        black = (1 << (stored - 1)) - 1 if signed else (1 << stored) - 1
    elif signed and spp == 1:  # the most negative value, as two's-complement bits
        black = (1 << bits) - (1 << (stored - 1))
    else:
        black = 0
    for r in fitting:
        arr[:, r.y : r.y + r.height, r.x : r.x + r.width, :] = black
    ds.PixelData = bytes(buf)
    ds.BurnedInAnnotation = "NO"
    return None


def _decompress(ds: Dataset, ts: Any) -> bool:
    """Decode compressed pixel data in place (Explicit VR Little Endian, YBR as RGB), marking a
    lossy original (see dicom/lossy.py); False when it cannot be decoded."""
    try:
        data = ds.PixelData
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        size = frames * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
        size *= int(ds.BitsAllocated) // 8
        marks = lossy.patches(ts, data, size, lambda kw, default=None: ds.get(kw, default))
        plugin = decoders.plugin_for(ts, int(ds.get("BitsStored") or 0))
        ds.decompress(decoding_plugin=plugin, generate_instance_uid=False)
    except Exception:  # no decoder, broken data: pydicom raises many types
        return False
    for tag, entry in marks.items():
        ds.add_new(int(tag, 16), entry["vr"], first(marks, tag))
    return True
