"""Where each top-level element of an encoded little-endian dataset lies, without decoding it.

A receiver compares an instance with the previous one of its series element by element, as
bytes: what did not change needs no second look. Only the element boundaries are read here;
anything unexpected answers None, and the caller decodes the dataset the ordinary way.
"""

from __future__ import annotations

import struct

# Explicit VR elements with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TAG_LEN = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_MAX_DEPTH = 16


def element_spans(data: bytes | memoryview, implicit: bool) -> dict[int, tuple[int, int]] | None:
    """{tag: (start, end)} of every top-level element, header included, in byte offsets of
    `data`; None if the bytes do not parse cleanly (repeated tag, short value, bad nesting)."""
    spans: dict[int, tuple[int, int]] = {}
    pos, end = 0, len(data)
    while pos < end:
        tag, nxt = _element(data, pos, end, implicit, 0)
        if nxt < 0 or tag in spans or tag >> 16 == 0xFFFE:
            return None
        spans[tag] = (pos, nxt)
        pos = nxt
    return spans


def value_span(
    data: bytes | memoryview, span: tuple[int, int], implicit: bool
) -> tuple[int, int] | None:
    """(start, end) of the value of the element at `span` (one of element_spans'), when it has
    a defined length; None for an undefined-length one (items follow, not a plain value)."""
    start, end = span
    head = 8
    if implicit:
        length = _TAG_LEN.unpack_from(data, start)[2]
    else:  # read as _element does
        _, _, vr, length = _EXPLICIT.unpack_from(data, start)
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, start + 8)
            head = 12
    if length == _UNDEFINED or start + head + length != end:
        return None
    return start + head, end


def _element(
    data: bytes | memoryview, pos: int, end: int, implicit: bool, depth: int
) -> tuple[int, int]:
    """(tag, offset after the element), or offset -1 when it does not parse."""
    if pos + 8 > end:
        return 0, -1
    if implicit:
        group, elem, length = _TAG_LEN.unpack_from(data, pos)
        pos += 8
        vr = b""
    else:
        group, elem, vr, length = _EXPLICIT.unpack_from(data, pos)
        pos += 8
        if vr in _LONG_VRS:
            if pos + 4 > end:
                return 0, -1
            (length,) = struct.unpack_from("<I", data, pos)
            pos += 4
        elif not vr.isalpha() or not vr.isupper():
            return 0, -1
    tag = group << 16 | elem
    if length != _UNDEFINED:
        pos += length
        return tag, pos if pos <= end else -1
    # Undefined length: a sequence, encapsulated pixel data, or UN holding implicit-VR items.
    return tag, _items(data, pos, end, implicit or vr == b"UN", depth + 1)


def _items(data: bytes | memoryview, pos: int, end: int, implicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length value up to and including its delimiter."""
    if depth > _MAX_DEPTH:
        return -1
    while pos + 8 <= end:
        group, elem, length = _TAG_LEN.unpack_from(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            return -1
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: elements up to its delimiter
            if pos + 8 > end:
                return -1
            group, elem, _ = _TAG_LEN.unpack_from(data, pos)
            if group << 16 | elem == _ITEM_END:
                pos += 8
                break
            _, pos = _element(data, pos, end, implicit, depth)
            if pos < 0:
                return -1
    return -1
