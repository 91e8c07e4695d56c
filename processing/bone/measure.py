"""Entry point: HU volume in, BoneReport out (per-level trabecular HU, L1 score, class, flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from processing.bone.levels import CODES, assign_levels, find_ribs, find_sacrum
from processing.bone.orient import canonical_orientation
from processing.bone.roi import body_roi
from processing.bone.segment import find_column, split_bodies, wall_from_mask

# canonical HU volume (S, P, L), its spacing -> vertebral-body mask on the same grid
Segmenter = Callable[[torch.Tensor, tuple[float, float, float]], np.ndarray]

MEASURED = ("T12", "L1", "L2", "L3", "L4")


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
    volume_hu: np.ndarray,
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
) -> BoneReport:
    """Score L1 trabecular attenuation of an axial CT volume given in HU (after rescale).

    Orientation: `affine` (array index -> LPS mm), or without it axial DICOM order with axis 0
    superior when `z_increases_superior`. Unsigned arrays are refused: HU are signed; convert
    stored values with `to_hu` first. A `segmenter` (e.g. a trained network) gives the
    vertebral bodies in place of the anterior-wall signal; an implausible mask is refused.
    """
    arr = np.asarray(volume_hu)
    if arr.dtype.kind == "u" or arr.dtype == np.bool_:
        raise TypeError("volume must be HU (signed); convert stored values with to_hu()")
    if arr.ndim != 3:
        raise ValueError("volume must be 3D")
    orient, spacing = canonical_orientation(spacing_zyx, affine, z_increases_superior)
    can = np.ascontiguousarray(orient.to_canonical(arr))
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
    ribs = find_ribs(vol, col, segs, spacing, bone_hu)
    sacrum, note = find_sacrum(vol, col, segs, spacing, bone_hu)
    lv = assign_levels(segs, ribs, sacrum, note)
    report.sacrum_found = sacrum is not None
    if lv.lowest_rib_segment is not None and lv.names[lv.lowest_rib_segment]:
        report.lowest_rib_level = lv.names[lv.lowest_rib_segment]
    if bool((vol > metal_hu).any()):
        flags.append("metal in the field of view")

    labels = np.zeros(vol.shape, np.int16) if masks else None
    roi_vol = np.zeros(vol.shape, np.int16) if masks else None
    named = {n: i for i, n in enumerate(lv.names) if n}
    for name, i in named.items():
        s = segs[i]
        a, b = (s.z0, s.z1) if not orient.flips[0] else (nz - s.z1, nz - s.z0)
        res = LevelResult(name, (a, b), round(s.height_mm, 1))
        report.levels[name] = res
        if name == "S":
            continue
        if s.cut:
            res.flags.append("cut by the field of view")
        nb_h = [
            segs[j].height_mm
            for j in (i - 1, i + 1)
            if 0 <= j < len(segs) and lv.names[j] not in (None, "S") and not segs[j].cut
        ]
        if nb_h and not s.cut and s.height_mm < fracture_ratio * float(np.median(nb_h)):
            res.flags.append(f"collapsed: height {s.height_mm / np.median(nb_h):.0%} of neighbours")
        r = body_roi(vol, col, s, spacing, bone_hu, roi_area_mm2) if not s.cut else None
        if r is None:
            if not s.cut:
                res.flags.append("no trabecular interior found")
            continue
        h, w = r.body.shape
        body_t = torch.as_tensor(r.body, device=vol.device)
        box = vol[s.z0 : s.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w]
        if bool((box[:, body_t] > metal_hu).any()):
            res.flags.append("metal in the body")
        if labels is not None:
            labels[s.z0 : s.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w][:, r.body] = CODES[name]
        if name not in MEASURED:
            continue
        roi_t = torch.as_tensor(r.roi, device=vol.device)
        vals = vol[r.z0 : r.z1, r.y0 : r.y0 + h, r.x0 : r.x0 + w][:, roi_t].flatten().double()
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

    if labels is not None and roi_vol is not None:  # both made, or neither
        report.labels = orient.from_canonical(labels)
        report.roi = orient.from_canonical(roi_vol)
    if lv.l1 is None:
        report.reason = lv.reason
        return report
    l1 = report.levels["L1"]
    bad = [f for f in l1.flags if f != "ROI small"]
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
