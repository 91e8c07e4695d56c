"""Vertebral heights and compression-fracture grades (Genant semi-quantitative).

Each body's anterior, middle and posterior heights are read in its mid-sagittal plane, between
the outer edges of its endplates (found outward from the body's centre, so a sclerotic band under
a sunken endplate is part of it), each edge placed within a slice by partial volume, with an SD.
Each height is compared with the same height of up to two bodies above and below (their median,
each scaled to this level by typical heights): a wedge loses the anterior height, a biconcave
body the middle one, a crushed body all three. Grade 1: 20-25 % lost, 2: 25-40 %, 3: over 40 %;
a grade is sure only when it holds over the loss's SD (on 2.5 mm slices it seldom does for
grade 1: the line to grade 2 is ~1.3 mm on a 25 mm body).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from processing.bone.segment import Segment

MAX_SLICE_MM = 3.0  # thicker slices blur an endplate over a fifth of a body: no grading
POSITIONS = ("anterior", "middle", "posterior")
KIND = {"anterior": "wedge", "middle": "biconcave", "posterior": "crush"}
G1, G2, G3 = 0.20, 0.25, 0.40  # Genant: grade 1 from 20 % of the height lost, 2 from 25, 3 over 40
NATURAL = 0.01  # neighbours' heights about their trend: a loss is not known better than this
# typical body heights (mm, relative only): bodies grow going down, to L3-L4; a peer's heights are
# scaled by these before it stands for another level (values as family A draws them)
TYPICAL = {"T8": 19.0, "T9": 20.0, "T10": 21.0, "T11": 22.0, "T12": 23.0, "L1": 25.0, "L2": 26.0}
TYPICAL |= {"L3": 27.0, "L4": 27.0, "L5": 26.0}
# a sound body's endplates are dished (a parabola across its depth): its full height, at the
# walls, is above the heights at 10 % and 90 % of the depth by 0.36 / 0.64 of what the middle
# lacks against them
DISH_TO_WALL = 0.36 / 0.64
CRUSH = 0.75  # all three heights lost within this of the largest: a crush, graded by the mean
PLATE_MM = 1.0  # an endplate's thickness, about
# the bright layer at an edge, on thick slices: an endplate alone, or with a sclerotic band under
# it (condensed trabeculae, a few mm); thinner slices see the band as the inside's own HU
LAYERS_MM = (PLATE_MM, 2.0, 3.0, 4.5)
BAND_SEEN_MM = 2.0  # slices up to this thick resolve a band: the endplate alone is fitted
ENDPLATE_HU = 40.0  # an endplate's slice over the body's middle, at least
NOISE_FLOOR_HU = 3.0  # a slice mean's noise, at least (texture, quantisation)


@dataclass
class Heights:
    """A body's heights (mm) at 10 %, 50 % and 90 % of its depth, mid-sagittal."""

    anterior: float
    middle: float
    posterior: float
    sd: float = 0.0  # the largest of the three's SD (mm), from how well the edges are placed

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.anterior, self.middle, self.posterior)

    def as_level(self, name: str, peer: str) -> Heights:
        """These heights of level `peer` scaled to what level `name` has (`TYPICAL`)."""
        k = TYPICAL.get(name, 1.0) / TYPICAL.get(peer, 1.0)
        return Heights(self.anterior * k, self.middle * k, self.posterior * k, self.sd * k)


def body_heights(
    vol: torch.Tensor,
    seg: Segment,
    spacing: tuple[float, float, float],
    cx: float,
    y_front: float,
    y_back: float,
    z_lo: int,
    z_hi: int,
) -> Heights | None:
    """Heights of one body along column cx (its centre), whose depth there runs from y_front to
    y_back (the outer borders of its first and last rows, in row units), its endplates lying in
    slices [z_lo, z_hi) (from the body under it to the body over it). Each height is read in a
    box about its point, pixels at the box's border weighed by their share of it, so the points
    keep their place on coarse pixels (rounded to a row, 10 % of the depth moved by up to 3 %)."""
    sz, sy, sx = spacing
    nz, ny, nx = vol.shape
    if sz > MAX_SLICE_MM or y_back - y_front < 8.0 / sy:
        return None
    zm = int(round(seg.z_mid))
    z0, z1 = max(z_lo, 0), min(z_hi, nz)
    if zm - z0 < 2 or z1 - zm < 3:
        return None
    x_lo, wx = _box(cx, max(1, round(3.0 / sx)) + 0.5, nx)
    hy = max(1, round(1.5 / sy)) + 0.5
    out, sds = [], []
    for f in (0.1, 0.5, 0.9):
        y_lo, wy = _box(y_front + f * (y_back - y_front), hy, ny)
        box = vol[z0:z1, y_lo : y_lo + wy.size, x_lo : x_lo + wx.size].double()
        w = torch.as_tensor(np.outer(wy, wx), dtype=box.dtype, device=box.device)
        prof = ((box * w).sum((1, 2)) / w.sum()).cpu().numpy()
        # the noise of a slice's mean: from the spread inside the box at the body's middle
        flat = box.reshape(box.shape[0], -1)
        mid = flat[max(zm - z0 - 1, 0) : zm - z0 + 2].std(1).median()
        sigma = max(NOISE_FLOOR_HU, float(mid) / math.sqrt(float(w.sum())))
        got = _between_endplates(prof, zm - z0, prof.size, sz, sigma)
        if got is None:
            return None
        out.append(got[0])
        sds.append(got[1])
    return Heights(out[0], out[1], out[2], max(sds))


