"""Ribs and level names: L1 found below the lowest ribs and five above the sacrum
(processing.bone.pelvis finds the sacrum).

Label codes (shared with SEG output later): T1..T12 = 1..12, L1..L5 = 13..17, sacrum = 18.
Level rules: "both" (default) names L1 only when the ribs and the sacrum agree;
"ribs-if-no-sacrum" also names it from the lowest ribs alone when the field is established to
end above the sacrum (its lowest slice cuts a lumbar body or disc), flagged as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from processing.bone.segment import Column, Segment

NAMES = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
CODES = {name: i + 1 for i, name in enumerate(NAMES)} | {"S": 18}
MAX_DISC_MM = 25.0  # a longer gap between bodies hides a body the wall signal missed
CORE_MM = 28.0  # the column itself, about its track: ribs are followed outside it
BODY_HALF_MM = 30.0  # and the bodies in front of the track, this far to each side
RULES = ("both", "ribs-if-no-sacrum")
RIBS_ONLY = "level from ribs only"


@dataclass
class Rib:
    z: float  # slice of the medial end (canonical index)
    side: int  # +1 patient left, -1 right
    reach_mm: float  # farthest point from the column, in plane
    segment: int | None  # index into the segments, None if unattached


@dataclass
class Levels:
    """Names per segment (None where unnamed), the L1 segment, and why not when it is None."""

    names: list[str | None]
    l1: int | None
    reason: str
    ribs: list[Rib] = field(default_factory=list)
    sacrum: int | None = None
    lowest_rib_segment: int | None = None
    ribs_only: bool = False  # named from the lowest ribs alone (rule "ribs-if-no-sacrum")


def find_ribs(
    vol: torch.Tensor,
    col: Column,
    segs: list[Segment],
    spacing: tuple[float, float, float],
    bone_hu: float,
) -> list[Rib]:
    """Paired, lateral bone running out from the column and round the body, articulating with it
    behind the bodies' anterior wall. Followed outside the column's core, so a rib whose joints
    are closed at CT resolution (head on the body, neck on the transverse process) is still one
    structure of its own; a contrast-filled renal artery starts in front of the bodies."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    dev = vol.device
    f, fz = max(1, int(1.6 / sx)), max(1, int(2.5 / sz))
    small = vol > bone_hu
    # not a noise speck (an enhanced kidney's): bone has bone beside it in the slice
    near = torch.nn.functional.avg_pool2d(small.float()[:, None], 3, 1, 1)[:, 0] * 9.0
    small = small & (near >= 3.0)
    if f > 1 or fz > 1:
        pooled = torch.nn.functional.max_pool3d(
            small.float()[None, None], (fz, f, f), (fz, f, f), ceil_mode=True
        )
        small = pooled[0, 0] > 0
    zc = np.minimum((np.arange(small.shape[0]) + 0.5) * fz - 0.5, nz - 1)
    ty = torch.as_tensor(np.interp(zc, np.arange(nz), col.ty), device=dev, dtype=torch.float32)
    tx = torch.as_tensor(np.interp(zc, np.arange(nz), col.tx), device=dev, dtype=torch.float32)
    yc = (torch.arange(small.shape[1], device=dev) + 0.5) * f - 0.5
    xc = (torch.arange(small.shape[2], device=dev) + 0.5) * f - 0.5
    dist = torch.hypot(
        (yc[None, :, None] - ty[:, None, None]) * sy, (xc[None, None, :] - tx[:, None, None]) * sx
    )
    # the column's core: about its track, and the body in front of it (its front wall runs from
    # one side to the other, and would join a left rib to a right one through it)
    ya = torch.as_tensor(np.interp(zc, np.arange(nz), col.y_ant), device=dev, dtype=torch.float32)
    dy = yc[None, :, None] - ty[:, None, None]
    body = (dy <= 0) & (yc[None, :, None] >= ya[:, None, None] - 4.0 / sy)
    body = body & ((xc[None, None, :] - tx[:, None, None]).abs() * sx < BODY_HALF_MM)
    small = small & (dist >= CORE_MM) & ~body
    # 26-connected: a rib descending through thick slices steps diagonally from one to the next
    lab, n = ndimage.label(small.cpu().numpy(), structure=np.ones((3, 3, 3)))
    if n == 0:
        return []
    where = np.nonzero(lab)
    lv, dd = lab[where], dist.cpu().numpy()[where]
    lateral = np.abs(xc.cpu().numpy()[where[2]] - tx.cpu().numpy()[where[0]]) * sx
    wide = np.zeros(n + 1)
    np.maximum.at(wide, lv, lateral)
    order = np.lexsort((dd, lv))  # by label, then distance
    lv, dd = lv[order], dd[order]
    first = np.r_[0, np.nonzero(np.diff(lv))[0] + 1]
    last = np.r_[first[1:] - 1, lv.size - 1]
    dmin, dmax = dd[first], dd[last]
    pos = [tuple(int(w[order[j]]) for w in where) for j in first]
    ribs = []
    # a rib starts beside the column and runs out sideways (a vessel or a process does not)
    keep = (dmin > 12.0) & (dmin < 45.0) & (dmax > 60.0) & (wide[lv[first]] > 55.0)
    for i in np.nonzero(keep)[0]:
        z_s, y_s, x_s = pos[i]
        z = float(zc[z_s])
        if (float(yc[y_s]) - col.y_ant[int(round(z))]) * sy < 5.0:
            continue  # starts in front of the bodies: a vessel, not a rib
        side = 1 if float(xc[x_s]) > float(tx[z_s]) else -1
        ribs.append(Rib(z, side, float(dmax[i]), _attach(z, segs, sz)))
    return ribs


