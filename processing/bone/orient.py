"""Orientation: bring any axial volume to canonical (S, P, L) order (HU: `processing.tensor.to_hu`).

A loaded image (processing.loader, a (1, x, y, z) RAS `MetaTensor` on its device) is brought to
canonical order once, by MONAI's `Orientation` (`orient_image`); what the science makes in that
order goes back to the stored (z, y, x) order by the same transform's inverse (`to_stored`).
Plain arrays with an affine use `canonical_orientation`, which picks the same axes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation as MonaiOrientation

# Canonical axes as MONAI axis codes (RAS labels): 0 toward superior, 1 posterior, 2 left.
CANONICAL = "SPL"
_ORIENT = MonaiOrientation(axcodes=CANONICAL, labels=(("L", "R"), ("P", "A"), ("I", "S")))
A = TypeVar("A", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Orientation:
    """How the input's axes map onto canonical ones: canonical = flip(transpose(input, perm))."""

    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]  # per canonical axis, after the transpose

    def to_canonical(self, a: A) -> A:
        """A view where it can be (a tensor stays on its device; torch copies to flip)."""
        axes = tuple(i for i, f in enumerate(self.flips) if f)
        if isinstance(a, torch.Tensor):
            t = a.permute(self.perm)
            return t.flip(axes) if axes else t
        return np.flip(np.transpose(a, self.perm), axes)

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


def orient_image(image: MetaTensor) -> MetaTensor:
    """A loaded (1, x, y, z) RAS image in canonical (1, S, P, L) order, on its own device.

    The loader's image is a transposed view of the stored (z, y, x) values; for slices stored
    from the feet up (rows posterior, columns left, as CT usually is) this gives those values
    back without a copy; otherwise one flip on the device.
    """
    return cast(MetaTensor, _ORIENT(image))  # a MetaTensor in, a MetaTensor out


def to_stored(canonical: np.ndarray, oriented: MetaTensor) -> np.ndarray:
    """An array made on the canonical grid of `oriented` (an `orient_image` output), in the
    stored (z, y, x) order of the image it came from (MONAI's inverse of that orientation)."""
    mt = MetaTensor(
        torch.as_tensor(canonical)[None],
        meta=dict(oriented.meta),
        applied_operations=list(oriented.applied_operations),
    )
    xyz = cast(MetaTensor, _ORIENT.inverse(mt)).as_tensor()[0]
    return np.ascontiguousarray(xyz.permute(2, 1, 0).numpy())


def canonical_spacing(oriented: MetaTensor) -> tuple[float, float, float]:
    """The (S, P, L) voxel size of an `orient_image` output, mm."""
    cols = oriented.affine.cpu().numpy()[:3, :3]
    s0, s1, s2 = (float(np.linalg.norm(cols[:, a])) for a in range(3))
    return s0, s1, s2


def stored_runs_up(image: MetaTensor) -> bool:
    """Whether the stored slices of a loaded image run toward the head (axial: the stored
    z axis is the patient's S-I axis, RAS row 2 of the affine's z column)."""
    z = image.affine.cpu().numpy()[:3, 2]
    if int(np.argmax(np.abs(z))) != 2:
        raise ValueError("the stored slices are not axial")
    return bool(z[2] > 0)
