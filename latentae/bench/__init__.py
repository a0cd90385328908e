"""Benchmarks that ship with the package (``latentae bench <name>``; ``tools/bench*.py`` in a
checkout are thin scripts over the same modules). Each prints its numbers measured side by
side in one run, never a single absolute figure without its reference."""

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding latentae/


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) with the folder holding this copy of latentae first on
    PYTHONPATH, so that a benchmark's child processes import the same code as the benchmark."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    return env


__all__ = ["PACKAGE_ROOT", "child_env"]
