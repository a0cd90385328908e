"""Train a KL autoencoder from a checkout: ``python train/train.py --config ... --output-dir ...``.

A thin script over ``latentae.cli.train`` (see there, or ``--help``); the same command is
``latentae train`` and ``python -m latentae.train`` from an installed package
(``accelerate launch -m latentae.train``, ``torchrun -m latentae.train``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentae.cli.train import main  # noqa: E402  (imports no torch: the wait policy is set first)

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
