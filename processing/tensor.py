"""A series' stored values and attributes -> MONAI `MetaTensor` in HU with a RAS affine,
wherever they were read: the store (`processing.loader`) or the server (`processing.remote`).

The store keeps a volume (z, y, x) of stored values and an affine mapping (z, y, x, 1) to the
DICOM patient frame (LPS, mm; see dicom/geometry.py). MONAI's readers give spatial axes in
(x, y, z) = (column, row, slice) order with a RAS affine; `volume_tensor` gives the same.
`to_zyx_lps` goes back to the store's convention.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.data import MetaTensor

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Index (x, y, z, 1) -> index (z, y, x, 1).
XYZ_TO_ZYX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_GEOMETRY_ATTRS = ("shape", "dtype", "spacing", "affine", "rescale_slope", "rescale_intercept")
# What `volume_tensor` reads of a series' attributes: all a remote loader is sent.
LOAD_ATTRS = (*_GEOMETRY_ATTRS, "modality", "uniform_spacing", "n_slices")


class LoadError(ValueError):
    """The series cannot be loaded as one HU volume (no PHI in the message)."""


def ras_affine(lps_zyx_affine: Any) -> np.ndarray:
    """The MONAI affine (index (x, y, z, 1) -> RAS mm) of a stored (z, y, x) -> LPS affine."""
    return LPS_TO_RAS @ np.asarray(lps_zyx_affine, dtype=np.float64) @ XYZ_TO_ZYX


def lps_affine(ras_xyz_affine: Any) -> np.ndarray:
    """Inverse of `ras_affine`: back to the store's (z, y, x) -> LPS affine."""
    a = np.asarray(ras_xyz_affine, dtype=np.float64)
    return LPS_TO_RAS @ a @ XYZ_TO_ZYX  # both factors are their own inverses


def input_checksum(attrs: dict[str, Any], stored: np.ndarray) -> str:
    """sha256 of the decoded stored values and the geometry/rescale attributes: the same for
    the same data however it was compressed or sharded."""
    h = hashlib.sha256()
    h.update(json.dumps({k: attrs.get(k) for k in _GEOMETRY_ATTRS}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(stored).data.cast("B"))
    return h.hexdigest()


def to_hu(
    stored: np.ndarray | torch.Tensor,
    slope: float | Sequence[float],
    intercept: float | Sequence[float],
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """float32 HU (z, y, x) = stored * slope + intercept, computed on `device`; per-slice
    slopes and intercepts (lists) are applied slice by slice. The stored integers travel to
    the device before the conversion: half the bytes of float32."""
    t = torch.as_tensor(stored)
    if device is not None:
        t = t.to(device, non_blocking=True)
    hu = t.to(torch.float32)
    if isinstance(slope, list | tuple) or isinstance(intercept, list | tuple):
        n = hu.shape[0]
        s = torch.as_tensor(_per_slice(slope, n), dtype=torch.float32, device=hu.device)
        b = torch.as_tensor(_per_slice(intercept, n), dtype=torch.float32, device=hu.device)
        return hu * s[:, None, None] + b[:, None, None]
    scale, offset = cast(float, slope), cast(float, intercept)  # scalars: lists went above
    if scale != 1.0:
        hu *= float(scale)
    if offset != 0.0:
        hu += float(offset)
    return hu


def volume_tensor(
    stored: np.ndarray,
    attrs: dict[str, Any],
    key: str,
    *,
    device: str | torch.device | None = None,
    channel_first: bool = True,
    checksum: bool = False,
) -> MetaTensor:
    """The `MetaTensor` of `load_series` from the stored values (z, y, x) and the series'
    attributes, wherever they were read (the store, or the server: processing.remote)."""
    hu = to_hu(stored, attrs.get("rescale_slope", 1.0), attrs.get("rescale_intercept", 0.0), device)
    xyz = hu.permute(2, 1, 0)  # a view: (z, y, x) stays the memory order, no copy
    if channel_first:
        xyz = xyz[None]
    affine = torch.as_tensor(ras_affine(attrs["affine"]), dtype=torch.float64)
    sz, sy, sx = attrs["spacing"]
    meta: dict[str, Any] = {
        "affine": affine,
        "original_affine": affine.clone(),
        "spatial_shape": np.array(xyz.shape[-3:]),
        "space": "RAS",
        "spacing": np.array([sx, sy, sz], dtype=np.float64),
        "original_channel_dim": float("nan") if channel_first else "no_channel",
        "filename_or_obj": key,
        "storage_key": key,
        "modality": attrs.get("modality"),
        "uniform_spacing": attrs.get("uniform_spacing"),
    }
    if checksum:
        meta["input_checksum"] = input_checksum(attrs, stored)
    return MetaTensor(xyz, meta=meta)


def to_zyx_lps(image: MetaTensor) -> tuple[torch.Tensor, np.ndarray]:
    """A (1, x, y, z) or (x, y, z) RAS image as the store's convention: (z, y, x) values and
    the (z, y, x) -> LPS affine."""
    t = image.as_tensor()
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise LoadError("expected one channel")
        t = t[0]
    return t.permute(2, 1, 0), lps_affine(image.affine.cpu().numpy())


def _per_slice(value: float | Sequence[float], n: int) -> list[float]:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise LoadError("per-slice rescale values do not match the slice count")
        return [float(v) for v in value]
    return [float(cast(float, value))] * n  # a scalar: lists went above
