"""Bone density on a second, independent phantom family (harness.phantoms_b): its truth is what
it claims, the pipeline agrees on both families, finds the sacrum and ribs by anatomy, names L1
from the ribs alone only under that rule, and grades fractures. N is small here; the table over
many draws is benchmarks/bone_families.py."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from harness.bone_cases import Case, draw, run
from harness.phantoms import LEVEL_CODES, make_phantom
from harness.phantoms_b import make_phantom_b
from processing.bone import measure_bone_density

SMALL = dict(shape_yx=(200, 200), pixel_mm=1.6, slice_spacing_mm=2.5)


@lru_cache(maxsize=8)
def case(family: str, rule: str = "both", **kw):
    maker = make_phantom if family == "A" else make_phantom_b
    vol, truth = maker(**{**SMALL, **kw})
    rep = measure_bone_density(vol, truth.spacing, affine=truth.affine, level_rule=rule)
    return vol, truth, rep


def assert_right_l1(truth, rep):
    a, b = rep.levels["L1"].slices
    ta, tb = truth.z_slices["L1"]
    assert abs(a - ta) <= 1 and abs(b - tb) <= 1, (rep.levels["L1"].slices, truth.z_slices["L1"])


# --- family B's truth ------------------------------------------------------------------------


def test_family_b_truth_is_what_it_claims():
    vol, t, _ = case("B", noise_sd=0.0)
    assert t.family == "B" and vol.dtype == np.int16 and t.spacing == (2.5, 1.6, 1.6)
    order = [t.z_slices[n][0] for n in ("L5", "L1", "T12", "T10")]
    assert order == sorted(order) and t.sacrum_in_field and t.l1_measurable
    for name, (a, b) in t.z_slices.items():  # labels where the truth says
        zs = np.nonzero((t.labels == LEVEL_CODES[name]).any((1, 2)))[0]
        assert abs(zs.min() - a) <= 1 and abs(zs.max() + 1 - b) <= 1, name
    a, b = t.z_slices["L1"]
    k = (a + b) // 2
    yy, xx = np.nonzero(t.labels[k] == LEVEL_CODES["L1"])
    core = vol[k][yy[(abs(yy - yy.mean()) < 4)], xx[(abs(yy - yy.mean()) < 4)]]
    assert abs(float(np.median(core)) - t.l1_hu) < 12.0  # textured, no noise: about the truth


def test_family_b_differs_from_a():
    """Not family A with other numbers: other HU, a blurred and textured image, a table."""
    va, ta, _ = case("A", noise_sd=0.0)
    vb, tb, _ = case("B", noise_sd=0.0)
    assert va.shape != vb.shape or not np.array_equal(va, vb)
    # B's table: bright curved shell far behind the spine, in every slice
    back = vb[:, -25:, 60:140]
    assert ((back > 150) & (back < 400)).any(axis=(1, 2)).all()
    assert not ((va[:, -25:, 60:140] > 150).any())
    # B's body interior is textured even without noise; A's is flat
    for vol, t, textured in ((va, ta, False), (vb, tb, True)):
        a, b = t.z_slices["L2"]
        m = t.labels[(a + b) // 2] == LEVEL_CODES["L2"]
        vals = vol[(a + b) // 2][m]
        assert (np.percentile(vals, 75) - np.percentile(vals, 25) > 5) == textured


# --- both families agree ---------------------------------------------------------------------

AGREE = [0, 1, 4]  # draws that are sound spines in both families (harness.bone_cases)


@pytest.mark.parametrize("index", AGREE)
def test_families_agree(index):
    """The same draw rendered by each family: both measured, the true L1, within tolerance."""
    outs = {fam: run(draw(fam, index, "sound")) for fam in ("A", "B")}
    spacing = dict(outs["A"].case.options)["slice_spacing_mm"]
    tol = 5.0 if spacing <= 1.25 else 10.0  # test_bone_density's tolerance
    for fam, o in outs.items():
        assert o.expect and o.measured, (fam, o.reason)
        assert not o.mislabel and abs(o.error_hu) <= tol, (fam, o.error_hu)
    assert abs(outs["A"].error_hu - outs["B"].error_hu) <= tol


# --- the sacrum and the ribs by anatomy ------------------------------------------------------


@pytest.mark.parametrize("opts", [dict(sacrum_hu=45.0, ilium_hu=90.0), dict(contrast_hu=400.0)])
def test_sacrum_found_whatever_its_density(opts):
    """A low-density sacrum (thin cortex, tilted, not a body the wall signal finds) joined to its
    ilia across open SI joints; ribs whose joints are closed (one structure with the column)."""
    _, truth, rep = case("B", **opts)
    assert truth.sacrum_in_field
    assert rep.sacrum_found and rep.measurable, rep.reason
    assert_right_l1(truth, rep)
    assert rep.lowest_rib_level == "T12"


def test_no_sacrum_no_pelvis_found():
    """Positive control: a field above the sacrum has no pelvic ring."""
    _, truth, rep = case("B", fov="ends_in:L4")
    assert not truth.sacrum_in_field and not rep.sacrum_found
    assert "sacrum not in the field" in rep.reason


@pytest.mark.parametrize("pairs", [11, 13])
def test_transitional_refused_in_family_b(pairs):
    _, truth, rep = case("B", rib_pairs=pairs)
    assert not truth.l1_measurable and not rep.measurable
    assert "transitional" in rep.reason or "rib" in rep.reason, rep.reason


# --- abdomen-only fields ---------------------------------------------------------------------


@pytest.mark.parametrize("family,ends", [("A", "ends_in:L4"), ("B", "ends_in:L4-L5")])
def test_ribs_only_rule(family, ends):
    _, truth, both = case(family, fov=ends)
    assert truth.field_above_sacrum and truth.l1_by_ribs_only and not truth.l1_measurable
    assert not both.measurable and "sacrum" in both.reason  # the default rule refuses
    _, _, rep = case(family, "ribs-if-no-sacrum", fov=ends)
    assert rep.measurable and rep.level_from_ribs_only, rep.reason
    assert "level from ribs only" in rep.flags
    assert_right_l1(truth, rep)
    assert abs(rep.l1_hu - truth.l1_hu) <= 10.0


def test_ribs_only_rule_leaves_full_fields_alone():
    """With the sacrum in the field the rule changes nothing: both ways must still agree."""
    _, truth, rep = case("B", "ribs-if-no-sacrum")
    assert rep.measurable and not rep.level_from_ribs_only and rep.sacrum_found
    _, _, odd = case("B", "ribs-if-no-sacrum", rib_pairs=13)
    assert not odd.measurable  # a sacrum in the field still catches 13 rib pairs


def test_level_rule_is_checked():
    vol, truth = make_phantom(shape_yx=(64, 64), pixel_mm=5.0, slice_spacing_mm=5.0)
    with pytest.raises(ValueError):
        measure_bone_density(vol, truth.spacing, affine=truth.affine, level_rule="ribs")


# --- fracture grades ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,kind,grade",
    [("A", "wedge", 3), ("B", "biconcave", 2), ("B", "crush", 3), ("A", "crush", 2)],
)
def test_grade_2_3_at_l1_refused(family, kind, grade):
    _, truth, rep = case(family, fracture=("L1", kind, grade), sclerotic=True)
    assert not truth.l1_measurable
    assert not rep.measurable and "fractured" in rep.reason, rep.reason


@pytest.mark.parametrize("family,kind", [("B", "wedge"), ("B", "biconcave"), ("A", "crush")])
def test_grade_1_at_l1_on_25_mm_slices_is_never_passed_as_sound(family, kind):
    """On 2.5 mm slices a grade 1 (22 % lost, ~6 mm) is seen but not graded for sure (the line
    to grade 2 is ~1.3 mm, half a slice): measured and flagged a (possible) mild fracture, or,
    read at 25 % or more (or with grade 2 within its SD), refused saying which grades the slices
    leave open; never measured unflagged."""
    _, truth, rep = case(family, fracture=("L1", kind, 1), sclerotic=True)
    assert truth.l1_measurable and truth.fractures["L1"][1] == 1
    if rep.measurable:
        flags = [f for f in rep.flags if f.startswith("L1 ")]
        assert any(f.startswith(("L1 mild fracture", "L1 possible mild fracture")) for f in flags)
        assert abs(rep.l1_hu - truth.l1_hu) <= 10.0
    else:
        assert "not ruled out on these slices" in rep.reason, rep.reason


THIN = dict(shape_yx=(256, 256), pixel_mm=1.25, slice_spacing_mm=1.25)


@pytest.mark.parametrize("kind", ["wedge", "crush"])
def test_family_b_grade_1_flagged_grade_2_refused_on_thin_slices(kind):
    """Family B (grades tuned on A), 1.25 mm slices: the same fracture at 22.5 % of the height
    (grade 1) is read within 2.5 % of the truth, with an SD of 1-2 %: measured and flagged a
    mild fracture, or, where the read loss's SD reaches 25 %, refused with grade 2 not ruled
    out; at 32.5 % (grade 2) refused as fractured. Control: the sound spine of the same draw has
    no flag."""
    _, truth, sound = case("B", **THIN)
    assert sound.measurable and not any("fracture" in f for f in sound.flags), sound.flags
    _, truth, g1 = case("B", **THIN, fracture=("L1", kind, 1), fracture_loss=0.225)
    assert truth.fractures["L1"][1] == 1
    (flag,) = [f for f in g1.levels["L1"].flags if "fracture" in f]
    if g1.measurable:
        assert flag.startswith("mild fracture: Genant grade 1"), flag
    else:
        assert flag.startswith("fractured: Genant grade 1-2?") and "grade 2 not" in flag, flag
    read = float(flag.split("% ±")[0].rsplit(" ", 1)[1]) / 100
    assert abs(read - 0.225) <= 0.025, flag
    _, truth, g2 = case("B", **THIN, fracture=("L1", kind, 2), fracture_loss=0.325)
    assert truth.fractures["L1"][1] == 2 and not g2.measurable
    assert "fractured: Genant grade 2" in g2.reason, g2.reason


def test_grade_2_within_the_sd_is_refused():
    """Held-out fracture draw B #107: a grade 2 wedge (32.5 %) on 2.5 mm slices with a sclerotic
    band read 24 % ± 4 %: the SD reaches grade 2, and it is refused, not measured as a
    possible mild fracture (a grade 2 measured is a wrong value; a grade 1 refused is a lost
    case). It now reads 25 % ± 5 % (the band no longer taken for a thin endplate): refused as
    grade 2 either way. The flag's rule alone, the control: the same loss with an SD short of
    grade 2 is measured and flagged."""
    from processing.bone.heights import Fracture
    from processing.bone.measure import _fracture_flag

    o = run(draw("B", 107, "fracture"))
    assert dict(o.case.options)["fracture"] == ("L1", "wedge", 2) and not o.expect
    said = o.reason
    assert not o.measured and ("grade 2 not ruled out" in said or "Genant grade 2 (" in said), said
    assert _fracture_flag(Fracture(1, "wedge", 0.23, 0.03)).startswith(
        "fractured: Genant grade 1-2?"
    )
    assert _fracture_flag(Fracture(1, "wedge", 0.22, 0.01)).startswith("mild fracture")
    assert _fracture_flag(Fracture(0, "wedge", 0.18, 0.03)).startswith("possible mild fracture")
    assert _fracture_flag(Fracture(0, "wedge", 0.10, 0.03)) == ""


def _slab_means(height: float, sz: float, n: int) -> np.ndarray:
    """A body [0, height) mm between discs (80 HU), 1 mm endplates (500 HU) at both ends and an
    inside as dark as the discs (80 HU: osteoporotic trabecular bone); the mean of each slice
    [-20 + k sz, -20 + (k + 1) sz), from the overlaps (exact)."""
    lo = -20.0 + sz * np.arange(n)
    out = np.full(n, 80.0)
    for a in (0.0, height - 1.0):
        overlap = np.clip(np.minimum(lo + sz, a + 1.0) - np.maximum(lo, a), 0.0, None)
        out += (500.0 - 80.0) * overlap / sz
    return out


@pytest.mark.parametrize("sz", [2.5, 1.25])
def test_grade_1_and_2_with_the_same_slices_are_both_refused(sz):
    """Why no reader can measure every grade 1 and refuse every grade 2 on 2.5 mm slices: a
    crushed body 25.0 mm tall (21.9 % lost against a 32 mm peer: grade 1) and one 23.6 mm tall
    (26.3 %: grade 2), endplates 1 mm thick and the inside as dark as the disc, give the very
    same 2.5 mm slices (each endplate lies within one slice, which its place in it does not
    change). Both are refused, the read's SD covering both truths. Control, 1.25 mm slices:
    the slices differ, the grade 1 is measured and flagged and the grade 2 refused."""
    from processing.bone.heights import Heights, _between_endplates, grade
    from processing.bone.measure import _fracture_flag

    def read(height: float) -> tuple[np.ndarray, Heights]:
        p = _slab_means(height, sz, n=int(60 / sz))
        c = int((20.0 + height / 2) // sz)
        got = _between_endplates(p, c, p.size, sz, 3.0)
        assert got is not None
        return p, Heights(got[0], got[0], got[0], got[1])

    _, peer = read(32.0)
    (p1, h1), (p2, h2) = read(25.0), read(23.6)
    f1, f2 = grade(h1, [peer, peer]), grade(h2, [peer, peer])
    assert f1 is not None and f2 is not None and f1.kind == f2.kind == "crush"
    flag1, flag2 = _fracture_flag(f1), _fracture_flag(f2)
    assert flag2.startswith("fractured"), (f2, flag2)  # grade 2: refused
    if sz == 2.5:
        assert np.allclose(p1, p2, rtol=0.0, atol=1e-9)  # the very same slices
        assert flag1 == flag2 and flag1.startswith("fractured"), flag1
        assert abs(f1.loss - 0.219) <= 2 * f1.sd and abs(f1.loss - 0.263) <= 2 * f1.sd, f1
    else:
        assert not np.allclose(p1, p2)
        assert flag1.startswith(("mild fracture", "possible mild fracture")), (f1, flag1)


@pytest.mark.parametrize("kind", ["crush", "wedge", "biconcave"])
def test_loss_is_of_the_full_height_past_a_dished_endplate(kind):
    """Sound bodies whose endplates are dished (a parabola across the depth, 2.6 mm deep in all,
    as family B draws them) are shorter at 10 % and 90 % of their depth than at their walls: a
    loss over the peers' tallest height read there came out ~4 % too large (a 22 % crush read
    as 22.9 %, grade 2 within its SD). Now over the height carried out to the walls. Control:
    flat endplates (family A) give the same loss as before."""
    from processing.bone.heights import Heights, grade

    def body(rim: float, dish: float, lost: tuple[float, float, float]) -> Heights:
        at = [rim - dish * (1 - u * u) for u in (0.8, 0.0, 0.8)]  # u: distance from the middle
        a, m, p = (h - x for h, x in zip(at, lost, strict=True))
        return Heights(a, m, p, sd=0.1)

    rim, loss = 25.0, 0.22
    cut = {"crush": (1, 1, 1), "wedge": (0.9, 0.5, 0.1), "biconcave": (0.36, 1, 0.36)}[kind]
    for dish in (2.6, 0.0):
        peers = [body(rim, dish, (0.0, 0.0, 0.0))] * 4
        own = body(rim, dish, tuple(loss * rim * c for c in cut))
        f = grade(own, peers)
        assert f is not None and f.kind == kind
        assert abs(f.loss - loss) < 0.003, (dish, f)


@pytest.mark.parametrize("draw_of,grade", [(408, 1), (408, 2), (420, 2)])
def test_heights_read_through_the_body_centre_at_their_depth(draw_of, grade):
    """Fracture draws A #408 (biconcave, 1.6 mm pixels, rotated 10 degrees) and #420 (wedge,
    2 mm pixels), their L1 fractures forced to grades 1 and 2, 1.25 mm slices: heights were
    read along the column's line, 6 mm off the body's centre where a dish is shallower, at
    points rounded to a row (10 % of the depth moved back by up to 3 %): losses read 2-4 %
    low (23.3 % as 21.5 %, 30.5 % as 27 %, 36.7 % as 33.5 %). Now through the body's centre,
    at the points themselves: within 1 %."""
    from harness.bone_cases import at_l1

    o = run(at_l1(draw("A", draw_of, "fracture"), grade))
    assert dict(o.case.options)["slice_spacing_mm"] == 1.25
    assert o.l1_loss is not None, o.reason
    true, read, _ = o.l1_loss
    assert abs(read - true) <= 0.01, (true, o.reason, o.flags)


@pytest.mark.parametrize("family,draw_of,true_loss", [("A", 311, 0.24), ("B", None, 0.225)])
def test_sclerotic_band_on_thick_slices_is_not_read_as_a_grade_more(family, draw_of, true_loss):
    """A grade 1 crush with a sclerotic band under its sunken endplate, 2.5 mm slices: a thin
    endplate fitted to the band put the edge a slice inside (A: fracture draw #311's field
    read 30 % +- 3 % for 24 %; B: 35 % +- 4 %, a "wedge", for 22.5 %: both "grade 2" with
    grade 1 ruled out). The bright layer's thickness is now left open on such slices: the read
    lies within 2 SD of the truth and leaves grade 1 open. Control: a grade 3 crush with the
    same band is still refused."""
    base = dict(draw(family, draw_of, "fracture").options) if draw_of is not None else {}
    frac = {**base, "sclerotic": True, "fracture": ("L1", "crush", 1), "fracture_loss": true_loss}
    _, truth, rep = case(family, **frac)
    assert truth.fractures["L1"] == ("crush", 1, True) and truth.spacing[0] == 2.5
    (flag,) = [f for f in rep.levels["L1"].flags if "fracture" in f]
    assert "crush, " in flag, flag
    loss, sd = (float(v) / 100 for v in flag.split("crush, ")[1].split("% of")[0].split("% ± "))
    assert abs(loss - true_loss) <= 2 * sd, flag
    assert rep.measurable or "grade 1" in flag.split("(")[0] or "grade 1 not" in flag, flag
    _, truth, g3 = case(family, **{**frac, "fracture_loss": 0.45})
    assert not g3.measurable and "fractured: Genant grade" in g3.reason, g3.reason


@pytest.mark.parametrize("family,level", [("B", "T12"), ("A", "L2")])
def test_fracture_next_to_l1_does_not_stop_it(family, level):
    _, truth, rep = case(family, fracture=(level, "crush", 3), sclerotic=True)
    assert truth.l1_measurable
    assert rep.measurable, rep.reason
    assert_right_l1(truth, rep)
    assert any(f.startswith(f"{level} fractured") for f in rep.flags), rep.flags


def test_sound_spine_is_not_called_fractured():
    """Control for the grades: sound spines in both families carry no fracture flag."""
    for fam in ("A", "B"):
        _, _, rep = case(fam)
        assert rep.measurable and not any("fracture" in f for f in rep.flags), (fam, rep.flags)


# --- the rule through the pipeline: values, SR, CSV, the run's summary ------------------------


def test_ribs_only_flag_reaches_values_sr_and_csv(tmp_path):
    import highdicom as hd

    from core.core import Core
    from core.settings import Settings
    from gateway.run_cmd import summary_line
    from processing.bone_density import BoneDensity
    from processing.results import result_rows, write_csv
    from processing.runner import RunReport
    from processing.worker import process_series
    from storage.series import SeriesReader
    from tests.processing_data import ct_series, new_project, store_series
    from tests.test_processing_pipeline import dciodvfy_errors, task_for

    home = Settings(home=tmp_path, fsync=False)
    new_project(home, "proc")
    vol, truth = make_phantom_b(**SMALL, fov="ends_in:L4")
    key = store_series(home, "proc", ct_series(vol, spacing=truth.spacing, seed=3), tmp_path / "s")
    task = task_for(home, "proc", key)
    default = process_series(home.model_dump_json(), task, BoneDensity(), False)
    assert default.status == "unmeasurable" and "sacrum" in default.reason
    out = process_series(
        home.model_dump_json(), task, BoneDensity(level_rule="ribs-if-no-sacrum"), False
    )
    assert out.status == "ok", out.reason
    assert out.values["level_from_ribs_only"] is True
    assert "level from ribs only" in out.values["flags"]
    assert summary_line(RunReport("bone-density", "0.1", [out, default])) == (
        "bone-density 0.1: 1 ok, 1 unmeasurable (1 ok with the level from ribs only); "
        "0 already done"
    )
    with Core(home) as core:
        p = core.project("proc")
        (row,) = core.catalog.results(p.id)
        keys = {s.series_uid: s.storage_key for s in core.catalog.series(p.id)}
        sr_ds = SeriesReader(core.store, keys[row.sr_series_uid]).instance(0)
        rows = result_rows(core, "proc", "bone-density")
    sr_ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    groups = (
        sr.content.get_planar_roi_measurement_groups()
        + sr.content.get_volumetric_roi_measurement_groups()
    )
    said = [e.value.meaning for g in groups for e in g.get_qualitative_evaluations()]
    assert "Level from ribs only" in said
    write_csv(rows, tmp_path / "r.csv")
    text = (tmp_path / "r.csv").read_text()
    assert "level from ribs only" in text and "level_from_ribs_only" in text


def test_level_rule_option_is_checked():
    from processing.bone_density import BoneDensity

    assert BoneDensity(level_rule="ribs-if-no-sacrum").parameters()["level_rule"]
    with pytest.raises(ValueError):
        BoneDensity(level_rule="ribs")


def test_cli_level_rule(tmp_path):
    """A wrong rule is one line and exit 2 (`sphere run`, `sphere jobs submit`); a right one
    is queued with the run job's parameters."""
    from typer.testing import CliRunner

    from core.core import Core
    from core.settings import Settings
    from gateway.cli import app
    from tests.processing_data import new_project

    env = {"SPHERE_HOME": str(tmp_path / "home")}
    new_project(Settings(home=tmp_path / "home"), "pp")
    bad = CliRunner().invoke(app, ["run", "bone-density", "pp", "--level-rule", "ribs"], env=env)
    assert bad.exit_code == 2 and "--level-rule is one of" in bad.output
    args = ["jobs", "submit", "run", "pp", "--pipeline", "bone-density", "--level-rule"]
    bad = CliRunner().invoke(app, [*args, "ribs"], env=env)
    assert bad.exit_code == 2 and "--level-rule is one of" in bad.output
    ok = CliRunner().invoke(app, [*args, "ribs-if-no-sacrum"], env=env)
    assert ok.exit_code == 0, ok.output
    with Core(Settings(home=tmp_path / "home")) as core:
        (job,) = core.catalog.jobs("pp")
    assert job.params == {"pipeline": "bone-density", "level_rule": "ribs-if-no-sacrum"}


