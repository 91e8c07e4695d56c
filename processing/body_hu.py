"""A small real pipeline: mean attenuation of the body (voxels above -500 HU, the largest
connected part) and of its soft tissue, on any device. It exercises the whole framework at a
fraction of the bone pipeline's cost (tests, smoke runs of a new installation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ThresholdIntensity
from pydicom.sr.codedict import codes
from scipy import ndimage

from processing.loader import to_zyx_lps
from processing.pipeline import OK, UNMEASURABLE, Finding, Pipeline, Segment, SeriesFacts


@dataclass(frozen=True)
class BodyHu(Pipeline):
    name: ClassVar[str] = "body-hu"
    version: ClassVar[str] = "1.0"

    body_hu: float = -500.0
    soft_low_hu: float = -100.0
    soft_high_hu: float = 100.0
    min_slices: int = 3

    def transforms(self) -> Any:
        """Padding outside the scanned circle (often -2000 or -3024) counts as air."""
        return ThresholdIntensity(threshold=-1024.0, above=True, cval=-1024.0)

    def run(
        self, image: MetaTensor, facts: SeriesFacts, *, model: Any, device: torch.device
    ) -> Finding:
        vol, _ = to_zyx_lps(image)
        vol = vol.to(device)
        mask = (vol > self.body_hu).cpu().numpy()
        lab, n = ndimage.label(mask)
        if n == 0:
            return Finding(UNMEASURABLE, {}, reason="no body in the field of view")
        largest = np.bincount(lab.ravel())[1:].argmax() + 1
        body = lab == largest
        body_t = torch.as_tensor(body, device=vol.device)
        soft_t = body_t & (vol >= self.soft_low_hu) & (vol <= self.soft_high_hu)
        seg = _segment("Body", codes.SCT.Abdomen, vol, body_t)
        soft = _segment("Soft tissue", codes.SCT.Tissue, vol, soft_t)
        values = {
            "body_mean_hu": seg.mean_hu,
            "body_voxels": seg.n_voxels,
            "soft_mean_hu": soft.mean_hu,
            "soft_voxels": soft.n_voxels,
        }
        zs = np.nonzero(body.any(axis=(1, 2)))[0]
        return Finding(
            OK,
            values,
            segments=[s for s in (seg, soft) if s.n_voxels],
            levels={"body": (int(zs[0]), int(zs[-1]) + 1)},
            summary=f"body {seg.mean_hu:.1f} HU",
        )


def _segment(label: str, site: Any, vol: torch.Tensor, mask: torch.Tensor) -> Segment:
    vals = vol[mask].double()
    n = int(vals.numel())
    return Segment(
        label,
        site,
        mask.cpu().numpy(),
        mean_hu=round(float(vals.mean()), 3) if n else None,
        median_hu=round(float(vals.median()), 3) if n else None,
        sd_hu=round(float(vals.std()), 3) if n > 1 else None,
        n_voxels=n,
    )
