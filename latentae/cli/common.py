"""What every command shares: one-line argument errors, one-line user errors, exit codes.

Exit status of every command: 0 done; 2 a usage or user error (a missing path, a bad
value, an unreadable VAE or config), printed as ONE line on stderr that names the thing,
no traceback; 1 a fault or a bug (with its traceback, which is then worth reading).

This module imports neither torch nor anything that does: commands parse their arguments
and set up the process (``latentae.runtime``) before the heavy imports.
"""

from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``PROG: error: ...``), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's own prints the usage block first
        self.exit(2, f"{self.prog}: error: {one_line(message)} (--help lists the options)\n")


def one_line(message: object) -> str:
    """A message on a single line (a multi-line exception text joined with '; ')."""
    return "; ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())


def fail(message: object, code: int = 2) -> int:
    """Print ``error: MESSAGE`` as one line on stderr; return the exit status (2: the user's to fix)."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def vae_source_problem(source: str) -> str | None:
    """Why ``source`` cannot name a VAE, checked before the heavy imports (None = it may):
    an existing local path or something shaped like a Hugging Face hub id (``org/name``)."""
    from pathlib import Path

    from latentae.hub import looks_like_repo_id

    if Path(source).exists() or looks_like_repo_id(source):
        return None
    return f"VAE not found: {source} (no such file or folder, and not a Hugging Face hub id of the form org/name)"


def config_problem(config: str | None) -> str | None:
    """Why ``--config`` names no YAML file (None = fine): a path or a packaged config's name."""
    from latentae.config import ConfigError, config_path

    if config is None:
        return None
    try:
        config_path(config)
    except ConfigError as e:
        return str(e)
    return None


def vae_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this VAE / config / path is the user's to fix" (imports latentae.io)."""
    from latentae.config import ConfigError
    from latentae.io import WeightsError

    return (WeightsError, ConfigError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


__all__ = ["Parser", "config_problem", "fail", "one_line", "positive_int", "vae_errors", "vae_source_problem"]