def _box(c: float, half: float, n: int) -> tuple[int, np.ndarray]:
    """The pixels [lo, lo + len(w)) of [0, n) that the interval c +- half (pixel units) covers,
    and the share of each it covers."""
    lo = min(max(int(math.floor(c - half + 0.5)), 0), n - 1)
    hi = min(max(int(math.floor(c + half + 0.5)), lo), n - 1)
    j = np.arange(lo, hi + 1, dtype=float)
    w = np.clip(np.minimum(j + 0.5, c + half) - np.maximum(j - 0.5, c - half), 0.0, 1.0)
    return lo, w if w.sum() > 0 else np.ones_like(w)


def _between_endplates(
    p: np.ndarray, c: int, hi: int, sz: float, sigma: float
) -> tuple[float, float] | None:
    """Distance (mm) between the outer edges of the endplates above and below index c, and its
    SD: each edge is first placed at the slice where the profile drops most going outward, from
    the (bright) endplate to the disc, then fitted within a slice or so (`_fit_edge`)."""
    edges, var = [], 0.0
    # an endplate is brighter than the body's middle: a drop from no brighter is not one (a wall
    # grazed by the box, noise in a body as dark as the disc)
    floor = float(np.median(p[max(c - 2, 0) : c + 3])) + ENDPLATE_HU
    for step in (1, -1):
        ks = range(c, hi - 1) if step == 1 else range(c, 0, -1)
        drops = [(p[k] - p[k + step], k) for k in ks if p[k] >= floor]
        if not drops or max(drops)[0] < 30.0:  # no bright endplate (a sunken one, tilted): any
            drops = [(p[k] - p[k + step], k) for k in ks]
            # but one the profile climbs back from is a dip inside the body (a dim body, the
            # wall grazing the box), not the disc: the disc stays low for ~6 mm
            ahead = max(2, math.ceil(6.0 / sz))
            stays = [
                (d, k)
                for d, k in drops
                if _past(p, k, step, ahead, hi).max(initial=-np.inf) < p[k] - 15.0
            ]
            drops = stays or drops
        if not drops:
            return None
        drop, k = max(drops)
        if drop < 30.0:
            return None
        m, sd = _fit_edge(p, k, step, sz, sigma)
        edges.append(m)
        var += sd * sd
    return abs(edges[0] - edges[1]) * sz, math.sqrt(var) * sz


def _past(p: np.ndarray, k: int, step: int, n: int, hi: int) -> np.ndarray:
    """The profile's next `n` values past slice k going `step`, within [0, hi)."""
    return p[k + 1 : min(k + 1 + n, hi)] if step == 1 else p[max(k - n, 0) : k]


