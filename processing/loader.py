"""Stored series -> MONAI `MetaTensor` in HU, straight from the Zarr store (no DICOM decoding).

The store keeps a volume (z, y, x) of stored values and an affine mapping (z, y, x, 1) to the
DICOM patient frame (LPS, mm; see dicom/geometry.py). MONAI's readers give spatial axes in
(x, y, z) = (column, row, slice) order with a RAS affine; `load_series` gives the same, so a
series loaded here and the same series read from DICOM files by `LoadImage` agree voxel for
voxel and in their affines. `to_zyx_lps` goes back to the store's convention.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from core.core import Core
from core.errors import SphereError
from core.settings import Settings
from storage.series import SeriesReader

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


def check_volume(attrs: dict[str, Any]) -> None:
    """LoadError unless the series' attributes describe a single-sample image volume."""
    if not attrs.get("n_slices"):
        raise LoadError("series has no pixel data")
    if len(attrs["shape"]) != 3:
        raise LoadError("series is not a single-sample (greyscale) volume")
    if not attrs.get("affine"):
        raise LoadError("series has no patient-frame geometry")


def stored_volume(reader: SeriesReader) -> np.ndarray:
    """The stored values (z, y, x), one read of the whole array (zarr fetches chunks
    concurrently); LoadError for a series without a single-sample image volume."""
    check_volume(reader.attrs)
    return np.asarray(reader.pixels()[:])


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


def load_series(
    store: Any,
    key: str,
    *,
    device: str | torch.device | None = None,
    channel_first: bool = True,
    checksum: bool = False,
) -> MetaTensor:
    """Load the series at `key` as a float32 HU `MetaTensor` with a RAS affine.

    Shape (1, x, y, z) with `channel_first` (MONAI's convention for transforms), else
    (x, y, z) as `LoadImage(image_only=True)` gives; a strided view of the (z, y, x) volume
    (a transposing copy would cost more than the read), which `to_zyx_lps` gives back
    without a copy. Meta: affine, original_affine,
    spatial_shape, space "RAS", spacing (x, y, z), modality, storage key, and with `checksum`
    the `input_checksum` of what was read.
    """
    reader = SeriesReader(store, key)
    return volume_tensor(
        stored_volume(reader),
        reader.attrs,
        key,
        device=device,
        channel_first=channel_first,
        checksum=checksum,
    )


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


class LoadSeriesd(MapTransform):
    """MONAI dictionary transform: `d[key_field]` (a storage key) -> `d["image"]`, read from the
    store of `settings` (opened once per process, on first use)."""

    def __init__(
        self,
        settings: Settings,
        *,
        key_field: str = "storage_key",
        output: str = "image",
        device: str | None = None,
        checksum: bool = False,
    ) -> None:
        super().__init__([key_field])
        self.settings = settings
        self.key_field = key_field
        self.output = output
        self.device = device
        self.checksum = checksum
        self._store: Any = None

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        if self._store is None:
            self._store = Core(self.settings, research=True).store
        d = dict(data)
        d[self.output] = load_series(
            self._store, d[self.key_field], device=self.device, checksum=self.checksum
        )
        return d

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker opens its own store
        return {**self.__dict__, "_store": None}


class SeriesDataset(MonaiDataset):
    """A project's complete image series, one item per series, each loaded from the store by
    key when the item is read: {"storage_key", "series_uid", "study_uid", "image", ...}.

    Given a server's URL instead of settings, `SeriesDataset("https://host", project,
    token=...)`, the same items come through `sphere serve` (role-checked, audited, no store
    or vault beside it): a `processing.remote.RemoteSeriesDataset`."""

    def __new__(
        cls, settings: Settings | str, project: str, *, token: str | None = None, **kw: Any
    ) -> Any:
        if isinstance(settings, Settings):
            return super().__new__(cls)
        if not isinstance(settings, str) or not settings.startswith(("http://", "https://")):
            raise SphereError("SeriesDataset takes Settings or a server's http(s):// URL")
        if not token:
            raise SphereError("a dataset over HTTP needs token= (`sphere user token NAME`)")
        from processing.remote import RemoteSeriesDataset  # it imports this module

        return RemoteSeriesDataset(settings, project, token, **kw)

    def __init__(
        self,
        settings: Settings | str,
        project: str,
        *,
        token: str | None = None,
        transform: Any = None,
        modality: str | None = "CT",
        device: str | None = None,
    ) -> None:
        assert isinstance(settings, Settings)  # a URL made a RemoteSeriesDataset in __new__
        with Core(settings, research=True) as core:
            p = core.project(project)
            rows = core.catalog.series(p.id, status="complete")
        items = [
            {
                "storage_key": r.storage_key,
                "series_uid": r.series_uid,
                "study_uid": r.study_uid,
                "modality": r.modality,
            }
            for r in rows
            if r.storage_key and (modality is None or r.modality == modality)
        ]
        load = LoadSeriesd(settings, device=device)
        super().__init__(items, transform=Compose([load, transform]) if transform else load)


def _per_slice(value: float | Sequence[float], n: int) -> list[float]:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise LoadError("per-slice rescale values do not match the slice count")
        return [float(v) for v in value]
    return [float(cast(float, value))] * n  # a scalar: lists went above
