#!/usr/bin/env python
"""Training step time on a busy machine (idle / a busy loop / a second torch job), before vs after.

A thin script over ``latentae.bench.busy`` (see there, or ``--help``); the same command is
``latentae bench busy`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.bench import run  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(run("busy", sys.argv[1:], prog="bench_busy.py"))
