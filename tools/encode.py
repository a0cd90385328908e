#!/usr/bin/env python
"""Encode an image dataset to VAE latents (WebDataset shards + manifest.json).

A thin script over ``latentae.cli.encode`` (see there, or ``--help``); the same command is
``latentae encode`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.encode import main  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(main(prog="encode.py"))
