"""``train:`` section of the config: optimisation, precision, speed, EMA, checkpoints, logging.

Importable without torch or the trainer (``latentae.recipe`` imports it; nothing here
imports back). Also holds the learning-rate arithmetic, a pure function of the config
and the number of processes, so ``train.py --dry-run`` and the trainer print the same.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TrainConfig:
    # -- batch and length ----------------------------------------------------------------
    batch_size: int = 8  # images per micro-batch *per process*
    grad_accum_steps: int = 1  # micro-batches per optimizer step; global batch = batch x accum x processes
    max_steps: int = 100_000  # optimizer steps of the whole run (resume continues up to it)
    # -- optimisation --------------------------------------------------------------------
    # VAE (and learned logvar) learning rate. With scale_lr=false it is the rate the
    # optimizer gets; with scale_lr=true it is a *base* rate per image (LDM's
    # base_learning_rate), multiplied by processes x batch_size x grad_accum_steps.
    lr: float = 4.5e-6
    disc_lr: float | None = None  # discriminator rate, same convention as lr; None = lr (as LDM)
    # LDM's main.py --scale_lr (on by default there): effective lr = lr x processes x
    # batch_size x grad_accum_steps, for the VAE and the discriminator alike.
    scale_lr: bool = False
    optimizer: Literal["adam", "adamw"] = "adam"  # adamw = decoupled weight decay
    betas: tuple[float, ...] = (0.5, 0.9)  # LDM's; a low beta1 (short momentum) keeps the GAN game stable
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up (optimizer steps)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to min_lr_ratio * lr
    min_lr_ratio: float = 0.0  # floor of the cosine schedule, as a fraction of lr
    clip_grad_norm: float = 0.0  # max global grad norm per optimizer; 0 = no clipping (norms are still logged)
    # -- numerics ------------------------------------------------------------------------
    # Autocast for the training forward pass; weights, gradients and optimizer state stay
    # fp32, and validation always runs in fp32 outside autocast. fp16 adds one dynamic loss
    # scaler per optimizer; bf16 needs none. "fp32" = no autocast.
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # NHWC activations and conv weights: oneDNN (CPU) and cuDNN (tensor cores) run convs
    # faster that way (measured ~5% per step on CPU, tools/bench_train.py). Saved weights
    # are plain contiguous tensors either way.
    channels_last: bool = True
    sample_posterior: bool = True  # train the decoder on z ~ q(z|x) (LDM); false = on the mean
    # torch.use_deterministic_algorithms, cuDNN deterministic and cudnn.benchmark off
    # (benchmark picks kernels by timing, which may differ run to run). Slower on GPU.
    deterministic: bool = False
    seed: int = 0  # model init, data order/crops, posterior noise
    # -- speed / memory --------------------------------------------------------------------
    # torch.compile the training forward of the VAE and the discriminator (validation,
    # EMA and saving use the plain modules). The first steps pay the compile time.
    compile: bool = False
    # Recompute each encoder/decoder block's activations in the backward pass instead of
    # keeping them: an SD-size VAE's forward+backward peak 1953 -> 864 MiB at 256 px, +19%
    # compute (CPU, measured). For SD-size at 512 px and up.
    gradient_checkpointing: bool = False
    # -- EMA -----------------------------------------------------------------------------
    ema_decay: float = 0.0  # EMA of the VAE weights, e.g. 0.999; 0 = off
    ema_every: int = 1  # update the EMA every this many optimizer steps
    export_ema: bool = True  # the final export uses the EMA weights (when EMA is on)
    # -- what to train -------------------------------------------------------------------
    finetune: Literal["full", "decoder"] = "full"  # decoder: encoder + quant_conv frozen, latents unchanged
    # Starting weights: diffusers folder, LDM single file, latentae checkpoint or run dir,
    # .ckpt/.pt (weights_only). Its architecture must equal the model section (checked);
    # the model section's sample_size and latent scaling factors are used as written.
    init_from: str | None = None
    # -- checkpoints, logging, validation ----------------------------------------------------
    checkpoint_every: int = 1000  # optimizer steps between checkpoints (one is always written at the end)
    # Also checkpoint when this many minutes of wall-clock time passed since the last
    # checkpoint (0 = off): bounds the work a hard kill loses, whatever the step time.
    checkpoint_every_minutes: float = 0.0
    # Signals that make the run checkpoint at the end of the current step and exit 0
    # (preemption; the scheduler requeues the job, which runs again with --resume latest).
    # One rank receiving it is enough. [] = the signals keep their default action.
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    keep_last: int = 3  # keep the newest K checkpoints; 0 = keep all
    log_every: int = 10  # optimizer steps between scalar logs
    val_every: int = 1000  # optimizer steps between validation passes (and one at the end); 0 = end only
    num_val_images: int = 8  # held-out images reconstructed for PSNR/SSIM and the grids; 0 = no validation

    def __post_init__(self):
        positive = ("batch_size", "grad_accum_steps", "max_steps", "checkpoint_every", "log_every", "ema_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "keep_last", "val_every", "num_val_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "disc_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"train.{name} must be a positive number, got {v}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm >= 0):
            raise ValueError(f"train.clip_grad_norm must be >= 0 (0 = off), got {self.clip_grad_norm}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if not (math.isfinite(self.checkpoint_every_minutes) and self.checkpoint_every_minutes >= 0):
            raise ValueError(f"train.checkpoint_every_minutes must be >= 0 (0 = off), got {self.checkpoint_every_minutes}")
        for name in self.stop_signals:
            if name in ("SIGKILL", "SIGSTOP") or not isinstance(getattr(signal, str(name), None), signal.Signals):
                raise ValueError(
                    f"train.stop_signals: {name!r} is not a signal that can be handled (e.g. SIGTERM, SIGUSR1, SIGINT)"
                )
        choices = {
            "optimizer": ("adam", "adamw"),
            "lr_schedule": ("constant", "cosine"),
            "mixed_precision": ("fp32", "bf16", "fp16"),
            "finetune": ("full", "decoder"),
        }
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ValueError(f"train.{name} must be one of {options}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class LearningRates:
    """The peak rates the optimizers get (before warm-up / schedule), and how they came about."""

    vae: float
    disc: float
    factor: int  # processes x batch_size x grad_accum_steps when scale_lr, else 1
    explanation: str  # the arithmetic, for the start-up log and --dry-run


def effective_lrs(tc: TrainConfig, processes: int) -> LearningRates:
    """``train.lr`` / ``train.disc_lr`` -> the rates the optimizers use with ``processes`` processes.

    scale_lr=true (LDM's convention): rate = base x processes x batch_size x grad_accum_steps,
    i.e. the base is per image of the global batch. scale_lr=false: the rates as written.
    """
    if processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {processes}")
    base_disc = tc.disc_lr if tc.disc_lr is not None else tc.lr
    if not tc.scale_lr:
        why = f"VAE {tc.lr:.2e}, discriminator {base_disc:.2e} (train.scale_lr=false: the rates as written)"
        return LearningRates(tc.lr, base_disc, 1, why)
    factor = processes * tc.batch_size * tc.grad_accum_steps
    terms = f"{processes} processes x {tc.batch_size} batch x {tc.grad_accum_steps} accumulation"
    why = (
        f"VAE {tc.lr * factor:.2e} = {tc.lr:.2e} (train.lr) x {terms}; discriminator {base_disc * factor:.2e} = "
        f"{base_disc:.2e} ({'train.disc_lr' if tc.disc_lr is not None else 'train.lr'}) x {terms} (train.scale_lr=true)"
    )
    return LearningRates(tc.lr * factor, base_disc * factor, factor, why)


__all__ = ["LearningRates", "TrainConfig", "effective_lrs"]