def _fit_edge(p: np.ndarray, k: int, step: int, sz: float, sigma: float) -> tuple[float, float]:
    """Where (slice units) the body ends near slice k, its last slice inside going `step`, and
    the SD of that: each slice holds the disc, a bright layer at the edge (of unknown HU) and
    the inside (of unknown HU) in the proportions an edge at E makes; E weighed over the slice
    on either side by how well it explains the five slices about it (a least-squares fit per E,
    a flat prior, noise `sigma`). The layer is the endplate (`PLATE_MM`); on slices too thick
    to resolve it, also a sclerotic band under it (`LAYERS_MM`, weighed alike): a band read as
    a thin plate puts the edge a slice inside, so a graded body reads a grade too low in height.
    Partial volume so places an edge within a slice where the inside differs from the disc;
    where the two look alike, only the layer's share of two slices does, and the SD says how
    little is known."""
    n = p.size
    js = np.array([k + step * d for d in (-2, -1, 0, 1, 2)])
    js = js[(js >= 0) & (js < n)]
    far = k + 2 * step if 0 <= k + 2 * step < n else k + step
    e = np.linspace(k - 0.5 * step, k + 1.5 * step, 81)[:, None, None]
    t = np.array(LAYERS_MM if sz > BAND_SEEN_MM else (PLATE_MM,))[None, :, None] / sz
    lo, hi = js - 0.5, js + 0.5
    if step == 1:  # the body below the edge
        inside = np.clip(e - lo, 0.0, 1.0)
        layer = np.clip(np.minimum(hi, e) - np.maximum(lo, e - t), 0.0, 1.0)
    else:
        inside = np.clip(hi - e, 0.0, 1.0)
        layer = np.clip(np.minimum(hi, e + t) - np.maximum(lo, e), 0.0, 1.0)
    inside = np.broadcast_to(inside, layer.shape)
    sse = _fit2(inside, layer, p[js] - p[far])
    # the noise: what the best fit leaves (2 degrees of freedom), at most the box's spread (which
    # counts structure too: a vein, a pedicle), at least a floor
    sigma = min(sigma, max(NOISE_FLOOR_HU, math.sqrt(float(sse.min()) / max(js.size - 3, 1))))
    w = np.exp(-(sse - sse.min()) / (2.0 * sigma * sigma)).sum(1)
    w /= w.sum()
    mean = float(w @ e[:, 0, 0])
    return mean, math.sqrt(float(w @ (e[:, 0, 0] - mean) ** 2))


def _fit2(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residual sum of squares of y ~ ca * a + cb * b (cb >= 0: an endplate is not darker than
    what it covers), for every row of a and b (..., n) at once."""
    aa, bb, ab = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
    ay, by, yy = a @ y, b @ y, float(y @ y)
    det = aa * bb - ab * ab
    ok = det > 1e-9 * np.maximum(aa * bb, 1e-12)
    safe = np.where(ok, det, 1.0)
    ca, cb = (bb * ay - ab * by) / safe, (aa * by - ab * ay) / safe
    both = yy - ca * ay - cb * by  # the normal equations' residual
    only_a = yy - ay * ay / np.maximum(aa, 1e-12)  # cb pinned at 0 (or a and b collinear)
    only_b = np.where(by > 0, yy - by * by / np.maximum(bb, 1e-12), yy)
    one = np.minimum(only_a, np.where(ok, yy, only_b))
    return np.maximum(np.where(ok & (cb >= 0.0), both, one), 0.0)


@dataclass
class Fracture:
    grade: int  # 0 sound, 1..3 (Genant); by the loss as read
    kind: str  # wedge, biconcave or crush
    loss: float  # the fraction of the body's height lost, as read
    sd: float = 0.0  # its SD (how well the slices place the endplates, and the peers' spread)

    @property
    def sure(self) -> bool:
        """Whether the grade holds over the loss +- its SD (the slices resolve it)."""
        lo, hi = self.loss - self.sd, self.loss + self.sd
        return _genant(lo) == _genant(hi)


def _genant(loss: float) -> int:
    return 0 if loss < G1 else 1 if loss < G2 else 2 if loss <= G3 else 3


def grade(own: Heights, peers: list[Heights]) -> Fracture | None:
    """Grade of a body against its peers (None without peers to compare). Each position's loss
    is the height lost there over the body's full height (the peers' tallest, carried out to
    the walls past their endplates' dish), as Genant's fractions are of a body's height; the
    anterior one is carried from 10 % of the depth to the wall (a wedge's loss grows linearly
    forward); a crush (all three lost alike) by their mean."""
    if not peers:
        return None
    hs = np.array([p.as_tuple() for p in peers])
    ref = np.median(hs, axis=0)
    full = max(float(ref.max()) + DISH_TO_WALL * max(float(ref[[0, 2]].mean() - ref[1]), 0.0), 1e-6)
    lost = (ref - np.array(own.as_tuple())) / full
    losses = np.array([1.25 * lost[0] - 0.25 * lost[1], lost[1], lost[2]])
    i = int(np.argmax(losses))
    # the peers' spread about their median, and how well the endplates are placed
    ref_sd = max(p.sd for p in peers) * 1.25 / math.sqrt(len(peers))
    sd = math.hypot(math.hypot(own.sd, ref_sd) / full, NATURAL)
    if losses.min() >= CRUSH * losses.max() and losses.max() > 0:
        kind, loss = "crush", float(losses.mean())
    else:
        kind, loss = KIND[POSITIONS[i]], float(losses[i])
        sd *= 1.25 if i == 0 else 1.0
    return Fracture(_genant(loss), kind, loss, sd)
