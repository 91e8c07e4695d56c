"""A pydicom decoder plugin for the one syntax its permissive plugins leave out: 12-bit JPEG
Extended (Process 4), decoded by libjpeg-turbo 3 through imagecodecs (BSD-3).

pydicom's GDCM plugin refuses 12-bit samples and its only other one, pylibjpeg-libjpeg, is
GPLv3; every other syntax a PACS sends is decoded by pydicom's own plugins (see README).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGExtended12Bit, RLELossless

LABEL = "sphere-imagecodecs"
DECODER_DEPENDENCIES = {JPEGExtended12Bit: ("imagecodecs>=2024.1",)}


def is_available(uid: UID) -> bool:
    """Whether this plugin decodes `uid` here (pydicom's plugin interface)."""
    return uid in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner: Any) -> bytes:
    """One JPEG frame's samples, interleaved, little-endian (pydicom's plugin interface)."""
    import imagecodecs  # loaded on first use: ~0.1 s, for a rare syntax

    arr = imagecodecs.jpeg8_decode(src)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)  # libjpeg hands back colour-by-pixel
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def plugin_for(ts: UID | None, bits_stored: int) -> str:
    """The plugin to ask first for `ts` ("" for pydicom's order): pydicom would log an error
    for each of its plugins that refuses 12-bit JPEG before reaching this one, and tries its
    own RLE decoder (pure Python) before pylibjpeg-rle."""
    if ts == JPEGExtended12Bit and bits_stored > 8:
        return LABEL
    if ts == RLELossless and "pylibjpeg" in get_decoder(RLELossless).available_plugins:
        return "pylibjpeg"
    return ""


def register() -> None:
    """Add the plugin after pydicom's own (GDCM and Pillow still decode 8-bit frames)."""
    decoder = get_decoder(JPEGExtended12Bit)
    if LABEL not in decoder.available_plugins and is_available(JPEGExtended12Bit):
        decoder.add_plugin(LABEL, (__name__, "decode_frame"))
