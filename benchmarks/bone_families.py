"""Bone density over both phantom families, side by side: measured, accuracy, refusals by
reason, mislabels. The same N draws (harness.bone_cases) are rendered by family A
(harness.phantoms) and family B (harness.phantoms_b) and run on the CPU.

    .venv/bin/python benchmarks/bone_families.py [--n 60] [--rule both|ribs-if-no-sacrum]
        [--start 0] [--scenario fracture] [--l1-grade 0 1 2] [--show] [--jobs 2]

Last, the L1 fractures' grades as read, by slice spacing and true grade (Genant), per family,
and the losses read against the truth. `--l1-grade` takes the fracture draws and moves each
one's fracture to L1 at the grades given (0: none), for many L1 grades from few draws.

Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from harness.bone_cases import at_l1, draw, run, summary


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)  # one case per core


def grades_table(grades: dict[str, Counter]) -> None:
    """L1 fractures: for each slice spacing and true grade, how each family read them."""
    print("L1 fractures, as read (slices mm, true grade: family A | family B)")
    for key in sorted({k for f in ("A", "B") for k, _ in grades[f]}):
        cells = [
            ", ".join(f"{n} {read}" for (k, read), n in sorted(grades[f].items()) if k == key)
            or "-"
            for f in ("A", "B")
        ]
        print(f"  {key[0]:g} mm, grade {key[1]}: {cells[0]} | {cells[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=60, help="cases per family")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--rule", default="both", choices=["both", "ribs-if-no-sacrum"])
    ap.add_argument("--scenario", default=None, help="only this scenario (e.g. fracture)")
    ap.add_argument(
        "--l1-grade",
        type=int,
        nargs="+",
        choices=[0, 1, 2, 3],
        help="fracture draws, each with its fracture moved to L1 at these grades (0: none)",
    )
    ap.add_argument("--show", action="store_true", help="a line per case that went wrong")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases run at once")
    args = ap.parse_args()
    t0 = time.monotonic()
    sums = {}
    idx = range(args.start, args.start + args.n)
    with ProcessPoolExecutor(args.jobs, initializer=_one_thread) as pool:
        if args.l1_grade:
            cases = {
                fam: [at_l1(draw(fam, i, "fracture"), g) for i in idx for g in args.l1_grade]
                for fam in ("A", "B")
            }
        else:
            cases = {fam: [draw(fam, i, args.scenario) for i in idx] for fam in ("A", "B")}
        runs = {fam: pool.map(run, cs, [args.rule] * len(cs)) for fam, cs in cases.items()}
        for fam in ("A", "B"):
            outs = []
            for o in runs[fam]:
                i = dict(o.case.options)["seed"]
                case = o.case
                outs.append(o)
                bad = o.mislabel or (o.expect != o.measured) or (o.error_hu and abs(o.error_hu) > 4)
                if args.show and bad:
                    print(f"  {fam} #{i} {case.scenario}: expect {o.expect} measured {o.measured} "
                          f"mislabel {o.mislabel} err {o.error_hu} reason {o.reason!r} "
                          f"{dict(case.options)}")  # fmt: skip
            sums[fam] = summary(outs)
    print(f"rule {args.rule!r}, {args.n} cases per family ({time.monotonic() - t0:.0f} s)")
    keys = [k for k in sums["A"] if k not in ("lost", "refused", "l1 grades")]
    print(f"{'':24} {'family A':>12} {'family B':>12}")
    for k in keys:
        print(f"{k:24} {sums['A'][k]!s:>12} {sums['B'][k]!s:>12}")
    for part in ("refused", "lost"):
        reasons = sorted(set(sums["A"][part]) | set(sums["B"][part]))
        title = "refused, by reason" if part == "refused" else "measurable but refused"
        print(title)
        for r in reasons:
            print(f"  {r[:22]:22} {sums['A'][part].get(r, 0):>12} {sums['B'][part].get(r, 0):>12}")

    grades_table({f: sums[f]["l1 grades"] for f in ("A", "B")})


if __name__ == "__main__":
    main()
