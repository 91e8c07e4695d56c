"""Orientation and HU: bring any axial volume to canonical (S, P, L) order; stored values to HU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from processing import loader


def to_hu(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Stored pixel values (signed or unsigned) to HU as float32: stored * slope + intercept
    (the loader's `to_hu`, on the CPU, as an array)."""
    return loader.to_hu(np.ascontiguousarray(stored), slope, intercept).numpy()


@dataclass(frozen=True)
class Orientation:
    """How the input's axes map onto canonical ones: canonical = flip(transpose(input, perm))."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]  # per canonical axis, after the transpose

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        a = np.transpose(a, self.perm)
        return np.flip(a, tuple(i for i, f in enumerate(self.flips) if f))

    def from_canonical(self, a: np.ndarray) -> np.ndarray:
        a = np.flip(a, tuple(i for i, f in enumerate(self.flips) if f))
        return np.ascontiguousarray(np.transpose(a, np.argsort(self.perm)))


def canonical_orientation(
    spacing_zyx: tuple[float, float, float],
    affine: np.ndarray | None = None,
    z_increases_superior: bool = True,
) -> tuple[Orientation, tuple[float, float, float]]:
    """Orientation to canonical axes (0: superior, 1: posterior, 2: left) and canonical spacing.

    `affine` maps a homogeneous array index (axis 0, 1, 2, 1) to patient LPS mm (x, y, z, 1).
    Without it the array is taken as axial DICOM order (rows posterior, columns left), with axis 0
    superior when `z_increases_superior`.
    """
    if affine is None:
        flips = (not z_increases_superior, False, False)
        z, y, x = (float(s) for s in spacing_zyx)
        return Orientation((0, 1, 2), flips), (z, y, x)
    cols = np.asarray(affine, float)[:3, :3]
    # patient axis of each array axis: LPS index 2 (S) -> canonical 0, 1 (P) -> 1, 0 (L) -> 2
    patient = [int(np.argmax(np.abs(cols[:, a]))) for a in range(3)]
    if sorted(patient) != [0, 1, 2]:
        raise ValueError("affine axes are not distinct patient axes (oblique beyond 45 degrees?)")
    canon_of_axis = [2 - p for p in patient]
    p0, p1, p2 = (int(np.argsort(canon_of_axis)[c]) for c in range(3))
    perm = (p0, p1, p2)
    f0, f1, f2 = (bool(cols[patient[perm[c]], perm[c]] < 0) for c in range(3))
    s0, s1, s2 = (float(np.linalg.norm(cols[:, perm[c]])) for c in range(3))
    return Orientation(perm, (f0, f1, f2)), (s0, s1, s2)
