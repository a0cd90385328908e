"""Training checkpoints on disk: atomic writes, finding the newest healthy one, rotation.

Layout::

    OUTPUT/checkpoints/step-000001000/      one directory per checkpoint (the step = optimizer steps done)
        vae.safetensors                      VAE weights (latentae.io format: ``load_vae`` reads it)
        vae_ema.safetensors                  EMA weights (when EMA is on)
        ...                                  whatever else the trainer writes (see latentae.training.state)
        trainer.json                         the manifest, written last: step, file sizes, ...

Atomicity: a checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXXX/``, every
file fsynced, then the directory is renamed into place (a rename within one
filesystem is atomic) and the parent fsynced. A process killed at any moment
leaves either no ``step-*`` directory or a complete one; a half-written
``.tmp-*`` directory is ignored and removed on the next start.

A ``step-*`` directory is *healthy* when its manifest parses and every file it
lists exists with the recorded size; only healthy checkpoints are resumed from,
and rotation (keep the newest ``keep_last``) counts only healthy ones, so it can
never delete the newest good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

CHECKPOINTS = "checkpoints"
MANIFEST = "trainer.json"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"step-(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found, read or written; the message names the path."""


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def _fsync_path(path: Path) -> None:
    # Directories are fsynced too: that is what makes a rename or a new file durable.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def health_problem(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else why not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST}"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    problem = health_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
    return json.loads((path / MANIFEST).read_text())


def list_checkpoints(output_dir: str | Path, *, healthy_only: bool = True) -> list[tuple[int, Path]]:
    """(step, dir) of the ``step-*`` checkpoints under ``output_dir``, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.fullmatch(p.name)
        if m and p.is_dir() and (not healthy_only or health_problem(p) is None):
            out.append((int(m[1]), p))
    return sorted(out)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def clean_temp(output_dir: str | Path) -> list[Path]:
    """Remove half-written ``.tmp-*`` checkpoint directories (left by a crash); returns them."""
    root = checkpoints_dir(output_dir)
    removed = []
    if not root.is_dir():
        return removed
    for p in sorted(root.iterdir()):
        if not p.name.startswith(TMP_PREFIX):
            continue
        # A crash between "move the old step-X aside" and "rename the new one in"
        # leaves the old, complete copy here: put it back rather than lose it.
        if p.name.startswith(f"{TMP_PREFIX}old-"):
            final = root / p.name[len(f"{TMP_PREFIX}old-") :]
            if not final.exists() and health_problem(p) is None:
                os.replace(p, final)
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def resolve_resume(output_dir: str | Path, spec: str) -> Path | None:
    """``--resume`` value -> a checkpoint directory.

    "latest": the newest healthy checkpoint of ``output_dir``, or None when there is
    none yet (so a preemptible job can always pass ``--resume latest``).
    Anything else is a path: a checkpoint directory, or a run directory (its newest).
    """
    if spec == "latest":
        return latest_checkpoint(output_dir)
    p = Path(spec)
    if not p.exists():
        raise CheckpointError(f"--resume {spec}: no such checkpoint or run directory")
    if (p / MANIFEST).exists() or _STEP_RE.fullmatch(p.name):
        read_manifest(p)  # raises with the reason when incomplete
        return p
    newest = latest_checkpoint(p)
    if newest is None:
        raise CheckpointError(f"--resume {spec}: neither a checkpoint directory nor a run with healthy checkpoints")
    return newest


def write_checkpoint(
    output_dir: str | Path,
    step: int,
    writers: dict[str, Callable[[Path], None]],
    manifest: dict[str, Any],
    *,
    keep_last: int = 0,
) -> Path:
    """Write one checkpoint atomically and rotate old ones; returns its directory.

    ``writers`` maps file names to functions that write that file at the given path.
    ``manifest`` (json-able) goes into ``trainer.json`` with ``step`` and the file sizes.
    ``keep_last`` > 0 deletes the oldest healthy checkpoints beyond that many.
    """
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    sizes: dict[str, int] = {}
    for name, write in writers.items():
        path = tmp / name
        write(path)
        _fsync_path(path)
        sizes[name] = path.stat().st_size
    meta = {**manifest, "step": step, "files": sizes}
    (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _fsync_path(tmp / MANIFEST)
    _fsync_path(tmp)
    if final.exists():
        # Same step written before (e.g. a run resumed from an older checkpoint
        # re-reaches it): move the old one aside first, rename() cannot replace a
        # non-empty directory.
        old = root / f"{TMP_PREFIX}old-{step_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(root)
    if keep_last > 0:
        rotate(output_dir, keep_last)
    return final


def rotate(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete the oldest healthy checkpoints so ``keep_last`` remain; returns the deleted.

    Unhealthy ``step-*`` directories are neither counted nor deleted (someone may
    want to look at them); the newest healthy one is always kept.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


__all__ = [
    "CHECKPOINTS",
    "MANIFEST",
    "CheckpointError",
    "checkpoints_dir",
    "clean_temp",
    "health_problem",
    "latest_checkpoint",
    "list_checkpoints",
    "read_manifest",
    "resolve_resume",
    "rotate",
    "step_name",
    "write_checkpoint",
]
