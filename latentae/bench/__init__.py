"""Benchmarks that ship with the package (``latentae bench <name>``; ``tools/bench*.py`` in a
checkout are thin scripts over the same modules). Each prints its numbers measured side by
side in one run, never a single absolute figure without its reference."""
