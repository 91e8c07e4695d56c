"""The bone-density pipeline gets one tensor: the loaded volume, on the run's device, brought to
canonical order once (MONAI's Orientation), never copied off the device; its findings equal the
array API's (`measure_bone_density` with the stored affine), the stored order kept for masks and
level slices. The positive control runs the former data flow (stored order back, a host copy,
reoriented again in `measure_bone_density`) under the same watch, and the watch catches it."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pytest
import torch

import processing.bone.measure as measure_mod
import processing.bone_density as bd_mod
from harness.phantoms import make_phantom
from processing.bone import measure_bone_density
from processing.bone.levels import CODES
from processing.bone_density import BoneDensity
from processing.loader import to_zyx_lps, volume_tensor
from processing.pipeline import SeriesFacts

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SMALL = dict(shape_yx=(160, 160), pixel_mm=2.0, slice_spacing_mm=5.0)


@lru_cache(maxsize=2)
def phantom(flipped: bool) -> tuple[np.ndarray, Any]:
    return make_phantom(**SMALL, flip_z=flipped, flip_x=flipped)


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class Watch:
    """What happens to the loaded volume during a run: copies of it off its device (`.cpu()`,
    `.numpy()` of a tensor holding its values), MONAI orientations, the orientations that
    `measure_bone_density` applies, and the tensor the science (`find_column`) is handed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, image: torch.Tensor) -> None:
        self.volumes = {_ptr(image)}
        self.off_device = 0
        self.monai_orientations = 0
        self.measure_orientations: list[Any] = []
        self.science: list[torch.Tensor] = []
        real_cpu, real_numpy = torch.Tensor.cpu, torch.Tensor.numpy

        def cpu(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.off_device += _ptr(t) in self.volumes
            return real_cpu(t, *a, **k)

        def numpy(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.off_device += _ptr(t) in self.volumes
            return real_numpy(t, *a, **k)

        def orient_image(img: Any) -> Any:
            self.monai_orientations += 1
            out = real_orient(img)
            self.volumes.add(_ptr(out))
            return out

        def canonical_orientation(*a: Any, **k: Any) -> Any:
            out = real_canonical(*a, **k)
            self.measure_orientations.append(out[0])
            return out

        def find_column(vol: torch.Tensor, *a: Any, **k: Any) -> Any:
            self.science.append(vol)
            return real_find(vol, *a, **k)

        real_orient = bd_mod.orient_image
        real_canonical = measure_mod.canonical_orientation
        real_find = measure_mod.find_column
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(torch.Tensor, "numpy", numpy)
        monkeypatch.setattr(bd_mod, "orient_image", orient_image)
        monkeypatch.setattr(measure_mod, "canonical_orientation", canonical_orientation)
        monkeypatch.setattr(measure_mod, "find_column", find_column)

    def reoriented_in_measure(self) -> bool:
        return any(o.perm != (0, 1, 2) or any(o.flips) for o in self.measure_orientations)


def _loaded(vol: np.ndarray, truth: Any, device: str) -> Any:
    attrs = {"affine": truth.affine.tolist(), "spacing": list(truth.spacing), "modality": "CT"}
    return volume_tensor(vol, attrs, "k", device=device)  # what load_series makes of a store


def _facts(vol: np.ndarray, truth: Any) -> SeriesFacts:
    return SeriesFacts("CT", vol.shape[0], vol.shape, truth.spacing, truth.spacing[0],
                       (0.0, 0.0, 1.0), True, ("ORIGINAL",), 120.0, False)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flipped", [False, True], ids=["feet-first", "head-first-mirrored"])
def test_the_science_gets_the_loaded_volume_once_on_its_device(monkeypatch, device, flipped):
    vol, truth = phantom(flipped)
    image = _loaded(vol, truth, device)
    with monkeypatch.context() as m:
        watch = Watch(m, image)
        finding = BoneDensity().run(image, _facts(vol, truth), model=None, device=image.device)
    assert finding.status == "ok"
    assert watch.monai_orientations == 1 and not watch.reoriented_in_measure()
    assert watch.off_device == 0
    (science,) = watch.science
    assert science.device == image.device and science.dtype == torch.float32
    if not flipped:  # the usual stored order: the loaded values themselves, not a copy
        assert _ptr(science) == _ptr(image)
    expected = measure_mod.canonical_orientation(truth.spacing, truth.affine)[0].to_canonical(vol)
    assert torch.equal(science.cpu(), torch.as_tensor(np.ascontiguousarray(expected)).float())

    # positive control: the former flow (stored order, a host copy, oriented again) is caught
    with monkeypatch.context() as m:
        watch = Watch(m, image)
        zyx, lps = to_zyx_lps(image)
        ref = measure_bone_density(zyx.cpu().numpy(), truth.spacing, affine=lps)  # array API
    assert watch.off_device >= 1
    assert watch.reoriented_in_measure() == flipped  # a usual order needs no second turn

    # the same findings as the array API on the CPU, masks and level slices in stored order
    assert finding.values["l1_hu"] == pytest.approx(ref.l1_hu, abs=1e-3 if device == "cpu" else 0.5)
    assert finding.levels == {n: lv.slices for n, lv in ref.levels.items()}
    for s in finding.segments:
        mask = ref.roi == CODES[s.label.split()[0]]
        assert s.mask.shape == vol.shape and (s.mask != mask).mean() < 1e-4
