"""Spinal column and vertebral bodies on a canonical (S, P, L) torch volume.

The column is found as the most persistent bone mass near the body midline; the anterior wall of
the vertebral bodies is followed down a midline strip; a slice belongs to a body when that wall is
there (cortex in a band at the wall's depth) and to a disc when it is not. Runs of body slices are
the vertebral segments, numbered from the bottom.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch


def square_max(x: torch.Tensor, r: int) -> torch.Tensor:
    """`max_pool2d(x, 2r + 1, 1, r)` over the last two dims of a float tensor, as a running max
    along each: the same values, in ~log2(r) passes instead of (2r + 1)² comparisons a pixel (a
    15-pixel window over a 500-slice CT took over a second)."""
    return _running_max(_running_max(x, r, x.dim() - 1), r, x.dim() - 2)


def _running_max(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """The max over [i - r, i + r] along `dim` (what lies outside ignored), from maxima over
    windows doubling in width: the window is covered by two of width w, w <= 2r + 1 < 2w."""
    if r <= 0:
        return x
    n, k = x.shape[dim], 2 * r + 1
    pad = [0, 0] * (x.dim() - 1 - dim) + [r, r]
    m, w = torch.nn.functional.pad(x, pad, value=float("-inf")), 1
    while 2 * w <= k:
        m = torch.maximum(m.narrow(dim, 0, m.shape[dim] - w), m.narrow(dim, w, m.shape[dim] - w))
        w *= 2
    return torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, k - w, n))


@dataclass
class Column:
    """Per-slice track of the spine (pixel indices, float) and the anterior-wall signal."""

    tx: np.ndarray  # column centre x
    ty: np.ndarray  # column centre y (inside body or arch)
    y_ant: np.ndarray  # anterior wall of the bodies (interpolated across discs)
    wall: np.ndarray  # 0..1: how much of a body's anterior cortex the slice holds
    body_cy: float  # centre of the patient's body, y
    body_cx: float


@dataclass
class Segment:
    """A run of body slices [z0, z1) in canonical order (z0 inferior)."""

    z0: int
    z1: int
    height_mm: float
    z_mid: float  # wall-weighted centre slice (float index)
    cut: bool  # touches the field of view's top or bottom
    tall: bool = False  # much taller than its peers: two bodies merged?
    split: bool = False  # short, and with a neighbour it makes about one body: a false disc?
    gap_below_mm: float = 0.0  # disc space under it (0 for the lowest)


def box1d(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mean over a centred window of k (odd) samples along dim, renormalised at the edges."""
    if k <= 1:
        return t
    x = t.movedim(dim, -1)
    shape = x.shape
    x = torch.nn.functional.avg_pool1d(
        x.reshape(-1, 1, shape[-1]), k, stride=1, padding=k // 2, count_include_pad=False
    )
    return x.reshape(shape).movedim(-1, dim)


