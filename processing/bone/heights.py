"""Vertebral heights and compression-fracture grades (Genant semi-quantitative).

Each body's anterior, middle and posterior heights are read in its mid-sagittal plane, between
the outer edges of its endplates (found outward from the body's centre, so a sclerotic band under
a sunken endplate is part of it). Each height is compared with the same height of up to two
sound bodies above and below (their median): a wedge loses the anterior height, a biconcave body
the middle one, a crushed body all three. Grade 1: 20-25 % lost, 2: 25-40 %, 3: over 40 %
(the cut-offs calibrated on family A: `G1`, `G2`, `G3`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from processing.bone.segment import Column, Segment

MAX_SLICE_MM = 3.0  # thicker slices blur an endplate over a fifth of a body: no grading
POSITIONS = ("anterior", "middle", "posterior")
KIND = {"anterior": "wedge", "middle": "biconcave", "posterior": "crush"}
# Genant's 20 / 25 / 40 % less 2 %: heights read this way come out ~2-4 % short of the truth on
# the phantoms of family A (partial volume at the endplates); checked on family B
G1, G2, G3 = 0.18, 0.23, 0.38


@dataclass
class Heights:
    """A body's heights (mm) at 10 %, 50 % and 90 % of its depth, mid-sagittal."""

    anterior: float
    middle: float
    posterior: float

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.anterior, self.middle, self.posterior)


def body_heights(
    vol: torch.Tensor,
    col: Column,
    seg: Segment,
    spacing: tuple[float, float, float],
    y_front: float,
    y_back: float,
    z_lo: int,
    z_hi: int,
) -> Heights | None:
    """Heights of one body whose depth at the midline runs from row y_front to y_back, its
    endplates lying in slices [z_lo, z_hi) (from the body under it to the body over it)."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    if sz > MAX_SLICE_MM or y_back - y_front < 8.0 / sy:
        return None
    zm = int(round(seg.z_mid))
    cx = int(round(col.tx[min(max(zm, 0), nz - 1)]))
    z0, z1 = max(z_lo, 0), min(z_hi, nz)
    if zm - z0 < 2 or z1 - zm < 3:
        return None
    wx, wy = max(1, round(3.0 / sx)), max(1, round(1.5 / sy))
    out = []
    for f in (0.1, 0.5, 0.9):
        yc = int(round(y_front + f * (y_back - y_front)))
        box = vol[z0:z1, max(yc - wy, 0) : yc + wy + 1, max(cx - wx, 0) : cx + wx + 1]
        prof = box.mean((1, 2)).cpu().numpy().astype(float)
        h = _between_endplates(prof, zm - z0, 0, prof.size, sz)
        if h is None:
            return None
        out.append(h)
    return Heights(*out)


def _between_endplates(p: np.ndarray, c: int, lo: int, hi: int, sz: float) -> float | None:
    """Distance (mm) between the outer edges of the endplates above and below index c: each
    where the profile drops most from the (bright) endplate to the disc, going outward, within
    [lo, hi) (the disc spaces, not the next bodies)."""
    edges = []
    for step in (1, -1):
        ks = range(c, hi - 1) if step == 1 else range(c, lo, -1)
        drops = [(p[k] - p[k + step], k) for k in ks]
        if not drops:
            return None
        drop, k = max(drops)
        if drop < 30.0:
            return None
        # partial volume: how much of slices k and k+step lies inside, between the brightest of
        # the last ones inside and the disc further out; the edge is that far past k - step/2
        inside = max(p[k], p[k - step]) if 0 <= k - step < p.size else p[k]
        out = p[k + 2 * step] if 0 <= k + 2 * step < p.size else p[k + step]
        span = max(inside - out, 1e-6)
        amount = sum(min(max((p[j] - out) / span, 0.0), 1.0) for j in (k, k + step))
        edges.append(k - 0.5 * step + step * amount)
    return abs(edges[0] - edges[1]) * sz


@dataclass
class Fracture:
    grade: int  # 0 sound, 1..3 (Genant)
    kind: str  # wedge, biconcave or crush
    loss: float  # the largest fraction of height lost


def grade(own: Heights, peers: list[Heights]) -> Fracture | None:
    """Grade of a body against its sound peers (None without peers to compare)."""
    if not peers:
        return None
    ref = np.median(np.array([p.as_tuple() for p in peers]), axis=0)
    losses = 1.0 - np.array(own.as_tuple()) / np.maximum(ref, 1e-6)
    i = int(np.argmax(losses))
    loss = float(losses[i])
    kind = "crush" if losses.min() >= 0.2 else KIND[POSITIONS[i]]
    g = 0 if loss < G1 else 1 if loss < G2 else 2 if loss <= G3 else 3
    return Fracture(g, kind, loss)
