#!/usr/bin/env python
"""Per-channel and global statistics of encoded latents -> scaling_factor / shift_factor.

A thin script over ``latentae.cli.stats`` (see there, or ``--help``); the same command is
``latentae stats`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.stats import main  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(main(prog="latent_stats.py"))
