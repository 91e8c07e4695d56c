"""The DICOM statuses (PS3.7 Annex C) sphere answers and reads, whatever the protocol: a
C-STORE answer, a retrieve's final status, a DICOMweb retrieve's result. Defined here, below
both the DIMSE layer and the pull, so a receiver's answer passes through unchanged and neither
side keeps a copy."""

from __future__ import annotations

SUCCESS = 0x0000
REFUSED = 0x0124  # "Refused: not authorized": not expected, or opted out
OUT_OF_RESOURCES = 0xA700  # a full disk: the sender may try again later
DATASET_MISMATCH = 0xA900  # "Data set does not match SOP class" (nor the request's UIDs)
CANNOT_UNDERSTAND = 0xC000  # anything else that went wrong
DECODE_FAILED = 0xC210  # in "Cannot understand"; pynetdicom's code for an undecodable dataset
CANCEL = 0xFE00


def is_success(status: int) -> bool:
    return status == SUCCESS


def is_out_of_resources(status: int) -> bool:
    """A7xx "Refused: out of resources": the source is busy, not broken."""
    return 0xA700 <= status <= 0xA7FF


def is_pending(status: int) -> bool:
    return status in (0xFF00, 0xFF01)


def is_warning(status: int) -> bool:
    return status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF


def is_failure(status: int) -> bool:
    """Neither success, warning, pending nor cancel."""
    return not (is_success(status) or is_warning(status) or is_pending(status) or status == CANCEL)
