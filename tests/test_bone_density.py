"""Bone density from phantoms: L1 found or refused (never mislabelled), HU accurate, invariant."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from harness.phantoms import LEVEL_CODES, make_phantom
from processing.bone import (
    ScanFacts,
    Thresholds,
    classify,
    measure_bone_density,
    to_hu,
)
from processing.bone.levels import CODES, Rib, assign_levels
from processing.bone.measure import _header_flags
from processing.bone.orient import canonical_orientation
from processing.bone.segment import Segment, find_column, split_bodies, square_max

SMALL = dict(shape_yx=(200, 200), pixel_mm=1.6, slice_spacing_mm=2.5)


@lru_cache(maxsize=6)
def case(**kw):
    vol, truth = make_phantom(**{**SMALL, **kw})
    return vol, truth, measure_bone_density(vol, truth.spacing, affine=truth.affine)


def assert_not_mislabelled(truth, rep):
    """Measurable means the measured L1 is the true L1; otherwise a reason is given."""
    if rep.measurable:
        a, b = rep.levels["L1"].slices
        ta, tb = truth.z_slices["L1"]
        assert abs(a - ta) <= 1 and abs(b - tb) <= 1, (rep.levels["L1"], truth.z_slices["L1"])
        assert rep.reason == ""
    else:
        assert rep.reason and rep.l1_hu is None and rep.bone_class is None


# --- accuracy --------------------------------------------------------------------------------

FINE: dict = {}  # SMALL's 1.6 mm pixels
COARSE = dict(shape_yx=(160, 160), pixel_mm=2.0)  # a 320 mm field on 2 mm pixels: a 1.5 mm
# cortex is only partial volume there, and the bodies must still be found
# a contrast-filled aorta as bright as cortex, in front of the spine: it must not take the track
ARTERIAL = dict(contrast_hu=400.0)
LEAN = dict(fat_mm=10.0, width_scale=0.9)
OBESE = dict(fat_mm=60.0, width_scale=1.2)  # 436 mm wide: the body overflows the 320 mm field
ACCURACY = [  # (options beyond SMALL, slice spacing, noise, trabecular HU, seed, allowed L1 error)
    (FINE, 1.25, 20.0, 150.0, 0, 5.0),
    (FINE, 0.625, 15.0, 80.0, 1, 5.0),
    (FINE, 3.0, 20.0, 120.0, 3, 10.0),
    (FINE, 5.0, 25.0, 60.0, 4, 10.0),
    (FINE, 5.0, 20.0, 200.0, 5, 10.0),
    (COARSE, 3.0, 20.0, 150.0, 0, 10.0),
    (COARSE, 3.0, 20.0, 100.0, 1, 10.0),
    (COARSE, 1.25, 20.0, 180.0, 0, 5.0),
    (ARTERIAL, 2.5, 15.0, 130.0, 0, 10.0),
    (dict(contrast_hu=500.0), 1.25, 15.0, 170.0, 1, 5.0),
    (LEAN, 2.5, 15.0, 125.0, 2, 10.0),
    (OBESE, 2.5, 20.0, 175.0, 3, 10.0),
    (dict(OBESE, contrast_hu=400.0), 1.25, 20.0, 90.0, 4, 5.0),
    (dict(scoliosis_mm=30.0), 2.5, 20.0, 140.0, 5, 10.0),
    (dict(scoliosis_mm=-40.0), 1.25, 15.0, 190.0, 6, 5.0),
    (dict(scoliosis_mm=20.0, contrast_hu=300.0), 1.25, 15.0, 70.0, 7, 5.0),
    # scoliotic vertebrae turn too: the ROI and its vein exclusion must follow the body
    (dict(scoliosis_mm=30.0, rotation_deg=25.0), 2.5, 20.0, 140.0, 8, 10.0),
    (dict(scoliosis_mm=-25.0, rotation_deg=-20.0, contrast_hu=300.0), 1.25, 15.0, 100.0, 9, 5.0),
    # 5 mm slices: the lowest ribs step diagonally from slice to slice and must stay one rib
    (
        dict(scoliosis_mm=24.8, rotation_deg=17.6, cortical_hu=750.0, fat_mm=16.0, width_scale=0.9),
        5.0,
        18.4,
        98.7,
        9,
        10.0,
    ),
    (
        dict(scoliosis_mm=-8.7, rotation_deg=-13.0, cortical_hu=851.0, contrast_hu=400.0),
        5.0,
        23.8,
        122.4,
        141,
        10.0,
    ),
]


@pytest.mark.parametrize("r", [0, 1, 2, 3, 7, 12])
def test_square_max_is_max_pool2d(r):
    """The running max that opens and closes the masks gives max_pool2d's very values (a window
    2r + 1 wide, stride 1, out-of-range ignored), on masks and on values, at the borders too.
    Control: a window one wider differs."""
    g = torch.Generator().manual_seed(r)
    for shape in ((4, 1, 33, 41), (2, 1, 7, 30)):
        x = (torch.rand(shape, generator=g) > 0.8).float() * torch.rand(shape, generator=g)
        want = torch.nn.functional.max_pool2d(x, 2 * r + 1, 1, r)
        assert torch.equal(square_max(x, r), want), shape
        assert not torch.equal(square_max(x, r + 1), want), shape


@pytest.mark.parametrize("more,sz,noise,hu,seed,tol", ACCURACY)
def test_l1_found_and_accurate(more, sz, noise, hu, seed, tol):
    vol, truth, rep = case(**more, slice_spacing_mm=sz, noise_sd=noise, trabecular_hu=hu, seed=seed)
    assert truth.l1_measurable
    assert rep.measurable, rep.reason
    assert_not_mislabelled(truth, rep)
    assert abs(rep.l1_hu - truth.l1_hu) <= tol
    assert rep.bone_class == classify(truth.l1_hu)
    assert rep.lowest_rib_level == "T12" and rep.sacrum_found
    for name in ("T12", "L2", "L3", "L4"):
        lv = rep.levels[name]
        assert abs(lv.mean_hu - truth.trabecular_hu[name]) <= tol, name
        assert abs(lv.median_hu - truth.trabecular_hu[name]) <= tol + 1, name
        assert lv.n_voxels > 0 and lv.sd_hu > 0
    l1 = rep.levels["L1"]
    assert 120.0 <= l1.roi_area_mm2 <= 260.0
    assert abs(l1.sd_hu - noise) < 0.35 * noise  # the ROI holds trabecular bone only


def test_realistic_resolution():
    vol, truth, rep = case(
        shape_yx=(380, 380),
        pixel_mm=0.85,
        slice_spacing_mm=1.25,
        noise_sd=20.0,
        seed=7,
        fov_mm=(-15.0, 230.0),
        psf_fwhm_mm=0.8,
    )
    assert rep.measurable, rep.reason
    assert abs(rep.l1_hu - truth.l1_hu) <= 5.0
    assert_not_mislabelled(truth, rep)


@pytest.mark.parametrize("turn", [0.0, 30.0, -30.0])
def test_roi_misses_cortex_and_vein_of_a_turned_body(turn):
    """Noise-free: every ROI voxel is trabecular bone (SD 0, mean exact to the int16 rounding),
    whichever way the body is turned, though the vein (70 HU below it) is in the slab."""
    vol, truth, rep = case(
        shape_yx=(320, 320), pixel_mm=1.0, slice_spacing_mm=1.25, noise_sd=0.0,
        scoliosis_mm=30.0, rotation_deg=turn, trabecular_hu=150.0,
    )  # fmt: skip
    assert rep.measurable, rep.reason
    l1 = rep.levels["L1"]
    a, b = l1.slices
    body = vol[a:b][truth.labels[a:b] == LEVEL_CODES["L1"]]
    assert (body == 80).sum() > 100  # the vein is there to be caught (control)
    assert l1.sd_hu == 0.0 and abs(l1.mean_hu - 150.0) < 0.5 and l1.roi_area_mm2 > 150


def test_wrong_level_would_be_caught():
    """Per-level HU 20 apart: a one-level slip moves the L1 reading by >= 15 HU."""
    names = ["L5", "L4", "L3", "L2", "L1", "T12", "T11", "T10", "T9", "T8"]
    hus = {n: 60.0 + 20 * i for i, n in enumerate(names)}
    vol, truth = make_phantom(**SMALL, trabecular_hu=hus, noise_sd=15.0, seed=11)
    rep = measure_bone_density(vol, truth.spacing, affine=truth.affine)
    assert rep.measurable
    assert abs(rep.l1_hu - hus["L1"]) <= 5.0
    for wrong in ("T12", "L2"):
        assert abs(rep.levels[wrong].mean_hu - hus["L1"]) >= 15.0


# --- never mislabel --------------------------------------------------------------------------

REFUSALS = [  # phantom options, and words the reason must contain
    # the track once took the aorta at the sacrum: L5 merged into it, and 11 rib pairs passed
    (dict(ARTERIAL, rib_pairs=11, noise_sd=20.0), "transitional"),
    (dict(ARTERIAL, rib_pairs=11, noise_sd=20.0, seed=1), "transitional"),
    (dict(OBESE, rib_pairs=13, noise_sd=20.0), "transitional"),
    (dict(scoliosis_mm=25.0, rib_pairs=11, noise_sd=20.0), "transitional"),
    (dict(rib_pairs=11), "transitional"),
    (dict(rib_pairs=13), "transitional"),
    (dict(rib_pairs=13, slice_spacing_mm=5.0, noise_sd=25.0), "transitional"),
    (dict(rib_pairs=11, seed=4, flip_z=True), "transitional"),
    (dict(fov="cut_l1_top"), "field of view"),
    (dict(fov="cut_l1_bottom"), "field of view"),
    (dict(fov_mm=(15.0, 250.0)), "sacrum"),
    (dict(fracture_l1=True), "Genant grade 3"),  # heights read on slices up to 3 mm
    (dict(fracture_l1=True, slice_spacing_mm=5.0, seed=2), "collapsed"),  # thicker: the wall
    (dict(metal_l1=True), "metal"),
    (dict(COARSE, rib_pairs=13, slice_spacing_mm=3.0, noise_sd=20.0), "transitional"),
    (dict(COARSE, fracture_l1=True, slice_spacing_mm=3.0, seed=1), "Genant grade 3"),
]


@pytest.mark.parametrize("opts,words", REFUSALS)
def test_refuses_when_unsure(opts, words):
    vol, truth, rep = case(**opts)
    assert not truth.l1_measurable
    assert not rep.measurable
    assert words in rep.reason, rep.reason
    assert_not_mislabelled(truth, rep)


@pytest.mark.parametrize("seed", range(4))
def test_seeds_never_mislabel(seed):
    rng = np.random.default_rng(100 + seed)
    opts = dict(
        seed=seed,
        trabecular_hu=float(rng.uniform(50, 250)),
        noise_sd=float(rng.uniform(5, 25)),
        cortical_hu=float(rng.uniform(500, 900)),
        slice_spacing_mm=float(rng.choice([1.25, 2.5, 5.0])),
        rib_pairs=int(rng.choice([11, 12, 13])),
        contrast_hu=float(rng.choice([0.0, 200.0, 400.0])),
        fat_mm=float(rng.uniform(10, 60)),
        width_scale=float(rng.uniform(0.9, 1.2)),
        scoliosis_mm=float(rng.uniform(-30, 30)),
        rotation_deg=float(rng.uniform(-25, 25)),
    )
    vol, truth, rep = case(**opts)
    assert_not_mislabelled(truth, rep)
    assert rep.measurable == truth.l1_measurable, (opts, rep.reason)
    if rep.measurable:
        assert abs(rep.l1_hu - truth.l1_hu) <= 10.0 and rep.bone_class == classify(truth.l1_hu)


def _column(**kw):
    vol, truth = make_phantom(**{**SMALL, **kw})
    orient, spacing = canonical_orientation(truth.spacing, truth.affine, True)
    can = torch.as_tensor(np.ascontiguousarray(orient.to_canonical(vol))).float()
    return find_column(can, spacing, 300.0), spacing


@pytest.mark.parametrize("sz", [3.75, 4.0, 5.0])
def test_every_false_disc_in_a_lumbar_body_is_flagged(sz):
    """A wall that vanishes for one slice anywhere inside L1-L4 splits the body in two; the
    extra vertebra must be flagged (then refused), wherever the false disc falls."""
    col, spacing = _column(slice_spacing_mm=sz, rib_pairs=13)
    segs = split_bodies(col, spacing)
    assert not any(s.split for s in segs)  # control: the sound column has no split
    tried = 0
    for s in segs[1:5]:
        for z in range(s.z0 + 1, s.z1 - 1):
            wall = col.wall.copy()
            col.wall[z] = 0.1
            pieces = split_bodies(col, spacing)
            col.wall = wall
            if len(pieces) > len(segs):
                tried += 1
                assert any(p.split for p in pieces), (sz, z)
    assert tried >= 4


def test_a_collapsed_body_is_not_taken_for_a_split():
    col, spacing = _column(fracture_l1=True, slice_spacing_mm=2.5)
    assert not any(s.split for s in split_bodies(col, spacing))


def test_cross_check_logic():
    """The two ways to L1 must agree; each disagreement is refused."""
    segs = [Segment(10 * i, 10 * i + 8, 20.0, 10 * i + 4.0, False) for i in range(9)]

    def ribs_on(i):
        return [Rib(10 * j + 6.0, s, 120.0, j) for j in range(i, 9) for s in (-1, 1)]

    ok = assign_levels(segs, ribs_on(6), sacrum=0)
    assert ok.l1 == 5 and ok.names[5] == "L1" and ok.names[6] == "T12" and ok.names[0] == "S"
    for lowest in (5, 7):  # 13 and 11 rib pairs
        bad = assign_levels(segs, ribs_on(lowest), sacrum=0)
        assert bad.l1 is None and "transitional" in bad.reason
    assert "sacrum" in assign_levels(segs, ribs_on(6), sacrum=None).reason
    # a rib missed on one side counts where the sacrum checks the count, not from ribs alone
    one_side = [r for r in ribs_on(6) if not (r.segment == 6 and r.side == 1)]
    assert assign_levels(segs, one_side, sacrum=0).l1 == 5
    alone = assign_levels(
        segs[1:], [Rib(r.z, r.side, 120.0, r.segment - 1) for r in one_side], None, ribs_only=True
    )
    assert alone.l1 is None and "one side" in alone.reason
    one_13th = ribs_on(6) + [Rib(56.0, -1, 120.0, 5)]  # a one-sided rib on L1: disagrees
    assert "transitional" in assign_levels(segs, one_13th, sacrum=0).reason
    segs[4].gap_below_mm = 40.0  # a body missed between sacrum and ribs
    assert "missing" in assign_levels(segs, ribs_on(6), sacrum=0).reason
    segs[4].gap_below_mm = 10.0
    segs[3].tall = True  # a missed disc between sacrum and ribs
    assert "merged" in assign_levels(segs, ribs_on(6), sacrum=0).reason
    segs[3].tall, segs[2].split = False, True  # a body split at a false disc
    assert "split" in assign_levels(segs, ribs_on(6), sacrum=0).reason


# --- class, thresholds, flags ----------------------------------------------------------------


def test_classify_boundaries():
    assert classify(110.0) == "osteoporosis"
    assert classify(110.5) == "osteopenia"
    assert classify(160.0) == "osteopenia"
    assert classify(160.5) == "normal"
    assert classify(105.0, Thresholds(osteoporosis_hu=100.0, osteopenia_hu=150.0)) == "osteopenia"


@pytest.mark.parametrize("hu", [99.0, 121.0, 149.0, 171.0])
def test_class_right_away_from_thresholds(hu):
    vol, truth, rep = case(trabecular_hu=hu, noise_sd=20.0, seed=int(hu))
    assert rep.measurable
    assert rep.bone_class == classify(truth.l1_hu)


@pytest.mark.parametrize("hu", [105.0, 115.0, 155.0, 165.0])
def test_accurate_within_5_hu_of_a_threshold(hu):
    """Near a threshold the class may go either way; the value must still be within 5 HU,
    and then the class is wrong only when the truth is within 5 HU of the threshold."""
    vol, truth, rep = case(trabecular_hu=hu, noise_sd=15.0, slice_spacing_mm=1.25, seed=int(hu))
    assert rep.measurable, rep.reason
    assert abs(rep.l1_hu - truth.l1_hu) <= 5.0
    if rep.bone_class != classify(truth.l1_hu):
        assert min(abs(truth.l1_hu - t) for t in (110.0, 160.0)) <= 5.0


def test_thresholds_are_configurable():
    vol, truth, rep = case()
    assert rep.bone_class == "osteopenia"  # 150 HU
    strict = measure_bone_density(
        vol, truth.spacing, affine=truth.affine, thresholds=Thresholds(160.0, 180.0), masks=False
    )
    assert strict.bone_class == "osteoporosis" and strict.l1_hu == rep.l1_hu


def test_header_flags():
    vol, truth, _ = case()
    rep = measure_bone_density(
        vol,
        truth.spacing,
        affine=truth.affine,
        facts=ScanFacts(slice_thickness_mm=5.0, kvp=100.0, iv_contrast=True),
        masks=False,
    )
    text = " ".join(rep.flags)
    assert "thickness" in text and "kVp" in text and "contrast" in text
    assert rep.measurable and rep.labels is None
    assert _header_flags(ScanFacts(2.5, 120.0, False), 2.5) == []
    assert _header_flags(None, 2.5) == [] and "thickness" in _header_flags(None, 5.0)[0]
    assert _header_flags(ScanFacts(2.5, 120.0, False, lossy=True), 2.5) == [
        "lossy-compressed input"
    ]


# --- orientation and storage -----------------------------------------------------------------


@pytest.mark.parametrize("flips", [(1, 0, 0), (0, 1, 1), (1, 1, 1)])
def test_orientation_invariant(flips):
    vol, truth, rep = case()
    fz, fy, fx = (bool(f) for f in flips)
    vol2, truth2, rep2 = case(flip_z=fz, flip_y=fy, flip_x=fx)
    assert rep2.measurable and rep2.l1_hu == rep.l1_hu
    assert {n: lv.mean_hu for n, lv in rep2.levels.items()} == {
        n: lv.mean_hu for n, lv in rep.levels.items()
    }
    axes = [i for i, f in enumerate(flips) if f]
    assert np.array_equal(rep2.roi, np.flip(rep.roi, axes))
    assert np.array_equal(rep2.labels, np.flip(rep.labels, axes))
    assert rep2.levels["L1"].slices == truth2.z_slices["L1"] or all(
        abs(a - b) <= 1
        for a, b in zip(rep2.levels["L1"].slices, truth2.z_slices["L1"], strict=True)
    )


def test_z_flag_and_transposed_axes():
    vol, truth, rep = case()
    flipped = np.ascontiguousarray(vol[::-1])
    rep_flag = measure_bone_density(flipped, truth.spacing, z_increases_superior=False)
    assert rep_flag.l1_hu == rep.l1_hu
    # axes stored as (x, y, z): the affine's columns say so
    xyz = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))
    aff = truth.affine.copy()
    aff[:, :3] = truth.affine[:, [2, 1, 0]]
    rep_t = measure_bone_density(xyz, (0.0, 0.0, 0.0), affine=aff)
    assert rep_t.l1_hu == rep.l1_hu
    assert np.array_equal(rep_t.roi, np.transpose(rep.roi, (2, 1, 0)))


def test_wrong_orientation_is_refused_not_mislabelled():
    vol, truth, _ = case()
    upside_down = measure_bone_density(np.ascontiguousarray(vol[::-1]), truth.spacing)
    assert not upside_down.measurable and upside_down.reason
    back_to_front = measure_bone_density(np.ascontiguousarray(vol[:, ::-1]), truth.spacing)
    assert not back_to_front.measurable and "orientation" in back_to_front.reason


def test_unsigned_storage_goes_through_to_hu():
    vol, truth, rep = case()
    stored = (vol.astype(np.int32) + 1024).astype(np.uint16)  # intercept -1024
    with pytest.raises(TypeError):
        measure_bone_density(stored, truth.spacing, affine=truth.affine)
    hu = to_hu(stored, slope=1.0, intercept=-1024.0)  # a tensor, as the pipeline passes it
    assert hu.dtype == torch.float32 and np.array_equal(hu.numpy(), vol.astype(np.float32))
    rep_u = measure_bone_density(hu, truth.spacing, affine=truth.affine)
    assert rep_u.l1_hu == rep.l1_hu
    # forgetting the intercept cannot yield a plausible L1 reading
    raw = measure_bone_density(stored.astype(np.int32), truth.spacing, affine=truth.affine)
    assert not (raw.measurable and abs(raw.l1_hu - truth.l1_hu) < 50.0)
    # slope 2 storage
    half = np.rint((vol.astype(np.float32) + 1024) / 2).astype(np.uint16)
    rep_s = measure_bone_density(to_hu(half, 2.0, -1024.0), truth.spacing, affine=truth.affine)
    assert rep_s.measurable and abs(rep_s.l1_hu - truth.l1_hu) <= 5.0


# --- masks -----------------------------------------------------------------------------------


def test_masks_sit_in_the_right_body():
    vol, truth, rep = case(flip_y=True, flip_x=True)
    assert rep.roi.shape == vol.shape and rep.labels.shape == vol.shape
    l1 = CODES["L1"]
    assert CODES["L1"] == LEVEL_CODES["L1"]
    in_roi = rep.roi == l1
    assert in_roi.any()
    assert (truth.labels[in_roi] == LEVEL_CODES["L1"]).all()  # ROI inside the true L1 body
    lab = rep.labels == l1
    dice = 2 * (lab & (truth.labels == l1)).sum() / (lab.sum() + (truth.labels == l1).sum())
    assert dice > 0.8
    assert set(np.unique(rep.roi)) == {0} | {CODES[n] for n in ("T12", "L1", "L2", "L3", "L4")}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_matches_cpu():
    vol, truth, rep = case(slice_spacing_mm=1.25)
    gpu = measure_bone_density(vol, truth.spacing, affine=truth.affine, device="cuda")
    assert gpu.measurable == rep.measurable and gpu.reason == rep.reason
    assert abs(gpu.l1_hu - rep.l1_hu) < 0.5
    assert (gpu.roi != rep.roi).mean() < 1e-4


@pytest.mark.parametrize("fill", [-1000, 0, None])
def test_no_spine_is_refused_without_error(fill):
    rng = np.random.default_rng(0)
    if fill is None:
        vol = rng.normal(0.0, 300.0, (40, 64, 64)).astype(np.int16)
    else:
        vol = np.full((40, 64, 64), fill, np.int16)
    rep = measure_bone_density(vol, (2.0, 1.0, 1.0))
    assert not rep.measurable and rep.reason and rep.l1_hu is None
    tiny = measure_bone_density(np.zeros((1, 64, 64), np.int16), (2.0, 1.0, 1.0))
    assert not tiny.measurable and "small" in tiny.reason
