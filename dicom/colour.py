"""Colour models turned into RGB the one way both de-identification and storage use.

A palette is applied (8 bits a sample: 16-bit table entries keep their high byte), YBR models
(YBR_FULL, YBR_FULL_422, subsampled or not) are converted by pydicom's decoders. What the header
must then say is `RGB_HEADER`; the palette's own attributes (`PALETTE_TAGS`) no longer apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from dicom.json_model import first

# The palette's descriptors, tables (normal and segmented) and UID, as DICOM JSON tags.
PALETTE_TAGS = (
    "00281101",
    "00281102",
    "00281103",
    "00281199",
    "00281201",
    "00281202",
    "00281203",
    "00281221",
    "00281222",
    "00281223",
)
# 8-bit interleaved RGB, as DICOM JSON entries.
RGB_HEADER: dict[str, dict[str, Any]] = {
    "00280002": {"vr": "US", "Value": [3]},  # SamplesPerPixel
    "00280004": {"vr": "CS", "Value": ["RGB"]},  # PhotometricInterpretation
    "00280006": {"vr": "US", "Value": [0]},  # PlanarConfiguration
    "00280100": {"vr": "US", "Value": [8]},  # BitsAllocated
    "00280101": {"vr": "US", "Value": [8]},  # BitsStored
    "00280102": {"vr": "US", "Value": [7]},  # HighBit
    "00280103": {"vr": "US", "Value": [0]},  # PixelRepresentation
}


def palette_rgb(ds: Dataset) -> np.ndarray:
    """The palette-colour image's pixels as 8-bit RGB ((frames,) rows, cols, 3)."""
    rgb = apply_color_lut(ds.pixel_array, ds)
    if rgb.dtype.itemsize > 1:
        rgb = rgb >> 8
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def to_rgb_in_place(ds: Dataset) -> None:
    """Make a native palette or YBR image 8-bit interleaved RGB, in place (header too)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        rgb = palette_rgb(ds)
        for tag in PALETTE_TAGS:
            ds.pop(int(tag, 16), None)
    else:  # pydicom converts YBR to RGB (and upsamples 4:2:2) when it decodes
        rgb = np.ascontiguousarray(ds.pixel_array)
    for tag, entry in RGB_HEADER.items():
        ds.add_new(int(tag, 16), entry["vr"], first(RGB_HEADER, tag))
    ds.PixelData = rgb.tobytes()
    ds["PixelData"].VR = "OB" if rgb.dtype.itemsize == 1 else "OW"
