#!/usr/bin/env python
"""End-to-end dataset encoding throughput vs model-only encoding throughput, side by side.

A thin script over ``latentae.bench.encode`` (see there, or ``--help``); the same command is
``latentae bench encode`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.bench import run  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(run("encode", sys.argv[1:], prog="bench_encode.py"))
