"""A long fuzz run of the network edge: the properties of tests/test_fuzz_ul.py (DICOM upper
layer framing, association negotiation, DIMSE command sets, dicom.raw's element scanner) with
many more examples than the test suite runs.

    .venv/bin/python scripts/fuzz_ul.py                      # 50x the suite's examples
    .venv/bin/python scripts/fuzz_ul.py --scale 200 -k association --seed 1

A failure prints hypothesis' shrunk reproducer; exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=50, help="examples, x the suite's")
    parser.add_argument("-k", dest="keyword", help="only the properties matching (pytest -k)")
    parser.add_argument("--seed", type=int, help="hypothesis seed, to repeat a run")
    args = parser.parse_args(argv)
    os.environ["SPHERE_FUZZ_EXAMPLES"] = str(args.scale)  # read by tests/test_fuzz_ul.py
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    import pytest

    pytest_args = ["tests/test_fuzz_ul.py", "-q", "-p", "no:cacheprovider"]
    pytest_args += ["--hypothesis-show-statistics", "--durations=5"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    if args.seed is not None:
        pytest_args.append(f"--hypothesis-seed={args.seed}")
    return int(pytest.main(pytest_args))


if __name__ == "__main__":
    sys.exit(main())
