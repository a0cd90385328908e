#!/usr/bin/env python
"""Benchmark one training step: latentae's trainer vs. a plain diffusers.AutoencoderKL step.

A thin script over ``latentae.bench.train`` (see there, or ``--help``); the same command is
``latentae bench train`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.bench import run  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:], prog="bench_train.py"))
