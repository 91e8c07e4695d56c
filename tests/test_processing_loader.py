"""The Zarr loader gives what MONAI's LoadImage gives from the same series as DICOM files:
voxels in HU and an affine that place every voxel at the same RAS point, whatever the row
direction or slice order; and back to the store's (z, y, x) LPS convention exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import EnsureChannelFirst, LoadImage

from core.core import Core
from core.settings import Settings
from processing.loader import (
    LoadError,
    SeriesDataset,
    input_checksum,
    lps_affine,
    ras_affine,
    to_hu,
    to_zyx_lps,
)
from processing.loader import load_series as load
from storage.series import SeriesReader
from tests.processing_data import (
    body_volume,
    ct_series,
    new_project,
    store_series,
    write_files,
)

ORIENTATIONS = {
    "plain": {},
    "rows-to-right": {"flip_rows": True},
    "head-first-numbering": {"descending": True},
    "both": {"flip_rows": True, "descending": True},
}


def world(image) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and affine with every axis made to run toward +RAS: one physical layout."""
    a = image.affine.numpy().copy()
    t = image.as_tensor()
    for ax in range(3):
        col = a[:3, ax]
        if col[np.argmax(np.abs(col))] < 0:
            t = t.flip(ax + 1)
            a[:3, 3] += col * (t.shape[ax + 1] - 1)
            a[:3, ax] = -col
    return t.numpy(), a


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    base = tmp_path_factory.mktemp("loader")
    settings = Settings(home=base, fsync=False)
    new_project(settings, "load")
    return settings


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_loader_matches_loadimage_on_the_same_dicom_files(home, tmp_path, name):
    vol = body_volume(seed=3)
    kw = ORIENTATIONS[name]
    key = store_series(home, "load", ct_series(vol, seed=len(name), **kw), tmp_path / "spool")
    folder = write_files(ct_series(vol, seed=len(name), **kw), tmp_path / "files")
    ref = EnsureChannelFirst()(LoadImage(reader="PydicomReader", image_only=True)(str(folder)))
    with Core(home) as core:
        img = load(core.store, key)
    assert img.dtype == torch.float32 and img.shape == ref.shape
    assert img.meta["space"] == "RAS"
    ours, ours_affine = world(img)
    theirs, their_affine = world(ref)
    np.testing.assert_allclose(ours_affine, their_affine, atol=1e-6)
    np.testing.assert_array_equal(ours, theirs)  # HU: rescale applied identically
    # The physical content: the marker (700 HU + z ramp) sits right, anterior, inferior.
    assert ours.max() > 650 and np.array_equal(np.sort(ours.ravel()), np.sort(vol.ravel()))


def test_round_trip_to_the_stores_convention(home, tmp_path):
    vol = body_volume(seed=5)
    key = store_series(home, "load", ct_series(vol, seed=50, flip_rows=True), tmp_path / "s")
    with Core(home) as core:
        img = load(core.store, key, channel_first=False)
        reader = SeriesReader(core.store, key)
        stored = reader.volume[:]
        affine = np.asarray(reader.attrs["affine"])
    zyx, lps = to_zyx_lps(img)
    np.testing.assert_array_equal(zyx.numpy(), stored.astype(np.float32) - 1024.0)
    np.testing.assert_allclose(lps, affine)
    np.testing.assert_allclose(lps_affine(ras_affine(affine)), affine)


def test_hu_conversion_per_slice_and_on_a_device():
    stored = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    hu = to_hu(stored, [1.0, 2.0], [-1024.0, -1000.0], device="cpu")
    np.testing.assert_array_equal(hu[0].numpy(), stored[0] - 1024.0)
    np.testing.assert_array_equal(hu[1].numpy(), stored[1] * 2.0 - 1000.0)
    with pytest.raises(LoadError, match="per-slice"):
        to_hu(stored, [1.0, 2.0, 3.0], 0.0)


def test_checksum_follows_the_values_not_the_encoding():
    attrs = {"shape": [2, 3, 4], "affine": [[1.0]]}
    a = np.zeros((2, 3, 4), np.int16)
    b = a.copy()
    b[1, 2, 3] = 1
    assert input_checksum(attrs, a) == input_checksum(attrs, a.copy(order="F"))
    assert input_checksum(attrs, a) != input_checksum(attrs, b)
    assert input_checksum(attrs, a) != input_checksum({**attrs, "affine": [[2.0]]}, a)


def test_dataset_streams_a_projects_ct_series_by_key(tmp_path):
    settings = Settings(home=tmp_path, fsync=False)
    new_project(settings, "ds")
    for seed in (1, 2):
        store_series(settings, "ds", ct_series(body_volume(seed=seed), seed=seed), tmp_path / "s")
    store_series(settings, "ds", ct_series(body_volume(), seed=9, modality="MR"), tmp_path / "s")
    data = SeriesDataset(settings, "ds")
    assert len(data) == 2
    item = data[1]
    assert item["image"].shape == (1, 40, 48, 12)
    assert item["image"].meta["storage_key"] == item["storage_key"]
    assert len(SeriesDataset(settings, "ds", modality=None)) == 3
