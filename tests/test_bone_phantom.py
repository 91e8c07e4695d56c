"""The bone phantom: geometry, ground truth and options are what they claim to be."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from harness.phantoms import LEVEL_CODES, PhantomSpec, make_phantom

SMALL = dict(shape_yx=(200, 200), pixel_mm=1.6, slice_spacing_mm=2.5)


@lru_cache(maxsize=6)
def phantom(**kw):
    return make_phantom(**{**SMALL, **kw})


def _interior_mean(vol, truth, name):
    """Mean HU of the central, anterior part of a body's label at mid-height (avoids the vein)."""
    a, b = truth.z_slices[name]
    k = (a + b) // 2
    m = truth.labels[k] == LEVEL_CODES[name]
    yy, xx = np.nonzero(m)
    cy, cx = yy.mean(), xx.mean()
    core = (np.abs(yy - cy + 3) <= 3) & (np.abs(xx - cx) <= 4)
    return float(vol[k][yy[core], xx[core]].mean())


def test_shape_dtype_and_conventions():
    vol, t = phantom()
    assert vol.dtype == np.int16 and vol.ndim == 3
    assert t.spacing == (2.5, 1.6, 1.6)
    assert t.z_increases_superior
    # affine: axis 0 -> +z (superior), axis 1 -> +y (posterior), axis 2 -> +x (left)
    assert t.affine[2, 0] == 2.5 and t.affine[1, 1] == 1.6 and t.affine[0, 2] == 1.6
    # levels run upward: L5 below L1 below T12 below T10
    order = [t.z_slices[n][0] for n in ("L5", "L1", "T12", "T10")]
    assert order == sorted(order)
    assert vol.min() == -1024 or vol.min() < -900  # air outside the body
    assert t.l1_measurable and t.l1_reason == ""
    assert t.lowest_rib_level == "T12" and t.sacrum_in_field


def test_labels_match_recorded_slices():
    vol, t = phantom()
    for name, (a, b) in t.z_slices.items():
        zs = np.nonzero((t.labels == LEVEL_CODES[name]).any((1, 2)))[0]
        assert zs.min() == a and zs.max() + 1 == b, name


@pytest.mark.parametrize("hu", [55.0, 150.0, 245.0])
def test_trabecular_hu_is_what_truth_says(hu):
    vol, t = phantom(trabecular_hu=hu, noise_sd=5.0, seed=3)
    assert t.l1_hu == hu
    for name in ("T12", "L1", "L2", "L3"):
        assert abs(_interior_mean(vol, t, name) - t.trabecular_hu[name]) < 3.0, name


def test_per_level_hu_dict():
    names = ["L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8"]
    hus = {n: 60.0 + 20 * i for i, n in enumerate(names)}
    vol, t = make_phantom(**SMALL, trabecular_hu=hus, noise_sd=5.0, seed=3)
    assert t.l1_hu == 140.0
    assert abs(_interior_mean(vol, t, "L1") - 140.0) < 3.0
    # the check can fail: the next level up reads 20 HU higher
    assert abs(_interior_mean(vol, t, "T12") - 140.0) > 15.0


def test_noise_level():
    vol, t = phantom(noise_sd=20.0, seed=1)
    k = vol.shape[0] // 2
    patch = vol[k, 80:100, 60:80].astype(float)  # soft tissue, anterior left
    assert 16.0 < patch.std() < 24.0 and abs(patch.mean() - 40.0) < 8.0


@pytest.mark.parametrize("pairs,lowest", [(11, "T11"), (12, "T12"), (13, "L1")])
def test_rib_pairs_shift_the_lowest_rib(pairs, lowest):
    vol, t = phantom(rib_pairs=pairs)
    assert t.rib_pairs == pairs and t.lowest_rib_level == lowest
    assert t.l1_measurable == (pairs == 12)
    # bone just right of L1's body (where a rib head sits) only when L1 bears a rib
    a, b = t.z_slices["L1"]
    beside = vol[a:b, 115:135, 78:85] > 300
    assert beside.any() == (pairs == 13)