def _attach(z: float, segs: list[Segment], sz: float) -> int | None:
    for i, s in enumerate(segs):
        if s.z0 - 3.0 / sz <= z < s.z1 + 3.0 / sz:
            return i
    return None


def assign_levels(
    segs: list[Segment],
    ribs: list[Rib],
    sacrum: int | None,
    sacrum_note: str = "",
    *,
    ribs_only: bool = False,
) -> Levels:
    """Name the segments when ribs and sacrum agree on L1; otherwise say why not. With
    `ribs_only` (the caller established that the field ends above the sacrum and the project
    chose that rule), a missing sacrum is no refusal: L1 is named below the lowest ribs."""
    names: list[str | None] = [None] * len(segs)
    # nothing rib-like starting at or below the sacrum is a rib (iliac wings reach out from there)
    ribs = [r for r in ribs if r.segment is not None and (sacrum is None or r.segment > sacrum)]
    bearing = sorted({r.segment for r in ribs if r.segment is not None})
    lowest = bearing[0] if bearing else None
    out = Levels(names, None, "", ribs, sacrum, lowest)
    if sacrum_note:
        out.reason = sacrum_note
        return out
    for how, i in (
        ("below the lowest ribs", None if lowest is None else lowest - 1),
        ("five above the sacrum", None if sacrum is None else sacrum + 5),
    ):
        if i is not None and (i < 0 or i >= len(segs) or segs[i].cut):
            out.reason = f"L1 ({how}) is cut by or beyond the field of view"
            return out
    if lowest is None:
        out.reason = "no ribs attached to a vertebra in the field: L1 cannot be found from the ribs"
        return out
    if sacrum is None and not ribs_only:
        out.reason = "sacrum not in the field: the rib count cannot be cross-checked"
        return out
    if sacrum is None and lowest - 1 > 4:
        out.reason = "the field's lowest vertebra would be below L5 by the ribs: sacrum expected"
        return out
    # ribs are paired, and every whole vertebra above the lowest bears them; a rib missed on
    # one side (thin, coarse slices) is let pass only where the sacrum checks the count (a
    # one-sided 13th rib then disagrees with it: transitional); from the ribs alone, not
    sides = {r.side for r in ribs if r.segment == lowest}
    if sides != {-1, 1} and sacrum is None:
        out.reason = "lowest ribs on one side only: rib count ambiguous"
        return out
    for i in range(lowest, len(segs)):
        if i not in bearing and not segs[i].cut and sacrum is None:
            out.reason = "rib pattern irregular (a vertebra above the lowest ribs has none)"
            return out
    for i in range((-1 if sacrum is None else sacrum) + 1, lowest + 1):
        if segs[i].tall:
            out.reason = "two vertebrae may be merged (disc not seen): level count unsafe"
            return out
        if segs[i].split:
            out.reason = "a vertebra may be split (a false disc): level count unsafe"
            return out
        if segs[i].gap_below_mm > MAX_DISC_MM:
            out.reason = "a vertebra may be missing (gap too long for a disc): level count unsafe"
            return out
    l1_ribs = lowest - 1
    l1_sacrum = l1_ribs if sacrum is None else sacrum + 5
    if l1_ribs != l1_sacrum and sacrum is not None:
        n_lumbar = lowest - sacrum - 1
        out.reason = (
            f"{n_lumbar} rib-free vertebrae above the sacrum, 5 expected: transitional anatomy "
            "(11 or 13 rib pairs, or lumbosacral transition), L1 ambiguous"
        )
        return out
    for i in range(len(segs)):
        off = i - l1_ribs
        if i == sacrum:
            names[i] = "S"
        elif off <= 0:
            names[i] = f"L{1 - off}" if 1 - off <= 5 else None
        else:
            names[i] = f"T{13 - off}" if 13 - off >= 1 else None
    out.l1 = l1_ribs
    out.ribs_only = sacrum is None
    return out
