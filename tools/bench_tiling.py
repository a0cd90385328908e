#!/usr/bin/env python
"""Tiled vs untiled decode/encode: accuracy, cost (time ratio) and peak memory.

A thin script over ``latentae.bench.tiling`` (see there, or ``--help``); the same command is
``latentae bench tiling`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.bench import run  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(run("tiling", sys.argv[1:], prog="bench_tiling.py"))
