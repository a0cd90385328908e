#!/usr/bin/env python
"""Latent loader throughput: shuffled vs unshuffled reading of the same shards, side by side.

A thin script over ``latentae.bench.latents`` (see there, or ``--help``); the same command is
``latentae bench latents`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.bench import run  # noqa: E402  (imports no torch: the OpenMP wait policy is set first)

if __name__ == "__main__":
    sys.exit(run("latents", sys.argv[1:], prog="bench_latents.py"))
