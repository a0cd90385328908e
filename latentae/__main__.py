"""``python -m latentae <command> ...``: the ``latentae`` command (``latentae.cli``) as a module."""

import sys

from latentae.cli import main

if __name__ == "__main__":
    sys.exit(main())