def test_fov_cut_fracture_metal_contrast():
    _, cut = phantom(fov="cut_l1_top")
    assert not cut.l1_measurable and "cut" in cut.l1_reason and cut.cut_by_fov["L1"]
    assert "T12" not in cut.z_slices
    _, cut2 = phantom(fov="cut_l1_bottom")
    assert not cut2.sacrum_in_field and cut2.cut_by_fov["L1"]
    vol, fr = phantom(fracture_l1=True)
    h = {n: b - a for n, (a, b) in fr.z_slices.items()}
    assert h["L1"] < 0.7 * min(h["T12"], h["L2"]) and fr.fractured == ["L1"]
    assert not fr.l1_measurable
    vol, me = phantom(metal_l1=True)
    a, b = me.z_slices["L1"]
    assert vol[a:b].max() >= 2500 and not me.l1_measurable
    plain, _ = phantom()
    assert plain.max() < 2000
    vol, _ = phantom(contrast_hu=200.0)
    assert vol[:, 102:110, 107:115].mean() > plain[:, 102:110, 107:115].mean() + 150  # aorta


@pytest.mark.parametrize("flips", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)])
def test_flips_return_flipped_array_and_matching_affine(flips):
    vol, t = phantom()
    fz, fy, fx = flips
    vol2, t2 = phantom(flip_z=bool(fz), flip_y=bool(fy), flip_x=bool(fx))
    axes = [i for i, f in enumerate(flips) if f]
    assert np.array_equal(vol2, np.flip(vol, axes))
    assert np.array_equal(t2.labels, np.flip(t.labels, axes))
    assert t2.z_increases_superior == (not fz)
    # the same voxel maps to the same patient point
    idx = np.array([5, 17, 33])
    idx2 = np.where(flips, np.array(vol.shape) - 1 - idx, idx)
    p1 = t.affine @ np.r_[idx, 1]
    p2 = t2.affine @ np.r_[idx2, 1]
    assert np.allclose(p1, p2)
    a, b = t2.z_slices["L1"]
    assert (t2.labels[a:b] == LEVEL_CODES["L1"]).any()


def test_thick_slices_average_partial_volume():
    thick, t = phantom(slice_spacing_mm=5.0, noise_sd=0.0)
    assert t.spacing[0] == 5.0
    # without noise, values between disc (80) and endplate cortex (700) can only come from
    # averaging over the slice thickness
    body = thick[:, 110:135, 95:105].astype(float)
    assert ((body > 250) & (body < 600)).any()


def test_spec_object():
    spec = PhantomSpec(shape_yx=(256, 256), pixel_mm=1.3, slice_spacing_mm=2.0, seed=9)
    vol, t = make_phantom(spec)
    assert vol.shape[1:] == (256, 256) and t.l1_measurable


def test_psf_blurs_edges_only():
    sharp, t = phantom(noise_sd=0.0)
    soft, _ = phantom(noise_sd=0.0, psf_fwhm_mm=1.5)
    a, b = t.z_slices["L1"]
    k = (a + b) // 2
    assert soft[k].max() < sharp[k].max()  # thin cortex loses its peak
    assert abs(_interior_mean(soft, t, "L1") - t.l1_hu) < 3.0  # the interior keeps its HU


def _turn_deg(truth, name):
    """The in-plane angle of a body's long (left-right) axis at mid-height, degrees."""
    a, b = truth.z_slices[name]
    yy, xx = np.nonzero(truth.labels[(a + b) // 2] == LEVEL_CODES[name])
    c = np.cov(np.stack([xx, yy]).astype(float))
    return float(np.degrees(0.5 * np.arctan2(2 * c[0, 1], c[0, 0] - c[1, 1])))


def test_rotation_turns_the_vertebrae_most_at_the_apex():
    _, flat = phantom(scoliosis_mm=25.0)
    _, turned = phantom(scoliosis_mm=25.0, rotation_deg=20.0)
    _, back = phantom(scoliosis_mm=25.0, rotation_deg=-20.0)
    assert all(abs(_turn_deg(flat, n)) < 1.5 for n in ("L3", "L1", "T11"))
    # little at the bottom of the curve, most at its apex (T12-L1), less above it
    angles = [_turn_deg(turned, n) for n in ("L5", "L3", "T12", "T10")]
    assert angles[0] < 5.0 < angles[1] < angles[2] and 15.0 < angles[2] <= 21.0, angles
    assert angles[3] < angles[2]
    assert abs(_turn_deg(back, "T12") + angles[2]) < 1.5  # the other way
    assert turned.labels.max() == flat.labels.max() and turned.l1_measurable
