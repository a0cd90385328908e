"""What a training checkpoint holds, how it is written and read back, and where a run starts.

``checkpoints/step-XXXXXXXXX/`` (written atomically by ``latentae.checkpoint``)::

    vae.safetensors             VAE weights (``latentae.load_vae`` reads it)
    vae_ema.safetensors         EMA weights (when EMA is on)
    discriminator.safetensors   discriminator weights (when the loss uses a GAN)
    loss.safetensors            the loss module's own state (the learned logvar; LPIPS is not stored)
    optimizer.pt                {"vae": Adam state, "disc": Adam state | None}
    rank-R.pt                   per process: {"rng": every global RNG, "loader": data position,
                                "scalers": {"vae": GradScaler state, "disc": ... | None}}
    config.yaml                 the resolved config
    trainer.json                manifest (written last): step, world_size, torch threads/version,
                                mixed_precision, effective learning rates, per-rank parameter
                                fingerprints, skipped samples, file sizes

Exact resume: everything a step depends on is in there. The posterior noise comes from
a generator seeded by (seed, step, rank, micro-batch) and the learning rate is a pure
function of the step, so a run killed at any moment and resumed with ``--resume latest``
ends with bit-identical weights on CPU (same settings, thread count and processes).
Another number of processes resumes elastically (``open_start``).

Where a run starts: rank 0 alone resolves ``--resume`` (``resolve_start``) and every
rank checks that it reads the very same ``trainer.json`` (``start_view_problem``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from latentae.checkpoint import (
    MANIFEST,
    CheckpointError,
    clean_temp,
    list_checkpoints,
    read_manifest,
    resolve_resume,
    write_checkpoint,
)
from latentae.config import from_dict
from latentae.io import save_vae_safetensors
from latentae.data import hash_seed
from latentae.training.errors import NonFiniteError, StartupError, TrainingError, on_every_rank
from latentae.training.models import architecture_diff

if TYPE_CHECKING:
    from latentae.recipe import Config
    from latentae.training.ranks import Ranks
    from latentae.training.setup import Parts

log = logging.getLogger("latentae.train")


# --------------------------------------------------------------------------- where to start


def manifest_digest(path: Path) -> str | None:
    """sha256 of a checkpoint's trainer.json as this process reads it (None: it cannot).

    Ranks compare it with rank 0's: equal digests = the same checkpoint, not a stale
    or node-local copy under the same path."""
    try:
        return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()
    except OSError:
        return None


def _resolve(output_dir: Path, resume: str | None) -> Path | None:
    """Rank 0's half of resolve_start: clean up, pick the checkpoint, refuse what would mix two runs."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for p in clean_temp(output_dir):
        log.warning("removed a half-written checkpoint: %s", p)
    existing = list_checkpoints(output_dir)
    if resume is None:
        if existing:
            raise StartupError(
                f"{output_dir} already holds checkpoints (newest {existing[-1][1].name}): pass --resume latest to "
                "continue that run, or choose another --output-dir"
            )
        return None
    try:
        ckpt = resolve_resume(output_dir, resume)
    except CheckpointError as e:
        raise StartupError(str(e)) from e
    if ckpt is None:
        log.info("--resume %s: no checkpoint in %s yet, starting from scratch", resume, output_dir)
        return None
    newer = [p.name for s, p in existing if s > int(read_manifest(ckpt)["step"])]
    if ckpt.parent.resolve() == (output_dir / "checkpoints").resolve() and newer:
        raise StartupError(
            f"resuming from {ckpt.name}, but newer checkpoints exist in {output_dir} ({', '.join(newer)}): resuming "
            "would interleave two runs; move them away or resume into another --output-dir"
        )
    return Path(os.path.abspath(ckpt))  # the same on every node, whatever its working directory


def resolve_start(output_dir: Path, resume: str | None, ranks: Ranks) -> dict[str, Any]:
    """The one place that turns ``--resume`` into a checkpoint: rank 0 decides, every rank gets its answer.

    Rank 0 creates the output folder, removes half-written checkpoints, refuses to start
    over a folder that holds checkpoints unless resuming and to resume from an older
    checkpoint while newer ones exist (two runs would interleave), and resolves
    ``latest`` from ITS view of the folder. Returns ``{"path": str | None, "manifest":
    sha256 | None}`` on every rank (``start_view_problem`` checks a rank's own view
    against it). A refusal is raised on every rank with rank 0's message.
    """
    view: dict[str, Any] | None = None
    if ranks.rank == 0:
        try:
            path = _resolve(output_dir, resume)
            view = {"path": str(path) if path else None, "manifest": manifest_digest(path) if path else None}
        except (StartupError, CheckpointError, OSError) as e:
            view = {"error": str(e)}
    view = ranks.share("checkpoint", view)
    if "error" in view:
        raise on_every_rank(StartupError(view["error"]))
    return view