# --- cases the draws turned up ---------------------------------------------------------------


def test_l1_beside_a_crushed_l2_is_measured_in_its_body():
    """Draw B #4 (fracture): L2 crushed, an arterial phase, 2 mm pixels. L1's anterior cortex
    (536 HU, blurred) fell under the bone threshold over its middle slices, the wall search
    found the posterior wall there and L1's ROI landed in the canal (12 HU for a true 185)."""
    o = run(draw("B", 4, "fracture"))
    assert o.expect and o.measured and not o.mislabel, o.reason
    assert abs(o.error_hu) <= 10.0, o.error_hu


def test_lost_wall_runs_are_dropped():
    """The rule behind it: a run of slices whose wall lies > 8 mm behind the runs above and
    below is dropped; a run in front of them (or a lone end run) is kept."""
    from processing.bone.segment import _drop_lost_wall

    y = np.array([84.0] * 10 + [100.0] * 6 + [86.0] * 10)
    on = np.ones(y.size, bool)
    kept = _drop_lost_wall(on, y, 2.0, 1.25)
    assert not kept[10:16].any() and kept[:10].all() and kept[16:].all()
    ahead = np.array([84.0] * 10 + [70.0] * 6 + [86.0] * 10)
    assert _drop_lost_wall(on, ahead, 2.0, 1.25).all()
    assert _drop_lost_wall(on, y, 0.5, 1.25).all()  # 16 px at 0.5 mm: 8 mm, not more
    # a run as tall as a body behind short runs in front (S1's top, a vessel) is its wall
    body = np.array([72.0] * 3 + [81.0] * 11 + [71.0] * 2 + [81.0] * 10)
    assert _drop_lost_wall(np.ones(body.size, bool), body, 2.0, 2.5).all()
    assert not _drop_lost_wall(np.ones(body.size, bool), body, 2.0, 1.25)[3:14].any()


