"""Bone density on the GPU against the CPU, the same volumes on both: status, HU, seconds per CT.

Cases: `--n` draws of each phantom family (harness.bone_cases, the accuracy tables' grids) and
`--big` clinical-size phantoms (512x512, 0.75 mm pixels, harness.phantoms). Each goes the
pipeline's way on each device: the loader's MetaTensor on that device (`volume_tensor`, as
`load_series` makes it), `BoneDensity.run` (oriented once, segmented, measured). Printed: a line
per case (status and L1 HU on each device), then the largest |GPU - CPU| over every measured
level's HU, the status disagreements, and the seconds per CT on each device (warm: the first
case runs once untimed on each). Figures are printed, not asserted.

    python benchmarks/bone_gpu_cpu.py [--n 6] [--big 2] [--against cuda]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from harness.bone_cases import draw
from harness.phantoms import make_phantom
from processing.bone_density import BoneDensity
from processing.loader import volume_tensor
from processing.pipeline import Finding, SeriesFacts

LEVELS = ("t12_hu", "l1_hu", "l2_hu", "l3_hu", "l4_hu")


def run_on(vol: np.ndarray, truth: Any, device: torch.device) -> tuple[Finding, float]:
    """The pipeline's way on `device`: load (stored values to HU there), run; seconds."""
    attrs = {"affine": truth.affine.tolist(), "spacing": list(truth.spacing), "modality": "CT"}
    facts = SeriesFacts("CT", vol.shape[0], vol.shape, truth.spacing, truth.spacing[0],
                        (0.0, 0.0, 1.0), True, ("ORIGINAL",), 120.0, False)  # fmt: skip
    t = time.perf_counter()
    image = volume_tensor(vol, attrs, "bench", device=device)
    finding = BoneDensity().run(image, facts, model=None, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return finding, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="cases per phantom family")
    ap.add_argument("--big", type=int, default=2, help="512x512 phantoms")
    ap.add_argument("--against", default="cuda", help="the device compared with the CPU")
    args = ap.parse_args()
    cpu, gpu = torch.device("cpu"), torch.device(args.against)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bone_gpu_cpu: torch sees no CUDA device")
    name = torch.cuda.get_device_name(gpu) if gpu.type == "cuda" else str(gpu)
    print(f"against: {name}, torch {torch.__version__}")
    cases: list[tuple[str, Any]] = [
        (f"{f}#{i}", draw(f, i).make) for f in "AB" for i in range(args.n)
    ]
    for i in range(args.big):
        big = dict(shape_yx=(512, 512), pixel_mm=0.75, slice_spacing_mm=2.5 / (i + 1), seed=i)
        cases.append((f"512x512 {big['slice_spacing_mm']} mm", lambda b=big: make_phantom(**b)))
    worst, disagree = 0.0, 0
    seconds: dict[str, list[float]] = {"cpu": [], args.against: []}
    for k, (name, make) in enumerate(cases):
        vol, truth = make()
        if k == 0:  # warm: CUDA's context and kernels, the CPU's first allocations
            run_on(vol, truth, cpu), run_on(vol, truth, gpu)
        c, tc = run_on(vol, truth, cpu)
        g, tg = run_on(vol, truth, gpu)
        seconds["cpu"].append(tc)
        seconds[args.against].append(tg)
        diffs = [
            abs(g.values[lv] - c.values[lv])
            for lv in LEVELS
            if c.values.get(lv) is not None and g.values.get(lv) is not None
        ]
        same = c.status == g.status and c.reason == g.reason
        disagree += not same
        worst = max([worst, *diffs])
        print(
            f"{name:22} {'x'.join(map(str, vol.shape)):>13}  CPU {c.status:12} "
            f"L1 {c.values.get('l1_hu')!s:>7} {tc:6.2f} s   GPU {g.status:12} "
            f"L1 {g.values.get('l1_hu')!s:>7} {tg:6.2f} s   max|diff| "
            f"{max(diffs, default=0.0):.3f} HU{'' if same else '  STATUS DIFFERS: ' + g.reason}"
        )
    print(
        f"{len(cases)} CTs: max |GPU - CPU| {worst:.3f} HU over the measured levels; "
        f"status or reason differs on {disagree}"
    )
    for dev, s in (("cpu", seconds["cpu"]), (args.against, seconds[args.against])):
        print(f"seconds per CT on {dev}: mean {np.mean(s):.2f}, max {np.max(s):.2f}")


if __name__ == "__main__":
    main()
