#!/usr/bin/env python
"""Compare VAEs side by side on the same images: metrics, latent health and an HTML report.

A thin script over ``latentae.cli.compare`` (see there, or ``--help``); the same command is
``latentae compare`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.compare import main  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(main(prog="compare.py"))
