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
"""

from __future__ import annotations

import hashlib
import logging
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
    CheckpointError,
    clean_temp,
    list_checkpoints,
    read_manifest,
    resolve_resume,
    write_checkpoint,
)
from latentae.config import from_dict
from latentae.io import save_vae_safetensors
from latentae.training.errors import NonFiniteError, StartupError, TrainingError
from latentae.training.models import architecture_diff

if TYPE_CHECKING:
    from accelerate import Accelerator

    from latentae.recipe import Config
    from latentae.training.setup import Parts

log = logging.getLogger("latentae.train")


# --------------------------------------------------------------------------- where to start


def resolve_start(output_dir: Path, resume: str | None, acc: Accelerator) -> Path | None:
    """The one place that turns ``--resume`` into a checkpoint (or None: start fresh).

    Creates the output folder and removes half-written checkpoints (main process), then
    refuses to start over a folder that holds checkpoints unless resuming, and refuses
    to resume from an older checkpoint while newer ones exist (two runs would interleave).
    Every rank calls it and reads the folder itself (they share a filesystem).
    """
    if acc.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for p in clean_temp(output_dir):
            log.warning("removed a half-written checkpoint: %s", p)
    acc.wait_for_everyone()
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
        if acc.is_main_process:
            log.info("--resume %s: no checkpoint in %s yet, starting from scratch", resume, output_dir)
        return None
    newer = [p.name for s, p in existing if s > int(read_manifest(ckpt)["step"])]
    if ckpt.parent.resolve() == (output_dir / "checkpoints").resolve() and newer:
        raise StartupError(
            f"resuming from {ckpt.name}, but newer checkpoints exist in {output_dir} ({', '.join(newer)}): resuming "
            "would interleave two runs; move them away or resume into another --output-dir"
        )
    return ckpt


@dataclass
class StartPoint:
    """A checkpoint to resume from, read and checked against this run."""

    path: Path
    step: int
    manifest: dict[str, Any]
    rank_state: dict[str, Any]  # this process's rng / loader / scalers
    loader_states: list[dict[str, Any]]  # every saved rank's data position, in rank order


def open_start(path: Path, cfg: Config, *, rank: int, world_size: int) -> StartPoint:
    """Read the manifest and this rank's state; refuse what cannot resume exactly."""
    manifest = read_manifest(path)
    # Exact resume needs the same number of processes: the data split and the per-rank
    # states depend on it. (Elastic resume would read every old rank's loader state here.)
    if manifest.get("world_size") != world_size:
        raise StartupError(
            f"{path} was written by {manifest.get('world_size')} processes, this run has {world_size}: "
            "exact resume needs the same number of processes (the data split and per-rank states depend on it)"
        )
    try:
        saved = from_dict(type(cfg), yaml.safe_load((path / "config.yaml").read_text()))
    except Exception as e:
        raise StartupError(f"{path / 'config.yaml'}: unreadable: {e}") from e
    diff = architecture_diff(cfg.model, saved.model)
    if diff:
        raise StartupError(f"cannot resume from {path}: the model section changed ({'; '.join(diff)})")
    if saved.train.finetune != cfg.train.finetune or saved.loss.uses_gan != cfg.loss.uses_gan:
        raise StartupError(
            f"cannot resume from {path}: train.finetune or the use of a discriminator changed "
            "(the optimizer states would not match)"
        )
    if manifest.get("num_threads") not in (None, torch.get_num_threads()):
        log.warning(
            "the checkpoint was written with %s torch threads, this run uses %d: results may differ in the "
            "last bits from an uninterrupted run", manifest.get("num_threads"), torch.get_num_threads(),
        )  # fmt: skip
    # Every saved rank's state: this rank's RNG and scalers come from its own file; the
    # data layer continues exactly from this rank's position when the layout is unchanged,
    # elastically from all of them when it is not.
    states = []
    for r in range(int(manifest["world_size"])):
        rank_file = path / f"rank-{r}.pt"
        try:
            states.append(torch.load(rank_file, map_location="cpu", weights_only=True))
        except Exception as e:
            raise StartupError(f"cannot read {rank_file}: {e}") from e
    return StartPoint(path, int(manifest["step"]), manifest, states[rank], [s["loader"] for s in states])


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


def save_checkpoint(parts: Parts, *, step: int, output_dir: Path, cfg: Config, config_yaml: str,
                    loader_state: dict, skipped_samples: int) -> Path:  # fmt: skip
    """Write ``checkpoints/step-{step}/`` atomically (main process), every rank contributing its state.

    A collective: every rank must call it at the same step. Refuses non-finite weights,
    so no checkpoint is ever written from a poisoned state.
    """
    from accelerate.utils import gather_object

    acc, vae, disc, ema = parts.acc, parts.vae_raw, parts.disc_raw, parts.ema
    for name, m in (("vae", vae), ("discriminator", disc), ("ema", ema and ema.model)):
        if m is not None and not _all_finite(m):
            raise NonFiniteError(f"refusing to checkpoint step {step}: non-finite {name} weights")
    rank_state = {
        "rng": rng_state(),
        "loader": loader_state,
        "scalers": {k: (s.state_dict() if s is not None else None) for k, s in parts.scalers().items()},
    }
    states = gather_object([rank_state])
    prints = gather_object([fingerprint(vae, disc)])
    path = output_dir / "checkpoints" / f"step-{step:09d}"
    if acc.is_main_process:
        if len(set(prints)) > 1:
            raise TrainingError(f"step {step}: the replicas on different ranks diverged ({prints})")
        writers = {
            "vae.safetensors": lambda p: save_vae_safetensors(vae, p),
            "loss.safetensors": lambda p: save_file(_cpu_state(parts.loss), str(p)),
            "optimizer.pt": lambda p: torch.save(
                {"vae": parts.vae_opt.state_dict(), "disc": parts.disc_opt.state_dict() if disc else None}, p
            ),
            "config.yaml": lambda p: p.write_text(config_yaml),
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
    acc.wait_for_everyone()
    return path


__all__ = [
    "StartPoint",
    "fingerprint",
    "open_start",
    "resolve_start",
    "restore_scalers",
    "restore_training_state",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]
