"""Slice geometry of an image series: order along the slice normal, spacing, origin, affine.

Conventions: positions and cosines are in the DICOM patient frame (LPS, mm). Arrays built from
a series are indexed (z, y, x): z is the slice index in the order returned here, y the row and
x the column. `PixelSpacing` is (row spacing = y, column spacing = x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Cosines from different slices of one series may differ by rounding in their text form.
_COSINE_TOL = 1e-3
# Positions closer than this along the normal count as the same location (mm).
_POSITION_TOL = 1e-3


class GeometryError(ValueError):
    """The slices do not form one consistent stack (no PHI in the message)."""


@dataclass(frozen=True)
class SeriesGeometry:
    """Where each slice of a series goes and how array indices map to the patient frame."""

    order: list[int]  # input indices in stack order (ascending along the normal)
    spacing: tuple[float | None, float | None, float | None]  # (z, y, x) in mm; None if unknown
    origin: tuple[float, float, float] | None  # centre of the first voxel of the first slice
    direction: tuple[float, ...] | None  # 9 values: row (x), column (y), normal cosines
    affine: list[list[float]] | None  # 4x4: patient xyz1 = affine @ (z, y, x, 1)
    positions: list[float] | None  # slice positions along the normal, in stack order
    uniform: bool  # slices evenly spaced (within 1 %) with no duplicate positions

    def attrs(self) -> dict:
        """JSON-ready form for storage."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin) if self.origin else None,
            "direction": list(self.direction) if self.direction else None,
            "affine": self.affine,
            "slice_positions": self.positions,
            "uniform_spacing": self.uniform,
        }


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal cross(row, col) of an ImageOrientationPatient value."""
    iop = np.asarray(orientation, dtype=np.float64)
    if iop.shape != (6,):
        raise GeometryError("ImageOrientationPatient must have 6 values")
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise GeometryError("ImageOrientationPatient row and column cosines are not orthogonal")
    return normal / norm


def order_slices(
    positions: Sequence[Sequence[float] | None],
    orientations: Sequence[Sequence[float] | None],
    instance_numbers: Sequence[int | None],
    pixel_spacing: Sequence[float] | None = None,
    slice_thickness: float | None = None,
) -> SeriesGeometry:
    """Order slices along their normal (tie-break InstanceNumber) and derive the geometry.

    Slices without any position/orientation (e.g. projection radiographs) are ordered by
    InstanceNumber with no patient-frame geometry. A mix of slices with and without
    position, or differing orientations, raises GeometryError.
    """
    n = len(positions)
    if not (len(orientations) == len(instance_numbers) == n):
        raise ValueError("positions, orientations and instance numbers differ in length")
    inums = [i if i is not None else 0 for i in instance_numbers]
    dy, dx = (float(pixel_spacing[0]), float(pixel_spacing[1])) if pixel_spacing else (None, None)

    has_pos = [
        p is not None and o is not None for p, o in zip(positions, orientations, strict=True)
    ]
    if n == 0 or not any(has_pos):
        order = sorted(range(n), key=lambda i: (inums[i], i))
        return SeriesGeometry(order, (None, dy, dx), None, None, None, None, n <= 1)
    if not all(has_pos):
        raise GeometryError("some slices lack ImagePositionPatient or ImageOrientationPatient")

    iop = np.asarray(orientations, dtype=np.float64)
    if iop.shape != (n, 6):
        raise GeometryError("ImageOrientationPatient must have 6 values")
    if n > 1 and np.abs(iop - iop[0]).max() > _COSINE_TOL:
        raise GeometryError("slices differ in ImageOrientationPatient")
    ipp = np.asarray(positions, dtype=np.float64)
    if ipp.shape != (n, 3):
        raise GeometryError("ImagePositionPatient must have 3 values")
    if not (np.isfinite(ipp).all() and np.isfinite(iop).all()):
        raise GeometryError("non-finite position or orientation")

    row, col = iop[0, :3], iop[0, 3:]
    normal = slice_normal(iop[0])
    dist = ipp @ normal
    order = sorted(range(n), key=lambda i: (dist[i], inums[i], i))
    d = dist[order]
    steps = np.diff(d)
    distinct = steps[steps > _POSITION_TOL]
    dz: float | None
    if distinct.size:
        dz = float(np.median(distinct))
        uniform = distinct.size == steps.size and bool(np.all(np.abs(steps - dz) <= 0.01 * dz))
    else:
        dz = float(slice_thickness) if slice_thickness else None
        uniform = n == 1

    origin = ipp[order[0]]
    # The stack may not run along the normal (gantry tilt): step along the actual slice line,
    # scaled so that one index moves dz along the normal.
    span = d[-1] - d[0]
    if dz is not None and span > _POSITION_TOL:
        step = (ipp[order[-1]] - origin) / span * dz
    else:
        step = normal * (dz or 0.0)
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col * (dy if dy is not None else 0.0)
    affine[:3, 2] = row * (dx if dx is not None else 0.0)
    affine[:3, 3] = origin
    return SeriesGeometry(
        order=order,
        spacing=(dz, dy, dx),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(float(v) for v in (*row, *col, *normal)),
        affine=affine.tolist(),
        positions=[float(v) for v in d],
        uniform=uniform,
    )
