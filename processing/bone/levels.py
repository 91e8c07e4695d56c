"""Ribs, sacrum and level names: L1 found below the lowest ribs and five above the sacrum.

Label codes (shared with SEG output later): T1..T12 = 1..12, L1..L5 = 13..17, sacrum = 18.
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


def find_ribs(
    vol: torch.Tensor,
    col: Column,
    segs: list[Segment],
    spacing: tuple[float, float, float],
    bone_hu: float,
) -> list[Rib]:
    """Bone components apart from the column that start near it and reach far round the body."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    dev = vol.device
    f, fz = max(1, int(1.6 / sx)), max(1, int(2.5 / sz))
    small = vol > bone_hu
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
        side = 1 if float(xc[x_s]) > float(tx[z_s]) else -1
        ribs.append(Rib(z, side, float(dmax[i]), _attach(z, segs, sz)))
    return ribs


def _attach(z: float, segs: list[Segment], sz: float) -> int | None:
    for i, s in enumerate(segs):
        if s.z0 - 3.0 / sz <= z < s.z1 + 3.0 / sz:
            return i
    return None


def find_sacrum(
    vol: torch.Tensor,
    col: Column,
    segs: list[Segment],
    spacing: tuple[float, float, float],
    bone_hu: float,
) -> tuple[int | None, str]:
    """Index of the sacrum segment (lowest, with alae: much wider than the bodies), and a note."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    if len(segs) < 2:
        return None, "too few segments to find the sacrum"
    widths = []
    for s in segs:
        zs = slice(s.z0, s.z1)
        ya = float(np.median(col.y_ant[zs]))
        cx = float(np.median(col.tx[zs]))
        y0, y1 = max(int(ya), 0), min(int(ya + 18.0 / sy) + 1, ny)
        x0, x1 = max(int(cx - 65.0 / sx), 0), min(int(cx + 65.0 / sx) + 1, nx)
        rows = (vol[zs, y0:y1, x0:x1] > bone_hu).any(1)  # (z, x)
        xs = torch.arange(x1 - x0, device=vol.device)[None, :].expand_as(rows)
        big = torch.full_like(xs, 10**6)
        lo = torch.where(rows, xs, big).amin(1)
        hi = torch.where(rows, xs, -big).amax(1)
        w = ((hi - lo + 1).clamp(min=0).float() * sx).median()
        widths.append(float(w))
    widths_a = np.asarray(widths)
    typical = float(np.median(widths_a[1:])) if len(segs) > 2 else float(widths_a[-1])
    wide = widths_a > 1.6 * max(typical, 1.0)
    if not wide.any():
        return None, ""
    if wide[1:].any():
        return None, "a sacrum-like wide segment above the lowest: orientation or anatomy unclear"
    return 0, ""


def assign_levels(
    segs: list[Segment], ribs: list[Rib], sacrum: int | None, sacrum_note: str = ""
) -> Levels:
    """Name the segments when ribs and sacrum agree on L1; otherwise say why not."""
    names: list[str | None] = [None] * len(segs)
    # nothing rib-like starting at the sacrum is a rib (iliac wings reach out from there)
    ribs = [r for r in ribs if r.segment is not None and r.segment != sacrum]
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
    if sacrum is None:
        out.reason = "sacrum not in the field: the rib count cannot be cross-checked"
        return out
    sides = {r.side for r in ribs if r.segment == lowest}
    if sides != {-1, 1}:
        out.reason = "lowest ribs on one side only: rib count ambiguous"
        return out
    for i in range(lowest, len(segs)):  # every whole vertebra above must bear ribs too
        if i not in bearing and not segs[i].cut:
            out.reason = "rib pattern irregular (a vertebra above the lowest ribs has none)"
            return out
    for i in range(sacrum + 1, lowest + 1):
        if segs[i].tall:
            out.reason = "two vertebrae may be merged (disc not seen): level count unsafe"
            return out
        if segs[i].split:
            out.reason = "a vertebra may be split (a false disc): level count unsafe"
            return out
        if segs[i].gap_below_mm > MAX_DISC_MM:
            out.reason = "a vertebra may be missing (gap too long for a disc): level count unsafe"
            return out
    l1_ribs, l1_sacrum = lowest - 1, sacrum + 5
    if l1_ribs != l1_sacrum:
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
    return out
