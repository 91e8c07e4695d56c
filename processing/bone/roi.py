"""Trabecular ROI of one vertebral body: an ellipse inside the body's interior at mid-height,
clear of the cortex and of the basivertebral vein (posterior middle)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from processing.bone.segment import Column, Segment, square_max


@dataclass
class BodyRoi:
    """ROI of one body in canonical indices: slab slices [z0, z1), a 2D mask on a crop box."""

    z0: int
    z1: int
    y0: int
    x0: int
    roi: np.ndarray  # bool (h, w): ROI pixels
    body: np.ndarray  # bool (h, w): filled body (cortex and interior)
    area_mm2: float
    note: str = ""


def _grow(mask: torch.Tensor, r: int) -> torch.Tensor:
    if r <= 0:
        return mask
    m = mask.float()[None, None]
    return square_max(m, r)[0, 0] > 0


def _shrink(mask: torch.Tensor, r: int) -> torch.Tensor:
    return ~_grow(~mask, r)


NECK = 0.4  # a row this much narrower than the body's widest, behind it: the canal's neck


def _cut_neck(filled: np.ndarray, sy_i: int) -> np.ndarray:
    """The interior in front of its neck: where the posterior wall is open (the basivertebral
    foramen, a thin cortex lost to partial volume) the interior runs on into the canal through
    a narrow neck; rows from the first one under `NECK` of the widest so far are left out."""
    widths = filled.sum(1)
    widest = 0
    for y in range(max(sy_i, 0), filled.shape[0]):
        widest = max(widest, int(widths[y]))
        if widest and widths[y] < NECK * widest:
            out = filled.copy()
            out[y:] = False
            return out
    return filled


def body_roi(
    vol: torch.Tensor,
    col: Column,
    seg: Segment,
    spacing: tuple[float, float, float],
    bone_hu: float,
    area_mm2: float = 200.0,
) -> BodyRoi | None:
    """ROI for one segment, or None when no closed trabecular interior is found."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    half = max(0.5 * sz, min(5.0, 0.2 * seg.height_mm))
    zs = [z for z in range(seg.z0, seg.z1) if abs(z - seg.z_mid) * sz <= half + 1e-6]
    if not zs:
        zs = [min(max(int(round(seg.z_mid)), seg.z0), seg.z1 - 1)]
    z0, z1 = zs[0], zs[-1] + 1
    zm = int(round(seg.z_mid))
    ya, cx = float(col.y_ant[zm]), float(col.tx[zm])
    y0, y1 = max(int(ya - 6.0 / sy), 0), min(int(ya + 70.0 / sy) + 1, ny)
    x0, x1 = max(int(cx - 45.0 / sx), 0), min(int(cx + 45.0 / sx) + 1, nx)
    img = vol[z0:z1, y0:y1, x0:x1].mean(0)
    sy_i, sx_i = int(round(ya + 10.0 / sy)) - y0, int(round(cx)) - x0
    rs = max(1, round(4.0 / sx))
    inner = None
    # a thickened shell bridges its pinholes; thicken more only when needed, then grow back;
    # a dense interior (>= bone_hu) is looked for again under a cortex-only threshold
    radii = sorted({max(1, round(1.0 / sx)), max(2, round(2.0 / sx)), max(3, round(3.0 / sx))})
    for thr, r1 in [(t, r) for t in (bone_hu, max(bone_hu, 450.0)) for r in radii]:
        if inner is not None:
            break
        raw = img > thr
        lab, _ = ndimage.label(~_grow(raw, r1).cpu().numpy())
        border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
        seed = lab[max(sy_i - rs, 0) : sy_i + rs + 1, max(sx_i - rs, 0) : sx_i + rs + 1].ravel()
        cand = [v for v in np.unique(seed) if v and v not in border]
        if not cand:
            continue
        best = max(cand, key=lambda v: int((seed == v).sum()))
        grown = _grow(torch.as_tensor(lab == best, device=vol.device), r1) & ~raw
        filled = ndimage.binary_fill_holes(grown.cpu().numpy())  # specks stay inside
        filled = _cut_neck(filled, sy_i)
        yy, xx = np.nonzero(filled)
        if yy.size * sy * sx >= 150.0 and (yy.max() - yy.min()) * sy >= 12.0:
            inner = filled
    if inner is None:
        return None
    yy, xx = np.nonzero(inner)
    cyi, cxi = yy.mean(), xx.mean()
    ayi, axi = (yy.max() - yy.min() + 1) / 2, (xx.max() - xx.min() + 1) / 2
    k = min(0.7, math.sqrt(area_mm2 / (math.pi * ayi * axi * sy * sx)))
    ey, ex = cyi - 0.15 * ayi, cxi
    gy, gx = np.mgrid[0 : inner.shape[0], 0 : inner.shape[1]]
    ell = ((gy - ey) / (k * ayi)) ** 2 + ((gx - ex) / (k * axi)) ** 2 <= 1.0
    inner_t = torch.as_tensor(inner, device=vol.device)
    away = _shrink(inner_t, max(1, round(2.0 / sx))).cpu().numpy()  # 2 mm clear of the cortex
    vein = (gy > cyi + 0.25 * ayi) & (np.abs(gx - cxi) < 0.35 * axi)
    roi = ell & away & ~vein
    body = ndimage.binary_fill_holes(_grow(inner_t, max(1, round(2.5 / sx))).cpu().numpy())
    area = float(roi.sum() * sy * sx)
    note = "ROI small" if area < 0.5 * area_mm2 else ""
    return BodyRoi(z0, z1, y0, x0, roi, body, area, note)
