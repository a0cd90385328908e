"""Build everything a run trains with, in one documented order (``set_up``).

The order matters and is written down once, in ``set_up``, with the reason for each
step; nothing else in the package builds, moves, wraps or restores these objects.
``share_data`` runs before it: which files the run trains on, decided once by rank 0.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from latentae.data import FileList, build_train_loader, build_val_images, prepare_file_list, shard_digest
from latentae.ema import EMA
from latentae.losses import VAELoss
from latentae.model import AutoencoderKL, build_vae
from latentae.optim import build_optimizer
from latentae.sources import check_path, expand_shards, is_shard_source, no_images_error
from latentae.training import policy
from latentae.training.config import LearningRates, effective_lrs
from latentae.training.errors import StartupError, on_every_rank
from latentae.training.forward import TrainingForward
from latentae.training.models import freeze_encoder, initial_vae, training_discriminator
from latentae.training.state import (
    StartPoint, restore_scalers, restore_training_state, seed_global_rngs, seed_rngs, set_rng_state,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from latentae.data import DataConfig, TrainLoader
    from latentae.recipe import Config
    from latentae.training.ranks import Ranks

log = logging.getLogger("latentae.train")


@dataclass
class Parts:
    """Everything a training step and a checkpoint touch (built by :func:`set_up`)."""

    acc: Accelerator
    device: torch.device
    loader: TrainLoader
    val_images: torch.Tensor | None  # main process only
    vae: nn.Module  # TrainingForward(vae_raw), prepared (DDP-wrapped when processes > 1): what the step calls
    vae_raw: AutoencoderKL  # the module itself: last_layer, EMA source, validation, saving
    loss: VAELoss
    disc: nn.Module | None  # prepared, for the discriminator's own step
    disc_raw: nn.Module | None  # for the generator's adversarial term (see VAELoss) and saving
    vae_opt: torch.optim.Optimizer
    disc_opt: torch.optim.Optimizer | None
    # One dynamic loss scaler per optimizer, enabled only for fp16 (a disabled scaler passes
    # losses and steps through unchanged): each scale follows its own loss's overflows.
    vae_scaler: torch.amp.GradScaler
    disc_scaler: torch.amp.GradScaler | None
    ema: EMA | None  # main process only
    lrs: LearningRates
    autocast_dtype: torch.dtype | None
    # What the step calls: the modules above, or their torch.compile wrappers (train.compile).
    vae_forward: Callable
    disc_forward: Callable | None
    disc_judge: Callable | None
    noise: torch.Generator  # posterior sampling; reseeded per (seed, step, rank, micro-batch)

    def scalers(self) -> dict[str, torch.amp.GradScaler | None]:
        return {"vae": self.vae_scaler, "disc": self.disc_scaler}


FILE_LIST = Path("data") / "files.bin"  # in the run folder


@dataclass
class SharedData:
    file_list: FileList | None  # an image folder's list (None for shards)
    shard_urls: list[str] | None  # the expanded shard list (None for a folder)
    digest: str  # what identifies the data: the file list's or the shard URLs' SHA-256
    problem: str | None  # why this rank's data differs from rank 0's (None: it does not)


def _rank0_data(cfg: DataConfig, output_dir: Path) -> tuple[FileList | list[str], dict]:
    check_path(cfg.path)
    if is_shard_source(cfg.path):
        urls = expand_shards(cfg.path)
        return urls, {"digest": shard_digest(urls), "count": len(urls)}
    path = Path(os.path.abspath(output_dir / FILE_LIST))
    before = path.stat().st_mtime_ns if path.is_file() else None
    t0 = time.monotonic()
    files = prepare_file_list(cfg.path, path)
    if len(files) == 0:
        raise no_images_error(cfg.path)
    how = "reused" if before is not None and before == path.stat().st_mtime_ns else f"listed in {time.monotonic() - t0:.1f} s"
    log.info("file list: %d images of %s in %s (%s)", len(files), cfg.path, path, how)
    return files, {"file_list": str(path), "digest": files.digest, "count": len(files)}


def share_data(cfg: DataConfig, output_dir: Path, ranks: Ranks) -> SharedData:
    """Which data the run trains on: rank 0 decides, every rank checks that it sees the same.

    An image folder is listed once, by rank 0, into OUTPUT/data/files.bin (compact and
    memory-mapped, see ``latentae.data.FileList``); every other rank maps that file
    instead of walking the tree. A stored list of the same folder is reused as it is,
    never re-walked: a resumed run trains on the files its first start listed (files
    added since are not seen; deleted ones are skipped as bad samples, named and
    counted). Shards: every rank expands the pattern. Either way a rank whose data
    digest differs from rank 0's gets a ``problem`` for the start-up check. A problem
    on rank 0 (missing path, no images) is raised on every rank.
    """
    listing, view = None, None  # a FileList (folder) or the shard URLs
    if ranks.rank == 0:
        try:
            listing, view = _rank0_data(cfg, output_dir)
        except (OSError, ValueError) as e:
            view = {"error": f"data: {e}"}
    view = ranks.share("data", view)
    if "error" in view:
        raise on_every_rank(StartupError(view["error"]))
    if ranks.rank == 0:
        return _shared(listing, view["digest"], None)
    problem, digest = None, None
    try:
        if "file_list" in view:
            listing = FileList.open(view["file_list"])
            digest = listing.digest
        else:
            listing = expand_shards(cfg.path)
            digest = shard_digest(listing)
    except (OSError, ValueError) as e:
        problem = f"cannot read the data rank 0 uses: {e}"
    if problem is None and digest != view["digest"]:
        what = f"the file list {view['file_list']}" if "file_list" in view else f"the shards of {cfg.path}"
        problem = (f"sees other data than rank 0: {what} has digest {digest[:12]} here, {view['digest'][:12]} on "
                   "rank 0 (a stale or node-local copy?)")  # fmt: skip
    return _shared(listing, view["digest"], problem)


def _shared(listing: FileList | list[str] | None, digest: str, problem: str | None) -> SharedData:
    if isinstance(listing, FileList):
        return SharedData(listing, None, digest, problem)
    return SharedData(None, listing, digest, problem)


def set_up(cfg: Config, acc: Accelerator, start: StartPoint | None, *, file_list: FileList | None = None,
           shard_urls: list[str] | None = None) -> Parts:
    """Build data, models, loss, optimizers, scalers and EMA; restore ``start``; wrap; compile.

    ``file_list``: the image folder's list from ``share_data`` (None: the loader lists
    the folder itself, or the data are shards)."""
    tc = cfg.train
    rank, world, device = acc.process_index, acc.num_processes, acc.device

    # 1. Backend flags first: cudnn.benchmark / determinism govern every kernel after this.
    policy.apply_backend_flags(policy.backend_flags(tc.deterministic))
    problem = policy.precision_problem(
        tc.mixed_precision, device.type, bf16_supported=device.type != "cuda" or torch.cuda.is_bf16_supported()
    )
    if problem:
        raise StartupError(problem)
    notice = policy.precision_notice(tc.mixed_precision, device.type)
    if notice and acc.is_main_process:
        log.warning(notice)

    # 2. Data before models: a bad path or an empty folder fails in seconds, not after an
    #    SD-size VAE and LPIPS were built. On resume the loader continues at the saved position.
    try:
        loader = build_train_loader(
            cfg.data, tc.batch_size, seed=tc.seed, rank=rank, world_size=world,
            resume_states=start.loader_states if start else None, file_list=file_list, shard_urls=shard_urls,
        )  # fmt: skip
    except (OSError, ValueError) as e:
        raise StartupError(f"data: {e}") from e
    val_images = None
    if acc.is_main_process and tc.num_val_images > 0:
        try:
            val_images = build_val_images(cfg.data, tc.num_val_images, file_list=file_list, shard_urls=shard_urls)
        except (OSError, ValueError) as e:
            raise StartupError(f"validation images: {e} (or set train.num_val_images=0)") from e

    # 3. Seed every global RNG alike on every rank, right before the models: identical
    #    initial weights everywhere (DDP broadcasts the VAE anyway; the loss is not wrapped).
    seed_global_rngs(tc.seed)

    # 4. Modules. On resume the weights come from the checkpoint: init_from is not read again.
    #    The loss may raise MissingWeightsError (LPIPS backbone not on disk). SyncBatchNorm
    #    conversion of the discriminator must happen before any DDP wrapping.
    vae = initial_vae(cfg) if start is None else build_vae(cfg.model)
    loss = VAELoss(cfg.loss)
    disc = training_discriminator(cfg, world_size=world, device_type=device.type)

    # 5. Freeze the encoder (decoder fine-tune) before the optimizers: frozen parameters must not enter them.
    if tc.finetune == "decoder":
        if tc.init_from is None and start is None:
            log.warning("train.finetune=decoder without train.init_from: the frozen encoder is random")
        freeze_encoder(vae)

    # 6. Gradient checkpointing is a flag on the module, read at every forward (so also
    #    when compile traces it): set before anything runs it.
    if tc.gradient_checkpointing:
        vae.enable_gradient_checkpointing()

    # 7. Layout, then device, both before the optimizers: optimizer state is created like
    #    the parameters (NHWC, on the device), and fused Adam requires device parameters.
    fmt = torch.channels_last if tc.channels_last else torch.preserve_format
    vae = vae.to(device=device, memory_format=fmt)
    loss = loss.to(device=device, memory_format=fmt)
    disc = disc.to(device=device, memory_format=fmt) if disc is not None else None

    # 8. Optimizers at the effective peak rates (the schedule rewrites them every step),
    #    and one loss scaler per optimizer.
    lrs = effective_lrs(tc, world)
    saved_lrs = start.manifest.get("effective_lr") if start is not None else None
    if saved_lrs and acc.is_main_process and (saved_lrs["vae"], saved_lrs["disc"]) != (lrs.vae, lrs.disc):
        log.warning("the effective learning rates change on resume: VAE %.3g -> %.3g, discriminator %.3g -> %.3g (%s)",
                    saved_lrs["vae"], lrs.vae, saved_lrs["disc"], lrs.disc, lrs.explanation)  # fmt: skip
    opt_kw = dict(kind=tc.optimizer, betas=tc.betas, weight_decay=tc.weight_decay,
                  impl=policy.optimizer_impl(device.type))  # fmt: skip
    vae_params = [p for p in vae.parameters() if p.requires_grad] + loss.trainable_parameters()
    vae_opt = build_optimizer(vae_params, lr=lrs.vae, **opt_kw)
    disc_opt = build_optimizer(disc.parameters(), lr=lrs.disc, **opt_kw) if disc is not None else None
    scaling = policy.needs_loss_scaler(tc.mixed_precision)
    vae_scaler = torch.amp.GradScaler(device.type, enabled=scaling)
    disc_scaler = torch.amp.GradScaler(device.type, enabled=scaling) if disc is not None else None

    # 9. Checkpoint state into the plain modules, optimizers and scalers: before the EMA
    #    copy (it must start from the restored weights) and before DDP wrapping (DDP
    #    broadcasts rank 0's parameters when it wraps: they must be the restored ones).
    #    Per-rank module state: the discriminator's BatchNorm buffers were saved from rank 0
    #    and go to every rank (any number of them). That loses nothing: DDP broadcasts rank
    #    0's buffers at every discriminator forward, and the discriminator always runs in
    #    train mode, where the running statistics never enter the math.
    ema_state = None
    if start is not None:
        ema_state = restore_training_state(
            start, vae=vae, loss=loss, disc=disc, vae_opt=vae_opt, disc_opt=disc_opt, want_ema=tc.ema_decay > 0
        )
        restore_scalers(start.rank_state, {"vae": vae_scaler, "disc": disc_scaler})
        if acc.is_main_process:
            log.info("resumed from %s (step %d)", start.path, start.step)

    # 10. EMA (main process): a plain fp32 copy of the module before any wrapper (DDP,
    #     compile) exists, then its own saved state.
    ema = None
    if tc.ema_decay > 0 and acc.is_main_process:
        ema = EMA(vae, tc.ema_decay, tc.ema_every)
        if ema_state is not None:
            ema.load_state_dict(ema_state)

    # 11. DDP wrapping (processes > 1) through Accelerate, models only: the optimizers,
    #     autocast and loss scaling are ours, so nothing patches the modules' forward
    #     (validation and the EMA stay plain fp32 modules). The VAE goes in as its
    #     TrainingForward, whose one call runs every encode/decode of a micro-batch (the
    #     regularisers' extra decodes too), so DDP's reducer sees all of them.
    if disc is not None:
        vae_p, disc_p = acc.prepare(TrainingForward(vae), disc)
    else:
        vae_p, disc_p = acc.prepare(TrainingForward(vae)), None

    # 12. torch.compile the training forwards after wrapping: compiling the DDP module lets
    #     dynamo split its graph at the gradient buckets, so communication still overlaps
    #     the backward. The plain modules stay eager (validation, EMA, saving).
    vae_forward, disc_forward, disc_judge = vae_p, disc_p, disc
    if tc.compile:
        vae_forward = policy.compile_module(vae_p)
        if disc is not None:
            disc_forward, disc_judge = policy.compile_module(disc_p), policy.compile_module(disc)

    # 13. RNG states last: nothing after this may draw random numbers, or the resumed
    #     stream would differ from the uninterrupted one. Elastic resume (another number
    #     of processes): no saved state belongs to this rank; seeded from (seed, step, rank).
    if start is not None:
        if start.elastic:
            seed_rngs(tc.seed, start.step, rank)
        else:
            set_rng_state(start.rank_state["rng"])

    return Parts(
        acc=acc, device=device, loader=loader, val_images=val_images, vae=vae_p, vae_raw=vae, loss=loss,
        disc=disc_p, disc_raw=disc, vae_opt=vae_opt, disc_opt=disc_opt, vae_scaler=vae_scaler,
        disc_scaler=disc_scaler, ema=ema, lrs=lrs, autocast_dtype=policy.autocast_dtype(tc.mixed_precision),
        vae_forward=vae_forward, disc_forward=disc_forward, disc_judge=disc_judge,
        noise=torch.Generator(device=device),
    )  # fmt: skip


__all__ = ["FILE_LIST", "Parts", "SharedData", "set_up", "share_data"]
