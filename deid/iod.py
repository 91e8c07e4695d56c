"""Attribute types (PS3.3) that resolve Table E.1-1's conditional actions (X/Z, Z/D, X/D, ...).

Only the attributes whose action is conditional matter, and only where the type is known: at the top
level of the common IODs, and inside the few sequences that reference images. Elsewhere the engine
takes the stronger action (X before Z before D or U).
"""

from __future__ import annotations

# Tags, for readability of the tables below.
ACQ_DATE, ACQ_DATETIME, ACQ_TIME = 0x00080022, 0x0008002A, 0x00080032
CONTENT_DATE, CONTENT_TIME = 0x00080023, 0x00080033
SERIES_DATE, SERIES_TIME = 0x00080021, 0x00080031
CREATION_DATE, CREATION_TIME = 0x00080012, 0x00080013
CONTRAST_AGENT = 0x00180010
DEVICE_SERIAL, STATION = 0x00181000, 0x00081010
INSTITUTION, INSTITUTION_CODES = 0x00080080, 0x00080082
OPERATORS, OPERATOR_IDS = 0x00081070, 0x00081072
PROTOCOL_NAME, PATIENT_ID = 0x00181030, 0x00100020
REF_IMAGES, SOURCE_IMAGES, REF_STUDIES, REF_PPS = 0x00081140, 0x00082112, 0x00081110, 0x00081111
DETECTOR_ID, DETECTOR_CAL_DATE, DETECTOR_CAL_TIME = 0x0018700A, 0x0018700C, 0x0018700E
CONTENT_CREATOR = 0x00700084
REQUESTED_PROCEDURE_DESCRIPTION = 0x00321060
OBSERVATION_DATETIME = 0x0040A032
ACQ_CONTEXT = 0x00400555

# General Study/Series/Equipment/Image, Contrast/Bolus, Patient modules, as in CT, MR, CR, DX,
# US, SC, PET, NM images.
_IMAGE = {
    ACQ_DATE: "3",
    ACQ_DATETIME: "3",
    ACQ_TIME: "3",
    CONTENT_DATE: "2C",
    CONTENT_TIME: "2C",
    SERIES_DATE: "3",
    SERIES_TIME: "3",
    CREATION_DATE: "3",
    CREATION_TIME: "3",
    CONTRAST_AGENT: "2",
    DEVICE_SERIAL: "3",
    STATION: "3",
    INSTITUTION: "3",
    INSTITUTION_CODES: "3",
    OPERATORS: "3",
    OPERATOR_IDS: "3",
    PROTOCOL_NAME: "3",
    PATIENT_ID: "2",
    REF_IMAGES: "3",
    SOURCE_IMAGES: "3",
    REF_STUDIES: "3",
    REF_PPS: "3",
    DETECTOR_ID: "3",
    DETECTOR_CAL_DATE: "3",
    DETECTOR_CAL_TIME: "3",
}
# Multi-frame 'enhanced' images: Enhanced General Equipment and Multi-frame Functional Groups.
_ENHANCED = _IMAGE | {
    CONTENT_DATE: "1",
    CONTENT_TIME: "1",
    ACQ_DATETIME: "1C",
    DEVICE_SERIAL: "1",
    ACQ_CONTEXT: "2",  # the Acquisition Context module is mandatory in enhanced IODs
}
# Type 3 in both the SR Document General and Presentation State Identification modules (and the
# General Equipment / Series attributes they carry).
_DOCUMENT_OPTIONAL = {
    SERIES_DATE: "3",
    SERIES_TIME: "3",
    CREATION_DATE: "3",
    CREATION_TIME: "3",
    DEVICE_SERIAL: "3",
    STATION: "3",
    INSTITUTION: "3",
    INSTITUTION_CODES: "3",
    OPERATORS: "3",
    OPERATOR_IDS: "3",
    REF_STUDIES: "3",
}
# SR Document General module.
_SR = _DOCUMENT_OPTIONAL | {
    CONTENT_DATE: "1",
    CONTENT_TIME: "1",
    PROTOCOL_NAME: "3",
    PATIENT_ID: "2",
    REF_PPS: "2",
}
_DOSE_SR = _SR | {DEVICE_SERIAL: "1"}  # Enhanced General Equipment is mandatory
# Presentation State Identification module.
_PR = _DOCUMENT_OPTIONAL | {
    CONTENT_DATE: "1",
    CONTENT_TIME: "1",
    CONTENT_CREATOR: "2",
    PATIENT_ID: "2",
    REF_PPS: "3",
}
# Digital X-ray, mammography and intra-oral images, whose Acquisition Context module is mandatory.
_PROJECTION = _IMAGE | {ACQ_CONTEXT: "2"}
TOP_LEVEL: dict[str, dict[int, str]] = {
    "image": _IMAGE,
    "projection": _PROJECTION,
    "enhanced": _ENHANCED,
    "sr": _SR,
    "dose_sr": _DOSE_SR,
    "pr": _PR,
}
# (enclosing sequence, attribute) -> type, whatever the IOD.
NESTED: dict[tuple[int, int], str] = {
    (0x00081115, REF_IMAGES): "1",  # Referenced Series Sequence (presentation states)
    (0x00700001, REF_IMAGES): "1C",  # Graphic Annotation Sequence
    (0x0070005A, REF_IMAGES): "1C",  # Displayed Area Selection Sequence
    (0x00283110, REF_IMAGES): "1C",  # Softcopy VOI LUT Sequence
    (0x00700008, REF_IMAGES): "1C",  # Text Object Sequence (older editions)
    # The Referenced Image functional group (Enhanced MR, XA...): removing it from a frame would
    # leave the instance's Referenced Image Evidence Sequence pointing at nothing (invalid IOD).
    (0x52009229, REF_IMAGES): "1",  # Shared Functional Groups Sequence
    (0x52009230, REF_IMAGES): "1",  # Per-frame Functional Groups Sequence
    (0x0040A370, REQUESTED_PROCEDURE_DESCRIPTION): "2",  # Referenced Request Sequence
    (0x0040A730, OBSERVATION_DATETIME): "1C",  # SR content items
}

