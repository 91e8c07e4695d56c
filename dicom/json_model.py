"""Dataset <-> DICOM JSON model (PS3.18 Annex F) without pixel data.

`to_json_dict` gives the same result as pydicom's `Dataset.to_json_dict` for the elements it
keeps, many times faster, except that an empty value among several is `null` (PS3.18 F.2.5,
where pydicom writes `""`); `from_json` reads `null` back as an empty value. It leaves out
pixel data, file meta (group 0002), group lengths and binary values larger than
`bulk_threshold` bytes (bulk data): a header store needs the attributes, the pixels live
elsewhere.

Elements pydicom has not decoded yet (raw elements, as read from a file or the network) are
encoded straight from their bytes for the common VRs, giving what pydicom's decoding would;
anything unusual (non-ASCII text, UN, sequences, odd lengths) goes through pydicom.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

from pydicom import config, hooks
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.tag import _LUT_DESCRIPTOR_TAGS

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # float, double, integer pixels
DEFAULT_BULK_THRESHOLD = 64 * 1024

_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"DS", "FD", "FL"})
_LISTS = (MultiValue, list, tuple)
_SIZED: dict[type, bool] = {}  # value type -> has a length (cached: isinstance on ABCs is slow)

# Raw element fast path. Text VRs pydicom decodes with the default repertoire, by how it
# splits and strips them; then the VRs decoded with the dataset's character set (taken only
# when the bytes are plain ASCII, which every supported character set reads the same way).
_SPLIT_RSTRIP = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})  # whole value rstripped, split
_SPLIT_EACH = frozenset({"SH", "LO", "UC"})  # split, each rstripped of NUL and space
_SINGLE = frozenset({"ST", "LT", "UT"})  # one value, rstripped of NUL and space
_BINARY_NUMBERS = {
    "US": "H",
    "SS": "h",
    "UL": "I",
    "SL": "i",
    "FL": "f",
    "FD": "d",
    "UV": "Q",
    "SV": "q",
}
_NUMBER_CHARS = frozenset("0123456789+-. eE\\\x00")
_INT_CHARS = frozenset("0123456789+- \\\x00")
_SLOW = object()  # the fast path declines: let pydicom decode the element
_IMPLICIT_VRS: dict[int, str | None] = {}  # tag -> unambiguous dictionary VR, or None
# encode()'s cache: (tag, VR, bytes, little endian, bulk threshold) -> (entry, JSON text).
_CACHE: dict[tuple[Any, ...], tuple[Any, str]] = {}  # text "" for an element left out
_CACHE_SIZE = 20_000
_CACHE_VALUE_BYTES = 1024  # longer values are rarely repeated; not worth their memory
_dumps = json.JSONEncoder(separators=(",", ":")).encode
Part = tuple[Any, str]  # one element's DICOM JSON entry and its '"TAG":{...}' text, from encode()


def values(model: Mapping[str, Any], tag: str) -> list[Any]:
    """The values of one element of a DICOM JSON model ([] when absent or empty)."""
    return list((model.get(tag) or {}).get("Value") or [])


def first(model: Mapping[str, Any], tag: str) -> Any:
    """The first value of one element of a DICOM JSON model, or None."""
    found = (model.get(tag) or {}).get("Value")
    return found[0] if found else None


def to_json_dict(ds: Dataset, bulk_threshold: int = DEFAULT_BULK_THRESHOLD) -> dict[str, Any]:
    """DICOM JSON model of `ds` without pixel data, file meta, group lengths or bulk data."""
    return _dataset(ds, bulk_threshold, [], top=True)


def dumps(ds: Dataset, bulk_threshold: int = DEFAULT_BULK_THRESHOLD) -> str:
    """Compact JSON text of `to_json_dict(ds)`."""
    return json.dumps(to_json_dict(ds, bulk_threshold), separators=(",", ":"))


def encode(
    ds: Dataset,
    bulk_threshold: int = DEFAULT_BULK_THRESHOLD,
    reuse: Mapping[int, Part | None] | None = None,
    parts: dict[int, Part | None] | None = None,
) -> tuple[dict[str, Any], str]:
    """`to_json_dict(ds)` and its compact JSON text, made together.

    Raw elements seen before with the same bytes (most of a series' header repeats from
    instance to instance) are taken from a cache, model and text. The entries of the dict
    may be shared with other calls: read them, never change them in place.

    `parts`, when given, receives each top-level element's part (None for one left out).
    `reuse` gives parts from an earlier call for elements the caller knows are unchanged
    since (the same objects, same bulk threshold): those are taken as they are.
    """
    out: dict[str, Any] = {}
    texts: list[str] = []
    fast = _fast_path_allowed()
    cache = _CACHE
    if len(cache) > _CACHE_SIZE:
        cache.clear()  # crude but bounded: a series refills it within a few instances
    for tag, elem in _sorted_elements(ds):
        if tag in PIXEL_TAGS or tag >> 16 == 2 or tag & 0xFFFF == 0:
            continue
        if reuse is not None and tag in reuse:
            hit = reuse[tag]
            if hit is not None:
                out[f"{tag:08X}"] = hit[0]
                texts.append(hit[1])
            if parts is not None:
                parts[tag] = hit
            continue
        if fast and type(elem) is RawDataElement and type(elem.value) is bytes:
            ckey = (tag, elem.VR, elem.value, elem.is_little_endian, bulk_threshold)
            hit = cache.get(ckey)
            if hit is None:
                entry = _raw_element(tag, elem, bulk_threshold)
                if entry is _SLOW:
                    hit = None
                else:
                    text = f'"{tag:08X}":{_dumps(entry)}' if entry is not None else ""
                    hit = (entry, text)
                    if len(elem.value) <= _CACHE_VALUE_BYTES:
                        cache[ckey] = hit
            if hit is not None:
                if hit[0] is not None:
                    out[f"{tag:08X}"] = hit[0]
                    texts.append(hit[1])
                if parts is not None:
                    parts[tag] = hit if hit[0] is not None else None
                continue
        if not isinstance(elem, DataElement):
            elem = ds[tag]
        if " or " in elem.VR:
            elem = correct_ambiguous_vr_element(elem, ds, True, [ds])
        entry = _element(elem, bulk_threshold, [ds])
        part = None
        if entry is not None:
            key = f"{tag:08X}"
            part = (entry, f'"{key}":{_dumps(entry)}')
            out[key] = entry
            texts.append(part[1])
        if parts is not None:
            parts[tag] = part
    return out, "{" + ",".join(texts) + "}"


def from_json(model: dict[str, Any] | str | bytes) -> Dataset:
    """Dataset from a DICOM JSON model (dict or JSON text)."""
    if not isinstance(model, dict):
        model = json.loads(model)
    return Dataset.from_json(model)


def _dataset(
    ds: Dataset, bulk_threshold: int, ancestors: list[Dataset], top: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lineage = [ds, *ancestors]
    fast = _fast_path_allowed()
    for tag, elem in _sorted_elements(ds):
        # Pixels nested in sequences (icons) are ordinary binary values.
        if (top and tag in PIXEL_TAGS) or tag >> 16 == 2 or tag & 0xFFFF == 0:
            continue
        if not isinstance(elem, DataElement):
            if fast and type(elem) is RawDataElement:
                entry = _raw_element(tag, elem, bulk_threshold)
                if entry is not _SLOW:
                    if entry is not None:
                        out[f"{tag:08X}"] = entry
                    continue
            elem = ds[tag]  # converts a deferred raw element
        if " or " in elem.VR:
            elem = correct_ambiguous_vr_element(elem, ds, True, lineage)
        entry = _element(elem, bulk_threshold, lineage)
        if entry is not None:
            out[f"{tag:08X}"] = entry
    return out


def _fast_path_allowed() -> bool:
    """Raw bytes may be encoded directly only while pydicom decodes them the default way."""
    return (
        config.data_element_callback is None
        and hooks.hooks.raw_element_vr is hooks.raw_element_vr
        and hooks.hooks.raw_element_value is hooks.raw_element_value
        and not config.datetime_conversion
        and not config.use_DS_numpy
        and not config.use_IS_numpy
    )


def _raw_element(tag: int, raw: RawDataElement, bulk_threshold: int) -> Any:
    """DICOM JSON entry of a raw element from its bytes, None to leave it out, or _SLOW."""
    vr = raw.VR
    value = raw.value
    if vr is None:  # implicit VR: the dictionary's, when there is exactly one
        if tag in _IMPLICIT_VRS:
            vr = _IMPLICIT_VRS[tag]
        else:
            vr = _IMPLICIT_VRS[tag] = _implicit_vr(tag)
        if vr is None:
            return _SLOW
    if type(value) is not bytes or raw.length == 0xFFFFFFFF or vr == "SQ" or vr == "UN":
        return _SLOW
    if not value:
        return {"vr": vr}
    if vr in _BINARY_VRS:
        if len(value) > bulk_threshold:
            return None
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr in _BINARY_NUMBERS:
        code = _BINARY_NUMBERS[vr]
        size = struct.calcsize(code)
        if len(value) % size or tag in _LUT_DESCRIPTOR_TAGS:
            return _SLOW
        order = "<" if raw.is_little_endian else ">"
        return {"vr": vr, "Value": list(struct.unpack(f"{order}{len(value) // size}{code}", value))}
    if vr == "AT":
        if len(value) % 4:
            return _SLOW
        order = "<" if raw.is_little_endian else ">"
        pairs = struct.unpack(f"{order}{len(value) // 2}H", value)
        return {
            "vr": vr,
            "Value": [f"{g:04X}{e:04X}" for g, e in zip(pairs[::2], pairs[1::2], strict=True)],
        }
    # Text. Every text VR pydicom decodes with its default repertoire (latin-1) unless the
    # dataset's character set applies; that is only taken for plain ASCII here.
    if vr in _SPLIT_RSTRIP:
        values = value.decode("latin-1").rstrip(" \x00").split("\\")
    elif vr in _SPLIT_EACH or vr == "PN" or vr in _SINGLE or vr == "UR":
        if not value.isascii() or b"\x1b" in value:
            return _SLOW
        if vr in _SPLIT_EACH:
            values = [v.rstrip("\x00 ") for v in value.decode("ascii").split("\\")]
        elif vr == "PN":
            values = value.rstrip(b"\x00 ").decode("ascii").split("\\")
            if len(values) == 1 and not values[0]:
                return {"vr": vr}
            if b"=" in value:
                return _SLOW
            names = [{"Alphabetic": v} if v or len(values) == 1 else None for v in values]
            return {"vr": vr, "Value": names}
        elif vr == "UR":
            values = [value.decode("ascii").rstrip()]
        else:
            values = [value.decode("ascii").rstrip("\x00 ")]
    elif vr == "AE":
        values = [v.strip() for v in value.decode("latin-1").split("\\")]
    elif vr == "IS" or vr == "DS":
        text = value.decode("latin-1")
        if not _INT_CHARS.issuperset(text) if vr == "IS" else not _NUMBER_CHARS.issuperset(text):
            return _SLOW
        values = (text.strip() if vr == "DS" else text).rstrip(" \x00").split("\\")
        if len(values) == 1 and not values[0].strip():
            return {"vr": vr}
        kind = int if vr == "IS" else float
        try:
            numbers = [kind(v) if v.strip(" \x00") else None for v in values]
        except ValueError:
            return _SLOW
        return {"vr": vr, "Value": numbers}
    else:
        return _SLOW
    if len(values) == 1:
        return {"vr": vr} if not values[0] else {"vr": vr, "Value": values}
    return {"vr": vr, "Value": _nulls(values)}


def _nulls(values: list[Any]) -> list[Any]:
    """An empty value among several is null in DICOM JSON (PS3.18 F.2.5), not ""."""
    return [None if v == "" else v for v in values]


def _implicit_vr(tag: int) -> str | None:
    if tag >> 16 & 1:  # private: pydicom looks at the creator
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return None if " or " in vr else vr


def _sorted_elements(ds: Dataset) -> list[tuple[int, Any]]:
    # pydicom keeps elements in `_dict`; reading it directly is ~3x faster than elements(),
    # which matters at hundreds of instances a second. Fall back if that ever changes.
    raw = getattr(ds, "_dict", None)
    if isinstance(raw, dict):
        pairs = [(int(tag), elem) for tag, elem in raw.items()]
    else:
        pairs = [(int(e.tag), e) for e in ds.elements()]
    pairs.sort(key=itemgetter(0))  # plain ints sort much faster than BaseTag
    return pairs


def _element(elem: DataElement, bulk_threshold: int, ancestors: list[Dataset]) -> dict | None:
    vr = elem.VR
    value = elem.value
    if vr == "SQ":
        return {"vr": vr, "Value": [_dataset(item, bulk_threshold, ancestors) for item in value]}
    kind = type(value)
    sized = _SIZED.get(kind)
    if sized is None:
        sized = _SIZED[kind] = hasattr(kind, "__len__")
    if value is None or (sized and len(value) == 0):
        return {"vr": vr}
    if vr in _BINARY_VRS or " or " in vr:
        if not isinstance(value, bytes | bytearray):
            # An ambiguous VR that pydicom could not resolve but holds numbers.
            return _plain(vr.split(" or ")[0], value)
        if len(value) > bulk_threshold:
            return None
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr == "PN":
        if kind is not MultiValue:
            return {"vr": vr, "Value": [_person_name(value)]}
        return {"vr": vr, "Value": [_person_name(v) if str(v) else None for v in value]}
    if vr == "AT":
        tags = value if kind is MultiValue else (value,)
        return {"vr": vr, "Value": [f"{int(t):08X}" for t in tags]}
    return _plain(vr, value)


def _plain(vr: str, value: Any) -> dict:
    values = list(value) if type(value) in _LISTS else [value]
    if vr in _INT_VRS:
        values = [_number(v, int) for v in values]
    elif vr in _FLOAT_VRS:
        values = [_number(v, float) for v in values]
    else:
        values = [v if isinstance(v, str) or v is None else str(v) for v in values]
        if len(values) > 1:
            values = _nulls(values)
    return {"vr": vr, "Value": values}


def _number(v: Any, kind: type) -> Any:
    if v is None or v == "":
        return None
    try:
        return kind(v)
    except (TypeError, ValueError):
        return str(v)  # an invalid number is kept as text rather than lost


def _person_name(pn: Any) -> dict[str, str]:
    comps: Sequence[str] = getattr(pn, "components", None) or (str(pn),)
    out = {"Alphabetic": comps[0]}
    if len(comps) > 1:
        out["Ideographic"] = comps[1]
    if len(comps) > 2:
        out["Phonetic"] = comps[2]
    return out
