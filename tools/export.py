#!/usr/bin/env python
"""Export a VAE as a diffusers folder or an LDM (CompVis) single .safetensors file.

A thin script over ``latentae.cli.export`` (see there, or ``--help``); the same command is
``latentae export`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.export import main  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(main(prog="export.py"))