def start_view_problem(view: dict[str, Any]) -> str | None:
    """Why this rank does not see the checkpoint rank 0 resolved (None: it does)."""
    if view["path"] is None:
        return None
    path = Path(view["path"])
    mine = manifest_digest(path)
    if mine is None:
        return f"cannot read {path / MANIFEST} (rank 0 resumes from it): is the run folder on a filesystem every node sees?"
    if mine != view["manifest"]:
        return (
            f"sees another {path / MANIFEST} than rank 0 (sha256 {mine[:12]} vs {view['manifest'][:12]}): a stale or "
            "node-local copy of the run folder?"
        )
    return None


@dataclass
class StartPoint:
    """A checkpoint to resume from, read and checked against this run."""

    path: Path
    step: int
    manifest: dict[str, Any]
    # This process's state: its own rng / loader / scalers when the number of processes
    # is the one the checkpoint was written with; else (elastic) rng None (derived from
    # seed, step and rank) and rank 0's scalers.
    rank_state: dict[str, Any]
    loader_states: list[dict[str, Any]]  # every saved rank's data position, in rank order
    saved_world_size: int

    @property
    def elastic(self) -> bool:
        return self.rank_state.get("rng") is None


def open_start(path: Path, cfg: Config, *, rank: int, world_size: int) -> StartPoint:
    """Read the manifest and every rank's state; refuse what cannot resume at all.

    Another number of processes resumes elastically: weights, optimizer, EMA and loss
    scales continue exactly; the data order differs from an uninterrupted run (the data
    layer continues from every old rank's position and warns); each rank's RNG states
    are derived from (seed, step, rank) instead of restored.
    """
    manifest = read_manifest(path)
    try:
        saved = from_dict(type(cfg), yaml.safe_load((path / "config.yaml").read_text()))
    except Exception as e:
        raise StartupError(f"{path / 'config.yaml'}: unreadable: {e}") from e
    diff = architecture_diff(cfg.model, saved.model)
    # (The same files and config on every rank, checked at start-up: every rank refuses alike.)
    if diff:
        raise on_every_rank(StartupError(f"cannot resume from {path}: the model section changed ({'; '.join(diff)})"))
    if saved.train.finetune != cfg.train.finetune or saved.loss.uses_gan != cfg.loss.uses_gan:
        raise on_every_rank(StartupError(
            f"cannot resume from {path}: train.finetune or the use of a discriminator changed "
            "(the optimizer states would not match)"
        ))  # fmt: skip
    if manifest.get("num_threads") not in (None, torch.get_num_threads()):
        log.warning(
            "the checkpoint was written with %s torch threads, this run uses %d: results may differ in the "
            "last bits from an uninterrupted run", manifest.get("num_threads"), torch.get_num_threads(),
        )  # fmt: skip
    old_world = int(manifest["world_size"])
    states = []
    for r in range(old_world):
        rank_file = path / f"rank-{r}.pt"
        try:
            states.append(torch.load(rank_file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise StartupError(f"cannot read {rank_file}: {e}") from e
    if old_world == world_size:
        mine = states[rank]
    else:
        # Elastic. The loss scales are the same on every rank (they follow the all-reduced
        # gradients), so rank 0's serve every new rank.
        mine = {"rng": None, "scalers": states[0].get("scalers"), "scaler": states[0].get("scaler")}
        if rank == 0:
            log.warning(
                "elastic resume: %s was written by %d processes, this run has %d. Weights, optimizer states, EMA "
                "and loss scales continue exactly; the data order differs from an uninterrupted run, and every "
                "rank's random number generators are seeded from (train.seed, step, rank) instead of restored",
                path, old_world, world_size,
            )  # fmt: skip
    return StartPoint(path, int(manifest["step"]), manifest, mine, [s["loader"] for s in states], old_world)


def restore_training_state(start: StartPoint, *, vae, loss, disc, vae_opt, disc_opt, want_ema: bool) -> dict | None:
    """Weights and optimizer states into the (not yet wrapped) modules; returns the EMA weights or None."""
    p = start.path
    try:
        vae.load_state_dict(load_file(str(p / "vae.safetensors")))
        loss.load_state_dict(load_file(str(p / "loss.safetensors")))
        opt = torch.load(p / "optimizer.pt", map_location="cpu", weights_only=True)
        vae_opt.load_state_dict(opt["vae"])
        if disc is not None:
            disc.load_state_dict(load_file(str(p / "discriminator.safetensors")))
            disc_opt.load_state_dict(opt["disc"])
        ema_file = p / "vae_ema.safetensors"
        # EMA switched on at resume: it starts from the current weights (None here).
        return load_file(str(ema_file)) if want_ema and ema_file.is_file() else None
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise StartupError(f"cannot load checkpoint {p}: {e}") from e


def restore_scalers(rank_state: dict[str, Any], scalers: dict[str, torch.amp.GradScaler | None]) -> None:
    saved = rank_state.get("scalers")
    if saved is None and rank_state.get("scaler") is not None:
        saved = {name: rank_state["scaler"] for name in scalers}  # older checkpoints: one shared scaler
    for name, scaler in scalers.items():
        if scaler is not None and saved and saved.get(name) is not None:
            scaler.load_state_dict(saved[name])


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG this process has, in a ``torch.load(weights_only=True)``-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_global_rngs(seed: int) -> None:
    """Python's, numpy's and torch's global generators, all from ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rngs(seed: int, step: int, rank: int) -> None:
    """Elastic resume: every global RNG of this rank seeded from (seed, step, rank).

    Deterministic for a given layout, distinct per rank and step; nothing in a training
    step depends on these streams for exactness (posterior noise, crops and the data
    order have seeds of their own), so this only has to be reproducible and fresh.
    """
    seed_global_rngs(hash_seed(seed, "elastic-resume", step, rank))


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- writing


def fingerprint(*modules: nn.Module | None) -> str:
    """sha256 of all parameters: equal on every rank iff the trained replicas are identical.

    Buffers are left out: a BatchNorm discriminator on CPU ranks keeps per-rank
    running statistics (no SyncBatchNorm there), which is expected, not divergence.
    """
    h = hashlib.sha256()
    for m in modules:
        if m is None:
            continue
        for k, v in m.named_parameters():
            h.update(k.encode())
            h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: any layout
    return h.hexdigest()


def _all_finite(module: nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in module.parameters()]
    return bool(torch.stack(flags).all()) if flags else True  # one host sync per module


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(parts: Parts, *, step: int, output_dir: Path, cfg: Config, skipped_samples: int) -> Path:
    """Write ``checkpoints/step-{step}/`` atomically (main process), every rank contributing its state.

    A collective (one all-gather): every rank must call it at the same step. Refuses
    non-finite weights, so no checkpoint is ever written from a poisoned state. Ends
    without a barrier: the caller waits for rank 0's write (``Ranks.barrier``), which
    is where a failure of the write reaches the other ranks.
    """
    from accelerate.utils import gather_object

    from latentae.recipe import dump_config  # recipe imports training.config: not at module level

    acc, vae, disc, ema = parts.acc, parts.vae_raw, parts.disc_raw, parts.ema
    for name, m in (("vae", vae), ("discriminator", disc), ("ema", ema and ema.model)):
        if m is not None and not _all_finite(m):
            raise NonFiniteError(f"refusing to checkpoint step {step}: non-finite {name} weights")
    rank_state = {
        "rng": rng_state(),
        "loader": parts.loader.state_dict(),
        "scalers": {k: (s.state_dict() if s is not None else None) for k, s in parts.scalers().items()},
    }
    gathered = gather_object([(rank_state, fingerprint(vae, disc))])  # every rank gets every rank's
    states, prints = [g[0] for g in gathered], [g[1] for g in gathered]
    if len(set(prints)) > 1:  # seen by every rank at once
        raise on_every_rank(TrainingError(f"step {step}: the replicas on different ranks diverged ({prints})"))
    path = output_dir / "checkpoints" / f"step-{step:09d}"
    if acc.is_main_process:
        writers = {
            "vae.safetensors": lambda p: save_vae_safetensors(vae, p),
            "loss.safetensors": lambda p: save_file(_cpu_state(parts.loss), str(p)),
            "optimizer.pt": lambda p: torch.save(
                {"vae": parts.vae_opt.state_dict(), "disc": parts.disc_opt.state_dict() if disc else None}, p
            ),
            "config.yaml": lambda p: p.write_text(dump_config(cfg)),
        }
        if ema is not None:
            writers["vae_ema.safetensors"] = lambda p: save_vae_safetensors(ema.model, p)
        if disc is not None:
            writers["discriminator.safetensors"] = lambda p: save_file(_cpu_state(disc), str(p))
        for r, st in enumerate(states):
            writers[f"rank-{r}.pt"] = lambda p, st=st: torch.save(st, p)
        manifest = {
            "world_size": acc.num_processes,
            "num_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "mixed_precision": cfg.train.mixed_precision,
            "effective_lr": {"vae": parts.lrs.vae, "disc": parts.lrs.disc},
            "rank_fingerprints": prints,
            "skipped_samples": skipped_samples,
        }
        path = write_checkpoint(output_dir, step, writers, manifest, keep_last=cfg.train.keep_last)
        log.info("checkpoint %s", path)
    return path


__all__ = [
    "StartPoint",
    "fingerprint",
    "manifest_digest",
    "open_start",
    "resolve_start",
    "restore_scalers",
    "seed_global_rngs",
    "restore_training_state",
    "rng_state",
    "save_checkpoint",
    "seed_rngs",
    "set_rng_state",
    "start_view_problem",
]
