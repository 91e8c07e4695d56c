"""Stored series -> MONAI `MetaTensor` in HU, straight from the Zarr store (no DICOM decoding).

The store keeps a volume (z, y, x) of stored values and an affine mapping (z, y, x, 1) to the
DICOM patient frame (LPS, mm; see dicom/geometry.py). MONAI's readers give spatial axes in
(x, y, z) = (column, row, slice) order with a RAS affine; `load_series` gives the same, so a
series loaded here and the same series read from DICOM files by `LoadImage` agree voxel for
voxel and in their affines. `to_zyx_lps` goes back to the store's convention.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import Dataset as MonaiDataset
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from core.core import Core
from core.errors import SphereError
from core.settings import Settings
from processing.tensor import (  # noqa: F401 - re-exported: callers import them from here
    LOAD_ATTRS,
    LPS_TO_RAS,
    XYZ_TO_ZYX,
    LoadError,
    input_checksum,
    lps_affine,
    ras_affine,
    to_hu,
    to_zyx_lps,
    volume_tensor,
)
from storage.series import SeriesReader


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
