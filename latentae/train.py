"""``python -m latentae.train``: the training entry point as a module, for launchers.

    accelerate launch -m latentae.train --config sd-f8c4 --output-dir runs/sd data.path=/images
    torchrun --nproc_per_node 8 -m latentae.train --config sd-f8c4 --output-dir runs/sd data.path=/images

Works from an installed package, outside a checkout. The code is ``latentae.cli.train``
(also ``latentae train`` and ``train/train.py``); this module only runs it.
"""

import sys

if __name__ == "__main__":
    from latentae.cli.train import main

    sys.exit(main(prog="python -m latentae.train"))
