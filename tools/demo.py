"""Train a tiny VAE on CPU in a few minutes, offline, and export it (what `make demo` runs).

A thin script over ``latentae.cli.demo`` (see there, or ``--help``); the same command is
``latentae demo`` from an installed package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.demo import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="demo.py"))