def test_l5_behind_short_runs_in_front_is_kept():
    """Fracture draw B #304, sound (2 mm pixels, 2.5 mm slices, a 73 HU body): L5's wall lay
    18 mm behind two short runs in front of it (S1's top, something at L4's foot) and was
    dropped as a lost wall; the 42 mm gap it left was refused 'a vertebra may be missing'."""
    o = dict(draw("B", 304, "fracture").options)
    o.pop("fracture")
    o["sclerotic"] = False
    out = run(Case("B", "fracture", tuple(sorted(o.items()))))
    assert out.expect and out.measured and not out.mislabel, out.reason
    assert abs(out.error_hu) <= 4.0, out.error_hu


def test_dim_sound_spine_is_not_read_as_a_wedge():
    """Draw B #9 (sound): bodies of 55 HU, noise 24 HU, 2.5 mm slices. No bright endplate at
    L1's anterior rim: the largest drop was a dip inside the body (the profile climbs back),
    which read a 33 % wedge and refused a sound L1."""
    o = run(draw("B", 9))
    assert o.case.scenario == "sound" and o.expect
    assert o.measured and not o.mislabel, o.reason
    assert not any("fracture" in f for f in o.flags if f.startswith("L1")), o.flags


def test_l1_grades_forced_and_read():
    """The harness's forced L1 grades (`at_l1`) and the loss it reads back from a report's words
    (`Outcome.l1_loss`); controls: grade 0 has no fracture, a T12 flag is not L1's."""
    from harness.bone_cases import Outcome, at_l1

    base = draw("B", 3, "fracture")
    g2 = dict(at_l1(base, 2).options)
    assert g2["fracture"][:1] == ("L1",) and g2["fracture"][2] == 2
    assert (
        0.255 <= g2["fracture_loss"] <= 0.395
        and g2["fracture"][1] == dict(base.options)["fracture"][1]
    )
    assert "fracture" not in dict(at_l1(base, 0).options)
    said = "L1: fractured: Genant grade 2 (crush, 31% ± 3% of height lost)"
    out = Outcome(at_l1(base, 2), False, False, False, None, None, said, False, [])
    assert out.l1_loss == (g2["fracture_loss"], 0.31, 0.03)
    flag = "T12 fractured: Genant grade 3 (wedge, 45% ± 3% of height lost)"
    assert Outcome(at_l1(base, 2), False, True, False, 0.0, True, "", False, [flag]).l1_loss is None


