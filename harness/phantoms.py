"""Spine phantoms with ground truth: they ship with `sphere train` as `processing.bone.phantoms`
and are named here too, for the harness, tests and benchmarks."""

from processing.bone.phantoms import (
    LEVEL_CODES,
    LUMBAR,
    THORACIC,
    PhantomSpec,
    PhantomTruth,
    fracture_grade,
    make_phantom,
    placed,
)

__all__ = [
    "LEVEL_CODES",
    "LUMBAR",
    "THORACIC",
    "PhantomSpec",
    "PhantomTruth",
    "fracture_grade",
    "make_phantom",
    "placed",
]