_ENHANCED_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
}
_PROJECTION_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography, for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography, for processing
    "1.2.840.10008.5.1.4.1.1.1.3",  # Digital Intra-Oral X-Ray, for presentation
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray, for processing
}
_DOSE_SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.76",  # Enhanced X-Ray Radiation Dose SR
}


def family(sop_class_uid: str, has_pixels: bool) -> str | None:
    """The IOD family whose attribute types are known, or None."""
    if sop_class_uid in _DOSE_SR_CLASSES:
        return "dose_sr"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "sr"
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.11."):
        return "pr"
    if sop_class_uid in _ENHANCED_CLASSES:
        return "enhanced"
    if sop_class_uid in _PROJECTION_CLASSES:
        return "projection"
    if has_pixels and sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1."):
        return "image"
    return None


def attribute_type(fam: str | None, parent: int | None, tag: int) -> str | None:
    """The attribute's type ('1', '1C', '2', '2C', '3') where known, else None."""
    if parent is None:
        return TOP_LEVEL.get(fam or "", {}).get(tag)
    return NESTED.get((parent, tag))


def resolve(code: str, attr_type: str | None) -> str:
    """A conditional action code resolved for an attribute type; unknown type: the stronger action.

    X/Z: Z where the attribute must be present (type 1 or 2), else X. X/D and Z/D: D where it must
    have a value (type 1; for X/D also type 2, where X is not allowed), else X or Z. X/Z/D: D for
    type 1, Z for type 2, else X. X/Z/U*: U (keep, UIDs replaced) for type 1, Z for 2, else X.
    """
    required = attr_type is not None and attr_type[0] in "12"
    must_have_value = attr_type is not None and attr_type[0] == "1"
    if code == "X/Z":
        return "Z" if required else "X"
    if code == "X/D":
        return "D" if required else "X"
    if code == "Z/D":
        return "D" if must_have_value else "Z"
    if code == "X/Z/D":
        return "D" if must_have_value else "Z" if required else "X"
    if code == "X/Z/U*":
        return "U" if must_have_value else "Z" if required else "X"
    return code