def test_mislabel_score_catches_a_neighbour():
    """The score's L1 check: a wall extent shortened at one end is still L1; a neighbour's
    slices (the positive control) are a mislabel."""
    from harness.bone_cases import same_body

    l1, t12, l2 = (159, 180), (186, 206), (136, 151)
    assert same_body((163, 180), l1) and same_body((159, 176), l1)
    assert not same_body(t12, l1) and not same_body(l2, l1)
    assert not same_body((170, 190), l1)  # half in L1, half in the disc and T12


def test_sacrum_top_a_slice_above_the_ring_is_not_l5():
    """Draw B #116 (13 rib pairs, a low-density sacrum, 2.5 mm slices): the wall signal saw S1's
    top as a short body starting in the slice after the sacrum-ilia ring's last one. Counted as
    L5, it made "five above the sacrum" agree with the 13th rib: L2 was measured as L1. A
    segment starting within a slice of the ring's top is sacral: transitional, refused."""
    o = run(draw("B", 116))
    assert o.case.scenario == "transitional" and not o.expect
    assert not o.measured and "transitional" in o.reason, o.reason


def test_sacrum_ring_broken_at_a_dim_midline_is_found():
    """Held-out draw B #162 (5 mm slices, 2 mm pixels, a 71 HU sacrum, scoliosis): the sacral
    body stays under the pelvic threshold at the midline, so the sacrum-ilia ring is two halves,
    each reaching out past 85 mm and in to the column. It was refused "sacrum not in the field"
    with the sacrum in the field; the halves now make the ring (the control: a field ending in
    L4 still finds none, `test_no_sacrum_no_pelvis_found`)."""
    o = run(draw("B", 162))
    assert o.case.scenario == "sound" and o.expect
    assert o.measured and not o.mislabel, o.reason
    assert abs(o.error_hu) <= 10.0


def test_sacrum_ring_parted_off_the_column_line_is_found():
    """Fracture draw B #474, its L1 left sound (2.5 mm slices, 2 mm pixels, a 42 HU sacrum,
    scoliosis 11 mm): the ring's two halves are parted 13 mm at the dim sacral body, but the
    gap lies 6 mm to one side of the column's line, so one half ended 13 mm from it, not within
    10 mm: refused "sacrum not in the field" with the sacrum in the field. Now the gap between
    the halves counts (20 mm at most, within 20 mm of the line)."""
    from harness.bone_cases import at_l1

    o = run(at_l1(draw("B", 474, "fracture"), 0))
    assert o.expect and o.measured and not o.mislabel, o.reason
    assert abs(o.error_hu) <= 10.0
