"""A pydicom decoder plugin on libjpeg-turbo 3 through imagecodecs (BSD-3), for what pydicom's
permissive plugins leave out or decode slowly:

- 12-bit JPEG Extended (Process 4): pydicom's GDCM plugin refuses 12-bit samples and its only
  other one, pylibjpeg-libjpeg, is GPLv3;
- JPEG Lossless (Process 14, any predictor): GDCM decodes it, but libjpeg-turbo 3 does it 3-4x
  faster (a 512x512 CT slice: ~4 ms against ~13 ms), and a compressed archive's pull is bound
  by that decode (benchmarks/bench_compressed_pull.py).

Every other syntax a PACS sends is decoded by pydicom's own plugins (see README).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, RLELossless

LABEL = "sphere-imagecodecs"
LOSSLESS = (JPEGLossless, JPEGLosslessSV1)
DECODER_DEPENDENCIES = {uid: ("imagecodecs>=2024.1",) for uid in (JPEGExtended12Bit, *LOSSLESS)}


def is_available(uid: UID) -> bool:
    """Whether this plugin decodes `uid` here (pydicom's plugin interface)."""
    return uid in DECODER_DEPENDENCIES and importlib.util.find_spec("imagecodecs") is not None


def decode_frame(src: bytes, runner: Any) -> bytes:
    """One JPEG frame's samples, interleaved, little-endian (pydicom's plugin interface)."""
    import imagecodecs  # loaded on first use: ~0.1 s

    if runner.samples_per_pixel > 1:
        # The samples as encoded, never a colour transform here: DICOM's Photometric
        # Interpretation says what they are, and pydicom converts YBR afterwards.
        space = "RGB" if runner.transfer_syntax in LOSSLESS else None
        arr = imagecodecs.jpeg8_decode(src, colorspace=space, outcolorspace=space)
        runner.set_option("planar_configuration", 0)  # libjpeg hands back colour-by-pixel
    else:
        arr = imagecodecs.jpeg8_decode(src)
    return arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def plugin_for(ts: UID | None, bits_stored: int) -> str:
    """The plugin to ask first for `ts` ("" for pydicom's order): this one for 12-bit JPEG
    (pydicom would log an error for each of its plugins that refuses it first) and for JPEG
    Lossless (faster); pylibjpeg-rle for RLE (pydicom tries its pure-Python decoder first)."""
    if ts == JPEGExtended12Bit and bits_stored > 8:
        return LABEL
    if ts in LOSSLESS and LABEL in get_decoder(ts).available_plugins:
        return LABEL
    if ts == RLELossless and "pylibjpeg" in get_decoder(RLELossless).available_plugins:
        return "pylibjpeg"
    return ""


def register() -> None:
    """Add the plugin after pydicom's own (GDCM and Pillow still decode 8-bit frames, and
    JPEG Lossless where this plugin is not asked first)."""
    for uid in DECODER_DEPENDENCIES:
        decoder = get_decoder(uid)
        if LABEL not in decoder.available_plugins and is_available(uid):
            decoder.add_plugin(LABEL, (__name__, "decode_frame"))
