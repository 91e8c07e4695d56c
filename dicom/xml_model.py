"""DICOM JSON model <-> PS3.19 Native DICOM Model (XML), for `application/dicom+xml`.

One source of truth: the XML is written from the same DICOM JSON dict the JSON answers are
(`dicom.json_model`), so both say the same. `from_xml` reads it back into that dict (numbers as
numbers), which is how the tests check a round trip and how a client can read it.

    <NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
      <DicomAttribute tag="00080008" vr="CS" keyword="ImageType">
        <Value number="1">ORIGINAL</Value> ...
      <DicomAttribute tag="00100010" vr="PN" keyword="PatientName">
        <PersonName number="1"><Alphabetic><FamilyName>Doe</FamilyName>...
      <DicomAttribute tag="00081115" vr="SQ" ...><Item number="1"><DicomAttribute .../>...
      <DicomAttribute tag="7FE00010" vr="OW" ...><BulkData uri="https://..."/>
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pydicom.datadict import keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_INT_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"DS", "FD", "FL"})
# Characters XML 1.0 cannot carry (C0 controls but tab, LF, CR): written as U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_KEYWORDS: dict[int, str] = {}


def to_xml(model: dict[str, Any]) -> str:
    """The Native DICOM Model XML document of one dataset's DICOM JSON model."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<NativeDicomModel xmlns="{NAMESPACE}">']
    _dataset(model, out)
    out.append("</NativeDicomModel>\n")
    return "".join(out)


def _dataset(model: dict[str, Any], out: list[str]) -> None:
    creators = {k: v for k, v in model.items() if _is_creator(k)}
    for key, entry in model.items():
        vr = entry.get("vr", "UN")
        tag = int(key, 16)
        attrs = f'tag="{key}" vr="{vr}"'
        keyword = _keyword(tag)
        if keyword:
            attrs += f' keyword="{keyword}"'
        elif tag >> 16 & 1 and tag & 0xFF00:  # a private element: name its creator
            creator = creators.get(f"{key[:4]}00{key[4:6]}")
            if creator and creator.get("Value"):
                attrs += f" privateCreator={quoteattr(_text(creator['Value'][0]))}"
        out.append(f"<DicomAttribute {attrs}>")
        _values(vr, entry, out)
        out.append("</DicomAttribute>")


def _is_creator(key: str) -> bool:
    tag = int(key, 16)
    return bool(tag >> 16 & 1) and 0x10 <= tag & 0xFFFF <= 0xFF


def _keyword(tag: int) -> str:
    found = _KEYWORDS.get(tag)
    if found is None:
        found = _KEYWORDS[tag] = "" if tag >> 16 & 1 else keyword_for_tag(tag)
    return found


def _values(vr: str, entry: dict[str, Any], out: list[str]) -> None:
    if "BulkDataURI" in entry:
        out.append(f"<BulkData uri={quoteattr(entry['BulkDataURI'])}/>")
        return
    if "InlineBinary" in entry:
        out.append(f"<InlineBinary>{entry['InlineBinary']}</InlineBinary>")
        return
    for n, value in enumerate(entry.get("Value") or (), 1):
        if vr == "SQ":
            out.append(f'<Item number="{n}">')
            _dataset(value or {}, out)
            out.append("</Item>")
        elif vr == "PN":
            out.append(_person_name(n, value))
        elif value is None:
            out.append(f'<Value number="{n}"/>')  # an empty value among several
        else:
            out.append(f'<Value number="{n}">{_text(_number_text(vr, value))}</Value>')


def _number_text(vr: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):  # DS 2.0 is written "2"; FD and FL keep every digit
        whole = vr == "DS" and value.is_integer() and abs(value) < 1e15
        return str(int(value)) if whole else repr(value)
    return str(value)


def _person_name(n: int, value: dict[str, str] | None) -> str:
    if not value:
        return f'<PersonName number="{n}"/>'
    parts = [f'<PersonName number="{n}">']
    for group in PN_GROUPS:
        name = value.get(group)
        if name is None:
            continue
        parts.append(f"<{group}>")
        for component, text in zip(PN_COMPONENTS, name.split("^"), strict=False):
            if text:
                parts.append(f"<{component}>{_text(text)}</{component}>")
        parts.append(f"</{group}>")
    parts.append("</PersonName>")
    return "".join(parts)


def _text(value: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", value))


# -- reading -----------------------------------------------------------------------------------


def from_xml(text: str | bytes) -> dict[str, Any]:
    """The DICOM JSON model of a Native DICOM Model document (`ValueError` if it is not one)."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not XML: {e}") from None
    if root.tag != f"{{{NAMESPACE}}}NativeDicomModel":
        raise ValueError(f"not a NativeDicomModel document: {root.tag}")
    return _read_dataset(root)


def _q(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


def _read_dataset(node: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in node.findall(_q("DicomAttribute")):
        vr = attr.get("vr", "UN")
        entry: dict[str, Any] = {"vr": vr}
        bulk, inline = attr.find(_q("BulkData")), attr.find(_q("InlineBinary"))
        if bulk is not None:
            entry["BulkDataURI"] = bulk.get("uri", "")
        elif inline is not None:
            entry["InlineBinary"] = (inline.text or "").strip()
        else:
            values = _read_values(vr, attr)
            if values or vr == "SQ":  # an empty sequence is "Value": [] in DICOM JSON
                entry["Value"] = values
        out[attr.get("tag", "").upper()] = entry
    return out


def _read_values(vr: str, attr: ET.Element) -> list[Any]:
    child = "Item" if vr == "SQ" else "PersonName" if vr == "PN" else "Value"
    nodes = sorted(attr.findall(_q(child)), key=lambda e: int(e.get("number", "0")))
    if vr == "SQ":
        return [_read_dataset(item) for item in nodes]
    if vr == "PN":
        return [_read_person_name(pn) for pn in nodes]
    return [_read_value(vr, v.text) for v in nodes]


def _read_value(vr: str, text: str | None) -> Any:
    if text is None or text == "":
        return None
    kind = int if vr in _INT_VRS else float if vr in _FLOAT_VRS else None
    if kind is None:
        return text
    try:
        return kind(text)
    except ValueError:
        return text


def _read_person_name(node: ET.Element) -> dict[str, str] | None:
    out = {}
    for group in PN_GROUPS:
        found = node.find(_q(group))
        if found is not None:
            comps = [(found.findtext(_q(c)) or "") for c in PN_COMPONENTS]
            out[group] = "^".join(comps).rstrip("^")
    return out or None
