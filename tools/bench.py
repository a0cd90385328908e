#!/usr/bin/env python
"""latentae's fast inference path vs diffusers.AutoencoderKL (eager): speed, FLOP/s, memory.

A thin script over ``latentae.bench.inference`` (see there, or ``--help``); the same command is
``latentae bench inference`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.bench import run  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(run("inference", sys.argv[1:], prog="bench.py"))
