"""Opportunistic bone density from abdominal CT: L1 trabecular attenuation (Pickhardt 2013).

Classical segmentation on torch (any device): bone threshold, spinal column, vertebral bodies split
at the discs, ribs attached to their vertebrae, L1 found twice (below the lowest ribs, and five
above the sacrum) and measured in a trabecular ROI only when both agree and nothing else is wrong.
"""

from processing.bone.measure import (
    BoneReport,
    LevelResult,
    ScanFacts,
    Thresholds,
    classify,
    measure_bone_density,
)
from processing.bone.orient import canonical_orientation
from processing.tensor import to_hu  # the one conversion, re-exported for the science's callers

__all__ = [
    "BoneReport",
    "LevelResult",
    "ScanFacts",
    "Thresholds",
    "canonical_orientation",
    "classify",
    "measure_bone_density",
    "to_hu",
]
