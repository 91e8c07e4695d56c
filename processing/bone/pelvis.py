"""The sacrum found by anatomy: the lowest bony mass, below the last disc, that is continuous with
the iliac wings on both sides across the sacroiliac joints, whatever its own density.

A slice is "pelvic" when the bone about the column (cortex outlines above a low threshold, closed
over a joint space's few mm) reaches far to both sides: a sacrum joined to its ilia does; a lumbar
vertebra does not (its transverse processes stop centimetres short of the iliac crest).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from processing.bone.segment import Column, Segment, square_max

PELVIC_HU = 150.0  # a thin, partial-volumed cortex of a low-density sacrum still shows above it
JOINT_MM = 3.0  # closing radius: bridges a sacroiliac joint space (2-4 mm) and thin-cortex gaps
REACH_MM = 85.0  # from the column, on both sides: a sacrum joined to its ilia reaches that far
# (a rib seen in one slice with its vertebra runs 6-7 cm out before it leaves the slice)
# a ring's halves parted at a dim sacral body: at most twice this apart, each ending within
# twice this of the column's line (the sacrum's midline may lie off it, under a scoliosis)
MIDLINE_GAP_MM = 10.0
MIN_RUN_MM = 10.0  # pelvic slices over less than this establish nothing (ribs span ~8 mm)
SOLID_MM = 25.0  # thicker, solid, above PELVIC_HU and under DENSE_HU, lateral: an organ
DENSE_HU = 350.0
SACRAL_SLACK_MM = 2.0  # a segment starting this close above the pelvic run is sacral
S1_ABOVE_RING_MM = 15.0  # S1's top over the highest slice of a sacrum-ilia ring, at most
UPPER_RING_MM = 25.0  # a higher ring shorter than this, within one body, is not a pelvis
FUSED_MM = 30.0  # a sacral segment reaching this far above the ring: L5 not parted from S1


@dataclass
class Pelvis:
    """Per slice (canonical), whether the bony ring sacrum-ilia is there; its runs bottom-up."""

    slices: np.ndarray  # bool (nz,)
    runs: list[tuple[int, int]]  # [start, stop) in slices, long enough to count


def find_pelvis(vol: torch.Tensor, col: Column, spacing: tuple[float, float, float]) -> Pelvis:
    """Slices where the bone holding the column reaches `REACH_MM` to both sides."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    f = max(1, round(2.0 / sx))  # a ~2 mm grid; max-pooled, so a thin cortex stays
    pool = torch.nn.functional.max_pool2d
    avg = torch.nn.functional.avg_pool2d
    coarse = pool((vol > PELVIC_HU).float()[:, None], f, f, ceil_mode=True)
    # organs bright with contrast (liver, spleen, kidneys) are thick, solid and lateral: left out
    # (not the midline, where a sacrum's body is; not what is itself dense bone)
    mean = avg(avg(vol[:, None], f, f, ceil_mode=True), 3, 1, 1, count_include_pad=False)
    k = max(3, round(SOLID_MM / (sx * f)) | 1)
    eroded = 1.0 - square_max(1.0 - ((mean > PELVIC_HU) & (mean < DENSE_HU)).float(), k // 2)
    organ = square_max(eroded, k // 2) > 0.5
    organ &= pool((vol > DENSE_HU).float()[:, None], f, f, ceil_mode=True) < 0.5
    xs = (torch.arange(coarse.shape[3], device=vol.device) + 0.5) * f - 0.5
    organ &= ((xs - float(np.median(col.tx))).abs() * sx > 35.0)[None, None, None, :]
    coarse = coarse * (~organ).float()
    r = max(1, round(JOINT_MM / (sx * f)))
    closed = 1.0 - square_max(1.0 - square_max(coarse, r), r)
    mask = closed[:, 0].cpu().numpy() > 0.5
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # components within a slice only
    lab, n = ndimage.label(mask, structure=structure)
    pelvic = np.zeros(nz, bool)
    if n == 0:
        return Pelvis(pelvic, [])
    zz, yy, xx = np.nonzero(lab)
    ids = lab[zz, yy, xx]
    # about the column's usual line: in the pelvis the track itself may stray onto an ilium
    x_mm = ((xx + 0.5) * f - 0.5 - float(np.median(col.tx))) * sx
    y_mm = ((yy + 0.5) * f - 0.5 - float(np.median(col.y_ant))) * sy
    lo = np.full(n + 1, np.inf)
    hi = np.full(n + 1, -np.inf)
    np.minimum.at(lo, ids, x_mm)
    np.maximum.at(hi, ids, x_mm)
    # bone on the midline, from the bodies' front to the back of a sacrum sloping backward
    # (not a table under the back); not reaching the field's sides
    mid = (np.abs(x_mm) < 15.0) & (y_mm > -20.0) & (y_mm < 75.0)
    held = np.zeros(n + 1, bool)
    held[ids[mid]] = True
    edge = (xx == 0) | (xx == mask.shape[2] - 1)
    held[ids[edge]] = False
    ring = held & (lo <= -REACH_MM) & (hi >= REACH_MM)
    pelvic[np.unique(zz[ring[ids]])] = True
    # a low-density sacral body may not show above PELVIC_HU at the midline: the ring broken
    # there still counts, when its two halves each reach out REACH_MM and the gap between them
    # is narrow and about the column
    left = held & (lo <= -REACH_MM) & (hi >= -2 * MIDLINE_GAP_MM) & (hi < REACH_MM)
    right = held & (hi >= REACH_MM) & (lo <= 2 * MIDLINE_GAP_MM) & (lo > -REACH_MM)
    comp_z = np.zeros(n + 1, np.int64)  # each component lies within one slice
    comp_z[ids] = zz
    inner_left, inner_right = np.full(nz, -np.inf), np.full(nz, np.inf)
    np.maximum.at(inner_left, comp_z[left], hi[left])
    np.minimum.at(inner_right, comp_z[right], lo[right])
    pelvic |= inner_right - inner_left <= 2 * MIDLINE_GAP_MM
    runs, z = [], 0
    while z < nz:
        if pelvic[z]:
            z1 = z
            while z1 < nz and (pelvic[z1] or (z1 + 1 < nz and pelvic[z1 + 1])):
                z1 += 1  # one slice missing does not break a run
            if (z1 - z) * sz >= MIN_RUN_MM:
                runs.append((z, z1))
            z = z1
        else:
            z += 1
    return Pelvis(pelvic, runs)


def place_sacrum(
    segs: list[Segment], pelvis: Pelvis, spacing: tuple[float, float, float]
) -> tuple[list[Segment], int | None, str]:
    """The segments (with one for the sacrum added when the bodies' signal missed it), the
    sacrum's index among them (None when not in the field), and why it is unsafe ("" if not).

    The sacrum is the lowest pelvic run; segments starting in it are sacral, the highest of them
    the sacrum's; the next one up must start above it (a disc between)."""
    sz = spacing[0]
    if not pelvis.runs:
        return segs, None, ""
    start, stop = pelvis.runs[0]
    top = stop - 1
    # at least the next slice: a segment starting there starts at the ring's top, give or take
    # the slice (the L5-S1 disc parts a true L5 from it by more)
    slack = max(SACRAL_SLACK_MM / sz, 1.0)
    sacral = [i for i, s in enumerate(segs) if s.z0 <= top + slack]
    if sacral:
        i = sacral[-1]
        if (segs[i].z1 - top) * sz > FUSED_MM:
            return segs, None, "lowest lumbar body not parted from the sacrum: level count unsafe"
        out = segs
        if i + 1 < len(out):  # S1's top may lie above what the wall signal made of it
            gap = (out[i + 1].z0 - max(out[i].z1, stop)) * sz
            out[i + 1].gap_below_mm = max(gap - S1_ABOVE_RING_MM, 0.0)
    else:
        height = (stop - start) * sz
        sac = Segment(start, stop, height, (start + stop - 1) / 2, start == 0)
        out = [sac, *segs]
        if len(out) > 1:  # S1's top lies some way above where its joints establish it
            out[1].gap_below_mm = max((out[1].z0 - stop) * sz - S1_ABOVE_RING_MM, 0.0)
        i = 0
    for a, b in pelvis.runs[1:]:  # a pelvis-like ring over a lumbar body: upside down, or odd
        if _beside_one_body(a, b, out, sz):
            continue
        if any(s.z_mid < a for s in out[i + 1 :]):
            return (
                out,
                None,
                "a pelvis-like ring above a lumbar body: orientation or anatomy unclear",
            )
    return out, i, ""


def _beside_one_body(a: int, b: int, segs: list[Segment], sz: float) -> bool:
    """Whether slices [a, b) are a short run at one vertebra's level, no disc within: bone and
    bright vessels reaching out beside a lumbar body (transverse processes, arteries in an
    arterial phase), not a sacrum with its ilia (fused segments over several discs' height)."""
    if (b - a) * sz >= UPPER_RING_MM:
        return False
    return any(s.z0 <= a and b <= s.z1 for s in segs)