def _median_filter(a: np.ndarray, k: int) -> np.ndarray:
    r = max(k // 2, 0)
    if r == 0 or a.size == 0:
        return a.copy()
    p = np.pad(a, r, mode="edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(p, 2 * r + 1), axis=1)


def _solid(vol: torch.Tensor, hu: float, f: int, width_px: float) -> torch.Tensor:
    """Where the slices are above `hu` over regions at least `width_px` across in plane (a
    morphological opening on a grid `f` times coarser, brought back to full size)."""
    nz, ny, nx = vol.shape
    above = (vol[:, ::f, ::f] > hu).float()[:, None]
    k = max(3, round(width_px / f) | 1)
    eroded = 1.0 - square_max(1.0 - above, k // 2)
    opened = square_max(eroded, k // 2)[:, 0] > 0.5
    return opened.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, :ny, :nx]


def _best_path(coarse: torch.Tensor) -> torch.Tensor:
    """Per slice, the flat in-plane index of the cell on the best path through `coarse` that
    moves at most one cell a slice: the column is continuous, so a structure that is brighter
    for a few slices only (a contrast-filled aorta beside the sacrum) cannot take the track."""
    score = coarse[0]
    back = []
    for plane in coarse[1:]:
        best, where = torch.nn.functional.max_pool2d(
            score[None, None], 3, stride=1, padding=1, return_indices=True
        )
        back.append(where.flatten())
        score = plane + best[0, 0]
    steps = torch.stack(back).cpu().numpy() if back else np.zeros((0, 0), np.int64)
    path = [int(score.flatten().argmax())]  # one copy off the device, not one per slice
    for where in steps[::-1]:
        path.append(int(where[path[-1]]))
    return torch.as_tensor(path[::-1], device=coarse.device)


LOST_MAX_MM = 15.0  # a wall lost over a body's middle spans less than ~60 % of the shortest body


def _drop_lost_wall(on: np.ndarray, y_first: np.ndarray, sy: float, sz: float) -> np.ndarray:
    """`on` without the runs of slices where the wall found lies more than 8 mm behind the wall
    of the runs above and below it: a thin anterior cortex lost at coarse pixels (dimmer than
    the threshold over a body's middle) lets the search find its posterior wall, and enough
    such slices (with discs between) carry the running median back with them. Only a run
    within a body's middle (under `LOST_MAX_MM`) is such: a run as tall as a body is that
    body's wall (L5 behind S1's top and a vessel at L4's foot, 2 mm pixels)."""
    idx = np.nonzero(on)[0]
    if idx.size < 3:
        return on
    ys = y_first[idx]
    runs = np.split(np.arange(idx.size), np.nonzero(np.abs(np.diff(ys)) * sy >= 4.0)[0] + 1)
    depth = [float(np.median(ys[r])) for r in runs]
    out = on.copy()
    for k in range(1, len(runs) - 1):
        behind = min(depth[k] - depth[k - 1], depth[k] - depth[k + 1]) * sy > 8.0
        if behind and (idx[runs[k][-1]] - idx[runs[k][0]] + 1) * sz < LOST_MAX_MM:
            out[idx[runs[k]]] = False
    return out


def find_column(vol: torch.Tensor, spacing: tuple[float, float, float], bone_hu: float) -> Column:
    """Track the spinal column and the bodies' anterior wall through every slice."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    dev = vol.device
    body = (vol[::2, ::2, ::2] > -400.0).float()[:, None]
    # eroded ~3 mm and grown back: the table's thin shells under the back are not the body
    k = max(1, round(3.0 / (2 * sx)))
    body = square_max(1.0 - square_max(1.0 - body, k), k)[:, 0] > 0.5
    prof_x = body.sum((0, 1)).double()
    prof_y = body.sum((0, 2)).double()
    xs, ys = torch.arange(0, nx, 2, device=dev), torch.arange(0, ny, 2, device=dev)
    body_cx = float((prof_x * xs).sum() / prof_x.sum().clamp(min=1))
    body_cy = float((prof_y * ys).sum() / prof_y.sum().clamp(min=1))

    # coarse: bone fraction on a ~3 mm grid, smoothed over ~40 mm in z and ~30 mm in plane
    f, fz = max(1, round(3.0 / sx)), max(1, round(4.0 / sz))
    # dense bone only, and not what is thick and solid above bone_hu: a contrast-filled aorta
    # (up to ~550 HU in an arterial phase) survives an ~9 mm opening, a cortical shell does not
    bone = (vol > max(bone_hu, 450.0)) & ~_solid(vol, bone_hu, f, 9.0 / sx)
    bone = bone.float()[None, None]
    coarse = torch.nn.functional.avg_pool3d(bone, (fz, f, f), (fz, f, f), ceil_mode=True)[0, 0]
    coarse = box1d(coarse, max(1, round(40.0 / (sz * fz))) | 1, 0)
    coarse = box1d(coarse, max(1, round(30.0 / (sy * f))) | 1, 1)
    coarse = box1d(coarse, max(1, round(30.0 / (sx * f))) | 1, 2)
    xc = (torch.arange(coarse.shape[2], device=dev) + 0.5) * f - 0.5
    band = (xc - body_cx).abs() * sx < 40.0
    coarse = torch.where(band[None, None, :], coarse, torch.full_like(coarse, -1.0))
    flat = _best_path(coarse)
    cy_c = ((flat // coarse.shape[2]).double() + 0.5) * f - 0.5
    # x: centroid of the best row (the spine is left-right symmetric; an argmax is not)
    row = coarse[torch.arange(coarse.shape[0], device=dev), flat // coarse.shape[2]].clamp(min=0)
    wgt = row**2
    cx_c = (wgt * xc).sum(1).double() / wgt.sum(1).clamp(min=1e-9).double()
    zc = (np.arange(coarse.shape[0]) + 0.5) * fz - 0.5
    zf = np.arange(nz)
    ty = np.interp(zf, zc, _median_filter(cy_c.cpu().numpy(), 5))
    tx = np.interp(zf, zc, _median_filter(cx_c.cpu().numpy(), 5))
    tx = np.clip(tx, np.median(tx) - 50.0 / sx, np.median(tx) + 50.0 / sx)  # scoliosis: ~45 mm

    # anterior wall: first bone from the front in a midline strip, per strip column
    w = max(2, round(8.0 / sx))
    cols = torch.as_tensor(np.rint(tx), device=dev).long()[:, None] + torch.arange(
        -w, w + 1, device=dev
    )
    cols = cols.clamp(0, nx - 1)
    strip = vol.gather(2, cols[:, None, :].expand(nz, ny, 2 * w + 1))
    yy = torch.arange(ny, device=dev)[None, :, None]
    ty_t = torch.as_tensor(ty, device=dev, dtype=torch.float32)[:, None, None]
    inside = (yy >= ty_t - 70.0 / sy) & (yy <= ty_t + 25.0 / sy)
    bs = (strip > bone_hu) & inside
    first = torch.where(bs, yy.expand_as(bs), torch.full_like(bs, ny, dtype=torch.long)).amin(1)
    first = torch.where(
        first < ny, first.float(), torch.full_like(first, float("nan"), dtype=torch.float32)
    )
    y_first = torch.nanmedian(first, dim=1).values.cpu().numpy().astype(float)
    has = (~torch.isnan(first)).float().mean(1).cpu().numpy()
    y_first[has < 0.5] = np.nan

    # which slices show the wall where it runs: near a running median of the first-bone depth
    r = max(1, round(25.0 / sz))
    pad = np.pad(y_first, r, mode="constant", constant_values=np.nan)
    win = np.lib.stride_tricks.sliding_window_view(pad, 2 * r + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows: no wall there
        run_med = np.nanmedian(win, axis=1)
    with np.errstate(invalid="ignore"):
        on = np.abs(y_first - run_med) * sy < 8.0
    on &= ~np.isnan(y_first)
    on = _drop_lost_wall(on, y_first, sy, sz)
    if on.sum() < 2:  # no wall found: a flat guess; no segment will come of it
        y_ant = np.full(nz, ty.mean() - 30.0 / sy)
    else:
        y_ant = np.interp(zf, zf[on], y_first[on])

    # wall signal: cortex in a +-4 mm band about the wall depth, linear in partial volume
    yb = torch.as_tensor(y_ant, device=dev, dtype=torch.float32)[:, None, None]
    band_rows = (yy >= yb - 4.0 / sy) & (yy <= yb + 4.0 / sy)
    peak = torch.where(band_rows, strip, torch.full_like(strip, -2000.0)).amax(1)
    v = peak.median(1).values.cpu().numpy().astype(float)
    if on.any() and (~on).any():
        v_body, v_gap = np.median(v[on]), np.median(v[~on])
    else:
        v_body, v_gap = max(float(np.median(v)), bone_hu + 1.0), 0.0
    wall = np.clip((v - v_gap) / max(v_body - v_gap, 1.0), 0.0, 1.0)
    return Column(tx, ty, y_ant, wall, body_cy, body_cx)


DISC_WALL = 0.25  # a disc's slices lose the anterior wall all but entirely


def split_bodies(col: Column, spacing: tuple[float, float, float]) -> list[Segment]:
    """Runs of body slices (wall > 0.5), short gaps closed, slivers dropped; bottom first.

    A gap is a disc only where the wall all but vanishes (below `DISC_WALL`): a weak wall
    (coarse pixels, a bright aorta against it) dips under 0.5 mid-body, and splitting there
    adds a vertebra that can agree with a wrong rib count. Merging errs safe: a body twice as
    tall as its peers is flagged `tall` and refused."""
    sz = spacing[0]
    on = col.wall > 0.5
    nz = on.size
    runs, z = [], 0
    while z < nz:
        if on[z]:
            z1 = z
            while z1 < nz and on[z1]:
                z1 += 1
            runs.append([z, z1])
            z = z1
        else:
            z += 1
    merged: list[list[int]] = []
    for a, b in runs:  # a gap under 3 mm, or where the wall stays, is not a disc
        if merged and (
            (a - merged[-1][1]) * sz < 3.0 or col.wall[merged[-1][1] : a].min() >= DISC_WALL
        ):
            merged[-1][1] = b
        else:
            merged.append([a, b])
    segs = []
    for a, b in merged:
        lo, hi = max(a - 1, 0), min(b + 1, nz)
        wsum = col.wall[lo:hi]
        height = float(wsum.sum() * sz)
        cut = a == 0 or b == nz
        if height < 6.0 and not cut:
            continue
        z_mid = float((np.arange(lo, hi) * wsum).sum() / max(wsum.sum(), 1e-6))
        segs.append(Segment(a, b, height, z_mid, cut))
    for lower, upper in zip(segs, segs[1:], strict=False):
        upper.gap_below_mm = (upper.z0 - lower.z1) * sz
    full = [s.height_mm for s in segs if not s.cut]
    if full:
        typical = float(np.median(full))
        for s in segs:
            s.tall = not s.cut and s.height_mm > 1.6 * typical
        _mark_splits(segs, typical)
    return segs


def _mark_splits(segs: list[Segment], typical: float) -> None:
    """Two neighbours, one of them short, that with the gap between them span about one body
    are a body split at a false disc. A collapsed (fractured) body is short too, but with its
    neighbour and a real disc it spans far more than one body."""
    for lo, hi in zip(segs, segs[1:], strict=False):
        if lo.cut or hi.cut or min(lo.height_mm, hi.height_mm) >= 0.65 * typical:
            continue
        if lo.height_mm + hi.height_mm + hi.gap_below_mm <= 1.35 * typical:
            lo.split = hi.split = True


def wall_from_mask(col: Column, mask: np.ndarray, spacing: tuple[float, float, float]) -> str:
    """Replace the wall signal with a body mask's per-slice area (a learned segmenter's), after
    checking the mask looks like a column of bodies; returns why not ("" when it does)."""
    sz, sy, sx = spacing
    if mask.ndim != 3 or mask.shape[0] != col.wall.size or not mask.any():
        return "no vertebral body found"
    # the mask must sit on the column the classical track follows, not on ribs, pelvis or vessels
    zz, yy, xx = np.nonzero(mask)
    near = np.hypot((yy - col.ty[zz]) * sy, (xx - col.tx[zz]) * sx) <= 45.0
    away = 1.0 - float(near.mean())
    if away > 0.25:
        return f"{away:.0%} of the body voxels lie away from the spinal column"
    area = np.bincount(zz[near], minlength=mask.shape[0]) * sy * sx  # stray voxels left out
    on = area > 150.0
    if on.sum() * sz < 40.0:
        return f"bodies on {on.sum() * sz:.0f} mm of the column, too little for a spine"
    typical = float(np.median(area[on]))
    if not 300.0 <= typical <= 4000.0:
        return f"body cross-section {typical:.0f} mm², not a vertebral body's"
    col.wall = np.clip(area / typical, 0.0, 1.0)
    return ""
