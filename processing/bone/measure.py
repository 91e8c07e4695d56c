"""Entry point: HU volume in, BoneReport out (per-level trabecular HU, L1 score, class, flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from processing.bone.heights import G1, G2, Fracture, Heights, body_heights, grade
from processing.bone.levels import CODES, RIBS_ONLY, RULES, assign_levels, find_ribs
from processing.bone.orient import canonical_orientation
from processing.bone.pelvis import find_pelvis, place_sacrum
from processing.bone.roi import body_roi
from processing.bone.segment import find_column, split_bodies, wall_from_mask

# canonical HU volume (S, P, L), its spacing -> vertebral-body mask on the same grid
Segmenter = Callable[[torch.Tensor, tuple[float, float, float]], np.ndarray]

MEASURED = ("T12", "L1", "L2", "L3", "L4")
FIELD_ENDS_IN_DISC_MM = 15.0  # the lowest body this close above the field's edge: a disc cut
BAND_HU = 25.0  # an ROI slice this far from the middle one's mean: a sclerotic band, left out
MILD = "mild fracture"  # Genant grade 1: measured, flagged
POSSIBLE = "possible mild fracture"  # the slices cannot tell grade 1 from 0 or 2: measured, flagged
SOFT = ("ROI small", MILD, POSSIBLE, "ROI slices")  # flags that do not make L1 unmeasurable


@dataclass(frozen=True)
class ScanFacts:
    """Header facts the caller read from DICOM; None when unknown."""

    slice_thickness_mm: float | None = None
    kvp: float | None = None
    iv_contrast: bool | None = None
    lossy: bool = False  # lossy compressed originals: HU may differ by a few units


@dataclass(frozen=True)
class Thresholds:
    """L1 HU cut-offs (Pickhardt 2013): <= osteoporosis, <= osteopenia, else normal."""

    osteoporosis_hu: float = 110.0
    osteopenia_hu: float = 160.0


def classify(hu: float, t: Thresholds = Thresholds()) -> str:
    """Class of an L1 trabecular HU."""
    if hu <= t.osteoporosis_hu:
        return "osteoporosis"
    return "osteopenia" if hu <= t.osteopenia_hu else "normal"


@dataclass
class LevelResult:
    """One named vertebra. HU statistics are None where no ROI could be placed."""

    name: str
    slices: tuple[int, int]  # body's slices [start, stop) on the input's head-foot axis
    height_mm: float
    mean_hu: float | None = None
    median_hu: float | None = None
    sd_hu: float | None = None
    n_voxels: int = 0
    roi_area_mm2: float = 0.0
    flags: list[str] = field(default_factory=list)


@dataclass
class BoneReport:
    """Result. `labels` (level codes on named bodies' voxels) and `roi` (codes on ROI voxels) are
    int16 volumes in the input's orientation, for SEG output; codes: T1..T12 = 1..12,
    L1..L5 = 13..17. Levels are named only when L1 was identified both ways."""

    measurable: bool
    l1_hu: float | None
    bone_class: str | None
    reason: str  # why L1 is not measurable; "" when it is
    flags: list[str]
    levels: dict[str, LevelResult]
    labels: np.ndarray | None
    roi: np.ndarray | None
    n_segments: int = 0
    lowest_rib_level: str | None = None
    sacrum_found: bool = False
    level_from_ribs_only: bool = False  # L1 named below the lowest ribs alone (flagged)


def _header_flags(facts: ScanFacts | None, sz: float) -> list[str]:
    facts = facts or ScanFacts()
    flags = []
    thick = facts.slice_thickness_mm if facts.slice_thickness_mm is not None else sz
    if thick > 3.0:
        flags.append(f"slice thickness {thick:g} mm > 3 mm")
    if facts.kvp is not None and abs(facts.kvp - 120.0) > 1e-6:
        flags.append(f"kVp {facts.kvp:g} (thresholds assume 120 kVp)")
    if facts.iv_contrast:
        flags.append("IV contrast: trabecular HU reads higher than unenhanced")
    if facts.lossy:
        flags.append("lossy-compressed input")
    return flags


def measure_bone_density(
    volume_hu: np.ndarray | torch.Tensor,
    spacing_zyx: tuple[float, float, float],
    *,
    affine: np.ndarray | None = None,
    z_increases_superior: bool = True,
    facts: ScanFacts | None = None,
    thresholds: Thresholds = Thresholds(),
    device: str | torch.device = "cpu",
    bone_hu: float = 300.0,
    metal_hu: float = 2000.0,
    roi_area_mm2: float = 200.0,
    fracture_ratio: float = 0.75,
    masks: bool = True,
    segmenter: Segmenter | None = None,
    level_rule: str = "both",
) -> BoneReport:
    """Score L1 trabecular attenuation of an axial CT volume given in HU (after rescale).

    Orientation: `affine` (array index -> LPS mm), or without it axial DICOM order with axis 0
    superior when `z_increases_superior`. A tensor is used where it lies, moved only when it is
    not on `device` (a canonical float32 one on `device`, as the pipeline passes: not copied).
    Unsigned arrays are refused: HU are signed; convert stored values with `to_hu` first.
    A `segmenter` (e.g. a trained network) gives the vertebral bodies in place of the
    anterior-wall signal; an implausible mask is refused.
    `level_rule` "both": L1 named only when the ribs and the sacrum agree; "ribs-if-no-sacrum":
    also from the ribs alone when the field ends above the sacrum (flagged `level from ribs only`).
    """
    if level_rule not in RULES:
        raise ValueError(f"level_rule is one of {RULES}")
    if isinstance(volume_hu, torch.Tensor):
        signed = volume_hu.is_floating_point() or volume_hu.is_signed()  # bool: not signed
    else:
        volume_hu = np.asarray(volume_hu)
        signed = volume_hu.dtype.kind != "u" and volume_hu.dtype != np.bool_
    if not signed:
        raise TypeError("volume must be HU (signed); convert stored values with to_hu()")
    if volume_hu.ndim != 3:
        raise ValueError("volume must be 3D")
    orient, spacing = canonical_orientation(spacing_zyx, affine, z_increases_superior)
    if isinstance(volume_hu, torch.Tensor):
        vol = orient.to_canonical(volume_hu.to(device)).float().contiguous()
    else:
        can = np.ascontiguousarray(orient.to_canonical(volume_hu))
        vol = torch.as_tensor(can, device=device).float()
    nz = vol.shape[0]
    sz = spacing[0]
    flags = _header_flags(facts, sz)

    report = BoneReport(False, None, None, "", flags, {}, None, None)
    if nz * sz < 60.0 or min(vol.shape[1:]) < 16:
        report.reason = "volume too small to hold a spine"
        return report
    col = find_column(vol, spacing, bone_hu)
    if segmenter is not None:
        why = wall_from_mask(col, np.asarray(segmenter(vol, spacing), bool), spacing)
        if why:
            report.reason = f"learned segmenter output implausible: {why}"
            return report
    segs = split_bodies(col, spacing)
    report.n_segments = len(segs)
    if len(segs) < 3:
        report.reason = f"vertebral column not found ({len(segs)} bodies)"
        return report
    if float(np.median(col.ty)) <= col.body_cy:
        report.reason = "spine not behind the body centre: check orientation (y axis)"
        return report
    pelvis = find_pelvis(vol, col, spacing)
    segs, sacrum, note = place_sacrum(segs, pelvis, spacing)
    ribs = find_ribs(vol, col, segs, spacing, bone_hu)
    # above the sacrum, established: no pelvic ring anywhere, and the field's lowest slice cuts
    # the lowest body or the disc under it
    above_sacrum = not pelvis.slices.any() and (segs[0].z0 * sz <= FIELD_ENDS_IN_DISC_MM)
    ribs_only = level_rule == "ribs-if-no-sacrum" and above_sacrum
    lv = assign_levels(segs, ribs, sacrum, note, ribs_only=ribs_only)
    report.sacrum_found = sacrum is not None
    report.level_from_ribs_only = lv.ribs_only and lv.l1 is not None
    if report.level_from_ribs_only:
        flags.append(RIBS_ONLY)
    if lv.lowest_rib_segment is not None and lv.names[lv.lowest_rib_segment]:
        report.lowest_rib_level = lv.names[lv.lowest_rib_segment]
    if bool((vol > metal_hu).any()):
        flags.append("metal in the field of view")

    labels = np.zeros(vol.shape, np.int16) if masks else None
    roi_vol = np.zeros(vol.shape, np.int16) if masks else None
    named = {n: i for i, n in enumerate(lv.names) if n}
    heights: dict[int, Heights | None] = {}
    for name, i in named.items():
        s = segs[i]
        a, b = (s.z0, s.z1) if not orient.flips[0] else (nz - s.z1, nz - s.z0)
        res = LevelResult(name, (a, b), round(s.height_mm, 1))
        report.levels[name] = res
        if name == "S":
            continue
        if s.cut:
            res.flags.append("cut by the field of view")
        r = body_roi(vol, col, s, spacing, bone_hu, roi_area_mm2) if not s.cut else None
        if r is None:
            if not s.cut:
                res.flags.append("no trabecular interior found")
            continue
        h, w = r.body.shape
        # heights through the body's own centre: the column's line runs off it under axial
        # rotation or a lateral tilt, where a biconcave body's dish is shallower
        cx = float(np.nonzero(r.body)[1].mean())
        rows = np.nonzero(r.body[:, min(max(int(round(cx)), 0), w - 1)])[0]
        if rows.size:
            z_lo = segs[i - 1].z1 if i > 0 else 0
            z_hi = segs[i + 1].z0 if i + 1 < len(segs) else nz
            y_f, y_b = r.y0 + rows[0] - 0.5, r.y0 + rows[-1] + 0.5
            heights[i] = body_heights(vol, s, spacing, r.x0 + cx, y_f, y_b, z_lo, z_hi)
        body_t = torch.as_tensor(r.body, device=vol.device)
        box = vol[s.z0 : s.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w]
        if bool((box[:, body_t] > metal_hu).any()):
            res.flags.append("metal in the body")
        if labels is not None:
            labels[s.z0 : s.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w][:, r.body] = CODES[name]
        if name not in MEASURED:
            continue
        roi_t = torch.as_tensor(r.roi, device=vol.device)
        slab = vol[r.z0 : r.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w][:, roi_t].double()
        if slab.shape[0] > 2 and slab.shape[1]:  # a dense band under a sunken endplate
            means = slab.mean(1)
            mid = min(max(int(round(s.z_mid)) - r.z0, 0), slab.shape[0] - 1)
            keep = (means - means[mid]).abs() <= BAND_HU
            if not bool(keep.all()):
                slab = slab[keep]
                res.flags.append("ROI slices with a dense band left out")
        vals = slab.flatten()
        if vals.numel() == 0:
            res.flags.append("empty ROI")
            continue
        res.mean_hu = round(float(vals.mean()), 2)
        res.median_hu = round(float(vals.median()), 2)
        res.sd_hu = round(float(vals.std()), 2) if vals.numel() > 1 else 0.0
        res.n_voxels = int(vals.numel())
        res.roi_area_mm2 = round(r.area_mm2, 1)
        if r.note:
            res.flags.append(r.note)
        if roi_vol is not None:
            roi_vol[r.z0 : r.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w][:, r.roi] = CODES[name]

    _grade_levels(segs, lv.names, heights, report, fracture_ratio)
    if labels is not None and roi_vol is not None:  # both made, or neither
        report.labels = orient.from_canonical(labels)
        report.roi = orient.from_canonical(roi_vol)
    if lv.l1 is None:
        report.reason = lv.reason
        return report
    l1 = report.levels["L1"]
    bad = [f for f in l1.flags if not f.startswith(SOFT)]
    if bad:
        report.reason = "L1: " + "; ".join(bad)
        return report
    if l1.mean_hu is None:  # an unmeasured ROI is flagged above: not reached
        report.reason = "L1: not measured"
        return report
    report.measurable = True
    report.l1_hu = l1.mean_hu
    report.bone_class = classify(float(l1.mean_hu), thresholds)
    return report


def _grade_levels(
    segs: list,
    names: list[str | None],
    heights: dict[int, Heights | None],
    report: BoneReport,
    fracture_ratio: float,
) -> None:
    """Fracture flags per named body: a Genant grade from its heights against up to two sound
    peers above and below; without heights (thick slices), its anterior-wall height against its
    neighbours' (under `fracture_ratio`: collapsed). Grade 2-3 make a level unmeasurable, a
    grade 1 is flagged only; fractures elsewhere are named in the report's flags."""
    for i, name in enumerate(names):
        if name is None or name == "S" or segs[i].cut or name not in report.levels:
            continue
        res = report.levels[name]
        peers = [
            h.as_level(name, str(names[j]))
            for j in (i - 2, i - 1, i + 1, i + 2)
            if 0 <= j < len(segs)
            and names[j] not in (None, "S")
            and (h := heights.get(j)) is not None
        ]
        own = heights.get(i)
        found = grade(own, peers) if own is not None else None
        flag = ""
        if found is not None:
            flag = _fracture_flag(found)
        else:
            nb_h = [
                segs[j].height_mm
                for j in (i - 1, i + 1)
                if 0 <= j < len(segs) and names[j] not in (None, "S") and not segs[j].cut
            ]
            ratio = segs[i].height_mm / float(np.median(nb_h)) if nb_h else 1.0
            if ratio < fracture_ratio:
                flag = f"collapsed: height {ratio:.0%} of neighbours"
        if flag:
            res.flags.append(flag)
            report.flags.append(f"{name} {flag}")


def _fracture_flag(f: Fracture) -> str:
    """A level's flag for its grade. Grade 2-3 as read, or a lesser loss whose SD reaches grade
    2: fractured (refused, saying which grades the slices leave open: a grade 2 measured would
    be a wrong value, a grade 1 refused only a lost case). Grade 1 that holds over the SD: a
    mild fracture. A loss whose SD spans the line between grades 0 and 1 (slices too coarse):
    a possible mild fracture, measured and flagged."""
    how = f"{f.kind}, {f.loss:.0%} ± {f.sd:.0%} of height lost"
    if f.grade >= 2:
        maybe = "" if f.loss - f.sd >= G2 else "; grade 1 not ruled out on these slices"
        return f"fractured: Genant grade {f.grade} ({how}{maybe})"
    lo = 0 if f.loss - f.sd < G1 else 1
    if f.loss + f.sd >= G2:
        return f"fractured: Genant grade {lo}-2? ({how}; grade 2 not ruled out on these slices)"
    if f.grade == 1 and f.sure:
        return f"{MILD}: Genant grade 1 ({how})"
    if f.grade == 1 or not f.sure:
        return f"{POSSIBLE}: Genant grade 0-1? ({how}; these slices cannot grade it)"
    return ""
