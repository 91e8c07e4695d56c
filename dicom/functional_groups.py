"""Per-frame facts of an enhanced multi-frame instance (PS3.3 C.7.6.16), from its DICOM JSON.

Enhanced CT, MR and PET keep what a classic image has at the top level (position, orientation,
pixel spacing, rescale) in functional groups: each frame's item of the Per-frame Functional
Groups Sequence, else the one item of the Shared Functional Groups Sequence. `frame_facts`
flattens them into one small dict a frame, named as storage.series names a slice's facts.
"""

from __future__ import annotations

from typing import Any

from dicom import json_model

SHARED = "52009229"
PER_FRAME = "52009230"
# (functional group macro sequence, attribute inside, fact name, number of values)
_FACTS = (
    ("00209113", "00200032", "ipp", 3),  # Plane Position (Patient): ImagePositionPatient
    ("00209116", "00200037", "iop", 6),  # Plane Orientation: ImageOrientationPatient
    ("00289110", "00280030", "ps", 2),  # Pixel Measures: PixelSpacing
    ("00289110", "00180050", "st", 1),  # Pixel Measures: SliceThickness
    ("00289145", "00281053", "slope", 1),  # Pixel Value Transformation: RescaleSlope
    ("00289145", "00281052", "icpt", 1),  # Pixel Value Transformation: RescaleIntercept
    ("00209111", "00209157", "dim", 0),  # Frame Content: DimensionIndexValues (any count)
)


def has_functional_groups(header: dict[str, Any]) -> bool:
    """Whether the instance keeps its frame facts in functional groups (enhanced objects)."""
    return SHARED in header or PER_FRAME in header


def frame_facts(header: dict[str, Any], n_frames: int) -> list[dict[str, Any]]:
    """Each frame's position, orientation, spacing, thickness and rescale (absent: not said)."""
    shared = _items(header, SHARED)
    per_frame = _items(header, PER_FRAME)
    base = _facts(shared[0]) if shared else {}
    out = []
    for k in range(n_frames):
        own = _facts(per_frame[k]) if k < len(per_frame) else {}
        out.append({**base, **own})
    return out


def _facts(group: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for macro, tag, name, count in _FACTS:
        items = _items(group, macro)
        if not items:
            continue
        values = json_model.values(items[0], tag)
        if not values:
            continue
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if count == 1:
            found[name] = numbers[0]
        elif count == 0 or len(numbers) == count:
            found[name] = numbers
    return found


def _items(ds: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    values = json_model.values(ds, tag)
    return [v for v in values if isinstance(v, dict)]
