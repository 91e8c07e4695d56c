"""Lossy compressed originals, marked in the stored header (PS3.3 C.7.6.1.1.5) so that a
pipeline can refuse or flag them once the pixels are stored decoded.

What the sender wrote is kept; when it says nothing (or "00") and the transfer syntax is lossy,
Lossy Image Compression "01", the ratio (decoded size over encoded size) and the method of the
syntax are set. JPEG 2000 and HTJ2K may be either: the codestream's wavelet says which
(reversible 5-3 or irreversible 9-7); JPEG-LS near-lossless is lossless with NEAR 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEGLSNearLossless: "ISO_14495_1",
    JPEG2000: "ISO_15444_1",
    HTJ2K: "ISO_15444_15",
}
LOSSY, RATIO, METHOD = "00282110", "00282112", "00282114"
_SCAN = 1 << 14  # main headers are near the start of the first fragment


def is_lossy(ts: UID | None, data: bytes | memoryview) -> bool:
    """Whether encapsulated pixel data `data` in syntax `ts` was lossy compressed."""
    if ts not in METHODS:
        return False
    head = bytes(data[:_SCAN])
    if ts in (JPEG2000, HTJ2K):
        return _j2k_reversible(head) is not True
    if ts == JPEGLSNearLossless:
        return _jls_near(head) != 0
    return True


def patches(
    ts: UID | None, data: bytes | memoryview, decoded_bytes: int, get: Callable[..., Any]
) -> dict[str, Any]:
    """Header patches {tag: DICOM JSON entry} marking a lossy original; `get` reads the header."""
    if ts is None or not is_lossy(ts, data):
        return {}
    if str(get("LossyImageCompression", "") or "").strip() == "01":
        out: dict[str, Any] = {}
        if get("LossyImageCompressionMethod") in (None, ""):
            out[METHOD] = {"vr": "CS", "Value": [METHODS[ts]]}
        return out
    ratio = decoded_bytes / max(1, len(data))
    return {
        LOSSY: {"vr": "CS", "Value": ["01"]},
        RATIO: {"vr": "DS", "Value": [round(ratio, 2)]},
        METHOD: {"vr": "CS", "Value": [METHODS[ts]]},
    }


def _j2k_reversible(head: bytes) -> bool | None:
    """The COD marker's wavelet: True for reversible 5-3, False for 9-7, None if not found."""
    pos = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ: the codestream (maybe inside JP2)
    if pos < 0:
        return None
    pos += 2
    while pos + 14 <= len(head) and head[pos] == 0xFF:
        marker = head[pos + 1]
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4), levels, xcb, ycb, style, transform
            return head[pos + 13] == 1
        if marker == 0x90:  # SOT: the main header ended without a COD
            return None
        pos += 2 + int.from_bytes(head[pos + 2 : pos + 4], "big")
    return None


def _jls_near(head: bytes) -> int | None:
    """NEAR of the first JPEG-LS scan (0: lossless), None if not found."""
    pos = head.find(b"\xff\xda")  # SOS: Ls, Ns, Ns x (Ci, Tmi), NEAR
    if pos < 0 or pos + 5 > len(head):
        return None
    at = pos + 5 + 2 * head[pos + 4]
    return head[at] if at < len(head) else None
