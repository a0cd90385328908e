"""The training loop: a KL autoencoder with L1 + LPIPS + KL + PatchGAN under HF Accelerate.

One optimizer step::

    for each of grad_accum_steps micro-batches:          (DDP gradient sync only on the last)
        rec, posterior = vae(x)                          the *prepared* VAE: DDP sees the whole graph
        loss = VAELoss.generator_loss(x, rec, posterior, D)   D frozen inside, unwrapped
        backward(loss / grad_accum_steps)
    clip, check finite, Adam/AdamW step (VAE + learned logvar), EMA update
    if the discriminator trains at this step:
        for each micro-batch: backward(VAELoss.discriminator_loss(x, rec.detach(), D) / accum)
        clip, step
    every checkpoint_every steps: atomic checkpoint (latentae.checkpoint)

Exact resume: everything a step depends on is in the checkpoint: weights, EMA,
optimizer moments, the fp16 loss scale, the data position (the loader's
state_dict, per rank), the RNG states (per rank). The posterior noise comes from a
generator seeded by (seed, step, rank, micro-batch) and the learning rate is a pure
function of the step, so a run killed at any moment and resumed with ``--resume
latest`` ends with bit-identical weights on CPU (same settings, same thread count).

Output folder::

    OUTPUT/config.yaml        the resolved config of the latest start
    OUTPUT/checkpoints/       step-XXXXXXXXX/ (see latentae.checkpoint)
    OUTPUT/logs/train/        TensorBoard (loss terms, LR, grad norms, img/s, PSNR/SSIM, grids)
    OUTPUT/samples/           validation grids (input | reconstruction) as PNG
    OUTPUT/export/            final diffusers folder (EMA weights unless train.export_ema=false)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
from latentae.config import ConfigError, from_dict
from latentae.data import build_train_loader, build_val_images, hash_seed
from latentae.discriminator import build_discriminator, convert_sync_batchnorm
from latentae.ema import EMA
from latentae.io import load_vae, save_diffusers, save_vae_safetensors
from latentae.losses import VAELoss
from latentae.model import AutoencoderKL, ModelConfig, build_vae
from latentae.optim import build_optimizer, lr_factor, set_lr
from latentae.perceptual import MissingWeightsError
from latentae.validation import comparison_grid, measure, reconstruct, save_png

if TYPE_CHECKING:
    from latentae.recipe import Config

log = logging.getLogger("latentae.train")

# Architecture fields an ``init_from`` source must share with the config's model
# section. The rest (sample_size, scaling/shift factors, latents mean/std) describe
# how the VAE is *used* and come from the config.
ARCHITECTURE_FIELDS = (
    "latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "mid_block_attention",
    "use_quant_conv", "use_post_quant_conv", "in_channels", "out_channels",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    # -- batch and length ----------------------------------------------------------------
    batch_size: int = 8  # images per micro-batch *per process*
    grad_accum_steps: int = 1  # micro-batches per optimizer step; global batch = batch x accum x processes
    max_steps: int = 100_000  # optimizer steps of the whole run (resume continues up to it)
    # -- optimisation --------------------------------------------------------------------
    lr: float = 4.5e-6  # VAE (and learned logvar) learning rate; LDM kl-f8: 4.5e-6
    disc_lr: float | None = None  # discriminator learning rate; None = lr (as LDM)
    optimizer: Literal["adam", "adamw"] = "adam"  # adamw = decoupled weight decay
    betas: tuple[float, ...] = (0.5, 0.9)  # LDM's; a low beta1 (short momentum) keeps the GAN game stable
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear LR warm-up (optimizer steps)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine decays to min_lr_ratio * lr
    min_lr_ratio: float = 0.0  # floor of the cosine schedule, as a fraction of lr
    clip_grad_norm: float = 0.0  # max global grad norm per optimizer; 0 = no clipping (norms are still logged)
    # -- numerics ------------------------------------------------------------------------
    # Autocast for the forward pass; weights, gradients and optimizer state stay fp32.
    # fp16 adds a dynamic loss scaler (needs a GPU); bf16 needs none. "fp32" = no autocast
    # (Accelerate calls it "no", but YAML reads a bare `no` as false).
    mixed_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # NHWC activations and conv weights: oneDNN (CPU) and cuDNN (tensor cores) run convs
    # faster that way (measured ~5% per step on CPU, tools/bench_train.py). Saved weights
    # are plain contiguous tensors either way.
    channels_last: bool = True
    sample_posterior: bool = True  # train the decoder on z ~ q(z|x) (LDM); false = on the mean
    deterministic: bool = False  # torch.use_deterministic_algorithms (+ cuDNN deterministic); slower on GPU
    seed: int = 0  # model init, data order/crops, posterior noise
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
        choices = {
            "optimizer": ("adam", "adamw"),
            "lr_schedule": ("constant", "cosine"),
            "mixed_precision": ("fp32", "bf16", "fp16"),
            "finetune": ("full", "decoder"),
        }
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ValueError(f"train.{name} must be one of {options}, got {getattr(self, name)!r}")


class TrainingError(RuntimeError):
    """A problem the user has to fix; the message says everything (train.py prints it without a traceback)."""


class StartupError(TrainingError):
    """Raised before step 0: bad data path, empty dataset, unusable init weights, output folder in use ..."""


class NonFiniteError(TrainingError):
    """A loss term or gradient norm became NaN/inf; names the step and the term."""


# Test hook (crash tests; harmless otherwise): SIGKILL this process right after optimizer
# step N, before any checkpoint of that step. See also checkpoint.KILL_HOOK_ENV.
KILL_AFTER_STEP_ENV = "LATENTAE_TEST_KILL_AFTER_STEP"

# What a command line prints as one clean line (no traceback): the message is the whole story.
USER_ERRORS = (ConfigError, TrainingError, MissingWeightsError, CheckpointError)


@dataclass
class TrainResult:
    output_dir: Path
    step: int  # optimizer steps done
    checkpoint: Path | None  # the newest checkpoint
    export_dir: Path | None
    metrics: dict[str, float]  # the last validation's numbers ({} when there was none)


def train(cfg: Config, output_dir: str | Path, *, resume: str | None = None) -> TrainResult:
    """Train (or resume, ``resume="latest"`` or a checkpoint path) into ``output_dir``."""
    return Trainer(cfg, output_dir, resume=resume).run()


# --------------------------------------------------------------------------- small helpers


def _config_yaml(cfg: Config) -> str:
    from latentae.recipe import dump_config  # recipe imports this module: import at call time

    return dump_config(cfg)


def _rng_state() -> dict[str, Any]:
    """Every global RNG this process has, in a ``torch.load(weights_only=True)``-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(*modules: nn.Module | None) -> str:
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


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def _architecture_diff(a: ModelConfig, b: ModelConfig, fields=ARCHITECTURE_FIELDS) -> list[str]:
    return [
        f"{f}: config {getattr(a, f)!r} vs file {getattr(b, f)!r}" for f in fields if getattr(a, f) != getattr(b, f)
    ]


def initial_vae(cfg: Config) -> AutoencoderKL:
    """A fresh VAE, or the ``train.init_from`` weights in the config's architecture.

    The source's architecture must equal the model section (a mismatch is an error
    listing every differing field); LDM single files store no config, so there only
    what the weights show is checked (widths, depths, channels, quant convs, attention).
    """
    src = cfg.train.init_from
    if src is None:
        return build_vae(cfg.model)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_vae(src, fast=False)
    except (OSError, ValueError) as e:  # WeightsError is a ValueError; FileNotFoundError an OSError
        raise StartupError(f"train.init_from: {e}") from e
    inferred = any("inferred the architecture" in str(w.message) for w in caught)
    # norm_num_groups leaves no trace in the weights: only a stored config can contradict it.
    fields = tuple(f for f in ARCHITECTURE_FIELDS if not (inferred and f == "norm_num_groups"))
    diff = _architecture_diff(cfg.model, loaded.config, fields)
    if diff:
        raise StartupError(
            f"train.init_from={src}: its architecture differs from the config's model section ("
            + "; ".join(diff)
            + "). Use a config whose model section matches the weights."
        )
    vae = build_vae(cfg.model)
    vae.load_state_dict(loaded.state_dict())
    return vae


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Decoder-only fine-tuning: the encoder side never changes, so neither do the latents."""
    for m in (vae.encoder, vae.quant_conv):
        if m is not None:
            m.requires_grad_(False)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Holds the run's state; ``run()`` trains to ``train.max_steps``. See the module docstring."""

    def __init__(self, cfg: Config, output_dir: str | Path, *, resume: str | None = None):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.cfg, self.tc = cfg, cfg.train
        self.out = Path(output_dir)
        tc = self.tc
        self._check_config()
        if tc.deterministic:
            # cuBLAS needs this before its first use to be deterministic.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.acc = acc = Accelerator(
            mixed_precision="no" if tc.mixed_precision == "fp32" else tc.mixed_precision,
            cpu=not torch.cuda.is_available(),
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.start_ckpt = self._prepare_output(resume)
        manifest = read_manifest(self.start_ckpt) if self.start_ckpt else None
        if manifest is not None and manifest.get("world_size") != self.world:
            raise StartupError(
                f"{self.start_ckpt} was written by {manifest.get('world_size')} processes, this run has {self.world}: "
                "exact resume needs the same number of processes (the data split and per-rank states depend on it)"
            )

        # Every rank seeds alike, so models start identical (DDP also broadcasts them).
        random.seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        torch.manual_seed(tc.seed)

        rank_state = self._read_rank_state() if self.start_ckpt else None
        try:
            self.loader = build_train_loader(
                cfg.data, tc.batch_size, seed=tc.seed, rank=self.rank, world_size=self.world,
                resume_states=self._read_loader_states(manifest) if self.start_ckpt else None,
            )  # fmt: skip
        except (OSError, ValueError) as e:
            raise StartupError(f"data: {e}") from e
        self.val_images = self._val_images() if acc.is_main_process else None

        # On resume the weights come from the checkpoint: init_from is not read again.
        vae = initial_vae(cfg) if self.start_ckpt is None else build_vae(cfg.model)
        if tc.finetune == "decoder":
            if tc.init_from is None and self.start_ckpt is None:
                log.warning("train.finetune=decoder without train.init_from: the frozen encoder is random")
            freeze_encoder(vae)
        self.loss = VAELoss(cfg.loss).to(acc.device)  # may raise MissingWeightsError (LPIPS backbone)
        disc = build_discriminator(cfg.discriminator) if cfg.loss.uses_gan else None
        if disc is not None and self.world > 1 and cfg.discriminator.norm == "batch":
            if acc.device.type == "cpu":
                log.warning(
                    "BatchNorm discriminator on %d CPU processes: SyncBatchNorm needs a GPU, so each process "
                    "normalises with its own batch statistics; use discriminator.norm=act for exact multi-process "
                    "CPU runs",
                    self.world,
                )
            else:
                disc = convert_sync_batchnorm(disc)

        if tc.channels_last:
            # Before the optimizers exist: their state then takes the same layout.
            vae = vae.to(memory_format=torch.channels_last)
            self.loss = self.loss.to(memory_format=torch.channels_last)
            disc = disc.to(memory_format=torch.channels_last) if disc is not None else None
        vae_params = [p for p in vae.parameters() if p.requires_grad] + self.loss.trainable_parameters()
        opt_kw = dict(kind=tc.optimizer, betas=tc.betas, weight_decay=tc.weight_decay)
        vae_opt = build_optimizer(vae_params, lr=tc.lr, **opt_kw)
        disc_opt = build_optimizer(disc.parameters(), lr=tc.disc_lr or tc.lr, **opt_kw) if disc else None

        self.step = 0
        self.ema: EMA | None = None
        ema_state = None
        if self.start_ckpt is not None:
            ema_state = self._load_checkpoint(self.start_ckpt, manifest, vae, disc, vae_opt, disc_opt)
        if disc is not None:
            self.vae, self.disc, self.vae_opt, self.disc_opt = acc.prepare(vae, disc, vae_opt, disc_opt)
        else:
            self.vae, self.vae_opt = acc.prepare(vae, vae_opt)
            self.disc = self.disc_opt = None
        if tc.ema_decay > 0 and acc.is_main_process:
            self.ema = EMA(acc.unwrap_model(self.vae), tc.ema_decay, tc.ema_every)
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
        if rank_state is not None:
            if acc.scaler is not None and rank_state.get("scaler") is not None:
                acc.scaler.load_state_dict(rank_state["scaler"])
            _set_rng_state(rank_state["rng"])  # last: nothing above may consume randomness after it

        self.noise = torch.Generator(device=acc.device)
        self.skipped_total = int(manifest.get("skipped_samples", 0)) if manifest else 0
        self.amp_skips = 0
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint = self.start_ckpt
        self._write_config()
        # purge_step: TensorBoard drops events a killed run logged after the checkpoint we resume from.
        tb_kwargs = {"purge_step": self.step + 1} if self.step > 0 else {}
        acc.init_trackers("train", init_kwargs={"tensorboard": tb_kwargs})

    # -- start-up ---------------------------------------------------------------------------

    def _check_config(self) -> None:
        cfg = self.cfg
        if not cfg.data.path:
            raise StartupError("data.path is empty: set it in the config or pass data.path=DIR_OR_SHARDS")
        if cfg.loss.uses_gan and cfg.data.resolution < cfg.discriminator.min_size:
            raise StartupError(
                f"data.resolution={cfg.data.resolution} is too small for the discriminator "
                f"(n_layers={cfg.discriminator.n_layers} needs >= {cfg.discriminator.min_size} px): lower "
                "discriminator.n_layers or raise data.resolution"
            )
        if self.tc.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise StartupError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 (or fp32) on CPU")

    def _prepare_output(self, resume: str | None) -> Path | None:
        """Create the output folder, clean half-written checkpoints, find the one to resume from."""
        acc = self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for p in clean_temp(self.out):
                log.warning("removed a half-written checkpoint: %s", p)
        acc.wait_for_everyone()
        existing = list_checkpoints(self.out)
        if resume is None:
            if existing:
                raise StartupError(
                    f"{self.out} already holds checkpoints (newest {existing[-1][1].name}): pass --resume latest to "
                    "continue that run, or choose another --output-dir"
                )
            return None
        try:
            ckpt = resolve_resume(self.out, resume)
        except CheckpointError as e:
            raise StartupError(str(e)) from e
        if ckpt is None:
            if acc.is_main_process:
                log.info("--resume %s: no checkpoint in %s yet, starting from scratch", resume, self.out)
            return None
        newer = [p.name for s, p in existing if s > int(read_manifest(ckpt)["step"])]
        if ckpt.parent.resolve() == (self.out / "checkpoints").resolve() and newer:
            raise StartupError(
                f"resuming from {ckpt.name}, but newer checkpoints exist in {self.out} ({', '.join(newer)}): resuming "
                "would interleave two runs; move them away or resume into another --output-dir"
            )
        return ckpt

    def _val_images(self) -> torch.Tensor | None:
        n = self.tc.num_val_images
        if n == 0:
            return None
        try:
            return build_val_images(self.cfg.data, n)
        except (OSError, ValueError) as e:
            raise StartupError(f"validation images: {e} (or set train.num_val_images=0)") from e

    def _write_config(self) -> None:
        if self.acc.is_main_process:
            tmp = self.out / "config.yaml.tmp"
            tmp.write_text(_config_yaml(self.cfg))
            tmp.replace(self.out / "config.yaml")

    # -- checkpoints ---------------------------------------------------------------------

    def _read_rank_state(self) -> dict[str, Any]:
        path = self.start_ckpt / f"rank-{self.rank}.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise StartupError(f"cannot read {path}: {e}") from e

    def _read_loader_states(self, manifest: dict) -> list[dict]:
        """Every saved rank's data position, in rank order: the data layer continues exactly
        from this rank's when the layout is unchanged, elastically from all of them if not."""
        paths = [self.start_ckpt / f"rank-{r}.pt" for r in range(int(manifest["world_size"]))]
        try:
            return [torch.load(p, map_location="cpu", weights_only=True)["loader"] for p in paths]
        except Exception as e:
            raise StartupError(f"cannot read the data positions in {self.start_ckpt}: {e}") from e

    def _load_checkpoint(self, ckpt: Path, manifest: dict, vae, disc, vae_opt, disc_opt) -> dict | None:
        """Weights and optimizer states into the (not yet prepared) modules; returns the EMA state."""
        try:
            saved = from_dict(type(self.cfg), yaml.safe_load((ckpt / "config.yaml").read_text()))
        except Exception as e:
            raise StartupError(f"{ckpt / 'config.yaml'}: unreadable: {e}") from e
        diff = _architecture_diff(self.cfg.model, saved.model)
        if diff:
            raise StartupError(f"cannot resume from {ckpt}: the model section changed ({'; '.join(diff)})")
        if saved.train.finetune != self.tc.finetune or (disc is None) != (not saved.loss.uses_gan):
            raise StartupError(
                f"cannot resume from {ckpt}: train.finetune or the use of a discriminator changed "
                "(the optimizer states would not match)"
            )
        if manifest.get("num_threads") not in (None, torch.get_num_threads()):
            log.warning(
                "the checkpoint was written with %s torch threads, this run uses %d: results may differ in the "
                "last bits from an uninterrupted run", manifest.get("num_threads"), torch.get_num_threads(),
            )  # fmt: skip
        try:
            vae.load_state_dict(load_file(str(ckpt / "vae.safetensors")))
            self.loss.load_state_dict(load_file(str(ckpt / "loss.safetensors")))
            opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
            vae_opt.load_state_dict(opt["vae"])
            if disc is not None:
                disc.load_state_dict(load_file(str(ckpt / "discriminator.safetensors")))
                disc_opt.load_state_dict(opt["disc"])
            ema = None
            if self.tc.ema_decay > 0:
                path = ckpt / "vae_ema.safetensors"
                # EMA switched on at resume: start it from the current weights.
                ema = load_file(str(path)) if path.is_file() else None
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise StartupError(f"cannot load checkpoint {ckpt}: {e}") from e
        self.step = int(manifest["step"])
        if self.acc.is_main_process:
            log.info("resumed from %s (step %d)", ckpt, self.step)
        return ema

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-{step}/`` atomically (main process), all ranks contributing their state."""
        from accelerate.utils import gather_object

        acc = self.acc
        vae, disc = acc.unwrap_model(self.vae), self.disc and acc.unwrap_model(self.disc)
        for name, m in (("vae", vae), ("discriminator", disc), ("ema", self.ema and self.ema.model)):
            if m is not None and not all(torch.isfinite(p).all() for p in m.parameters()):
                raise NonFiniteError(f"refusing to checkpoint step {self.step}: non-finite {name} weights")
        rank_state = {
            "rng": _rng_state(),
            "loader": self.loader.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        states = gather_object([rank_state])
        prints = gather_object([_fingerprint(vae, disc)])
        path = None
        if acc.is_main_process:
            if len(set(prints)) > 1:
                raise TrainingError(f"step {self.step}: the replicas on different ranks diverged ({prints})")
            writers = {
                "vae.safetensors": lambda p: save_vae_safetensors(vae, p),
                "loss.safetensors": lambda p: save_file(_cpu_state(self.loss), str(p)),
                "optimizer.pt": lambda p: torch.save(
                    {"vae": self.vae_opt.state_dict(), "disc": self.disc_opt.state_dict() if disc else None}, p
                ),
                "config.yaml": lambda p: p.write_text(_config_yaml(self.cfg)),
            }
            if self.ema is not None:
                writers["vae_ema.safetensors"] = lambda p: save_vae_safetensors(self.ema.model, p)
            if disc is not None:
                writers["discriminator.safetensors"] = lambda p: save_file(_cpu_state(disc), str(p))
            for r, st in enumerate(states):
                writers[f"rank-{r}.pt"] = lambda p, st=st: torch.save(st, p)
            manifest = {
                "world_size": self.world,
                "num_threads": torch.get_num_threads(),
                "torch_version": torch.__version__,
                "mixed_precision": self.tc.mixed_precision,
                "rank_fingerprints": prints,
                "skipped_samples": self.skipped_total,
            }
            path = write_checkpoint(self.out, self.step, writers, manifest, keep_last=self.tc.keep_last)
            log.info("checkpoint %s", path)
        acc.wait_for_everyone()
        self.last_checkpoint = self.out / "checkpoints" / f"step-{self.step:09d}"
        return path or self.last_checkpoint

    # -- one step -------------------------------------------------------------------------

    def _check_finite(self, logs: dict[str, torch.Tensor], what: str) -> None:
        keys = list(logs)
        finite = torch.isfinite(torch.stack([logs[k] for k in keys])).float()
        if self.world > 1:  # every rank must stop together, or the others hang in the next collective
            finite = self.acc.reduce(finite, "sum") / self.world
        bad = [k for k, ok in zip(keys, finite.tolist()) if ok < 1.0]
        if bad:
            values = ", ".join(f"{k}={logs[k].item():.4g}" for k in keys)
            raise NonFiniteError(
                f"non-finite {what} at step {self.step}: {', '.join(repr(k) for k in bad)} (on this rank: {values}). "
                f"Training stopped and nothing was saved from this state; the newest checkpoint "
                f"({self.last_checkpoint or 'none yet'}) is unaffected. "
                "Try a lower train.lr, train.clip_grad_norm, or train.mixed_precision=fp32."
            )

    def _clip(self, optimizer, params: list[torch.Tensor], what: str) -> torch.Tensor:
        """Unscale (fp16), clip, and return the global grad norm; non-finite is an error unless fp16."""
        self.acc.unscale_gradients(optimizer=optimizer)
        max_norm = self.tc.clip_grad_norm if self.tc.clip_grad_norm > 0 else float("inf")
        # With max_norm=inf this only measures (the clip coefficient is exactly 1).
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm, foreach=False)
        if not torch.isfinite(norm) and self.tc.mixed_precision != "fp16":
            raise NonFiniteError(
                f"non-finite {what} gradient norm at step {self.step} ({norm.item()}) although the loss was finite. "
                f"Training stopped and nothing was saved from this state; the newest checkpoint "
                f"({self.last_checkpoint or 'none yet'}) is unaffected. "
                "Try a lower train.lr or set train.clip_grad_norm."
            )
        return norm.detach()

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step of the VAE (and discriminator); returns detached logs."""
        acc, tc, step = self.acc, self.tc, self.step
        accum = tc.grad_accum_steps
        vae_raw = acc.unwrap_model(self.vae)
        disc_raw = acc.unwrap_model(self.disc) if self.disc is not None else None
        factor = lr_factor(step, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps,
                           schedule=tc.lr_schedule, min_ratio=tc.min_lr_ratio)  # fmt: skip
        set_lr(self.vae_opt, tc.lr * factor)
        logs: dict[str, torch.Tensor] = {}
        kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (inputs, detached reconstructions) for D
        n_images = 0
        self.vae_opt.zero_grad(set_to_none=True)
        for micro in range(accum):
            # The DataLoader draws its worker base seed from the global torch RNG when it
            # starts; fork_rng keeps that out of the training RNG stream, so a resumed run
            # (whose loader starts at a different moment) has the very same RNG states.
            with torch.random.fork_rng(devices=[]):
                batch = next(self.batches)
            for name, reason in batch["skipped"]:
                log.warning("skipped bad sample %s: %s", name, reason)
            self.skipped_total += len(batch["skipped"])
            x = batch["image"].to(acc.device, non_blocking=True)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            n_images += len(x)
            self.noise.manual_seed(hash_seed(tc.seed, "posterior", step, self.rank, micro))
            sync = acc.no_sync(self.vae) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    rec, posterior = self.vae(x, sample_posterior=tc.sample_posterior, generator=self.noise)
                    loss, glogs = self.loss.generator_loss(
                        x, rec, posterior, step=step, last_layer=vae_raw.last_layer, discriminator=disc_raw
                    )
                self._check_finite(glogs, "loss")
                acc.backward(loss / accum)
            kept.append((x, rec.detach()))
            for k, v in glogs.items():
                logs[k] = logs.get(k, 0.0) + v / accum
        extra = self.loss.trainable_parameters()
        if extra and self.world > 1:
            # The loss module is not DDP-wrapped: average the learned logvar's gradient by hand.
            for p in extra:
                p.grad = acc.reduce(p.grad, "mean")
        params = [p for g in self.vae_opt.param_groups for p in g["params"]]
        logs["grad_norm"] = self._clip(self.vae_opt, params, "VAE")
        self.vae_opt.step()
        if self.vae_opt.step_was_skipped:
            self.amp_skips += 1
        logs["lr"] = torch.tensor(tc.lr * factor)

        if self.disc is not None and self.loss.disc_active(step):
            set_lr(self.disc_opt, (tc.disc_lr or tc.lr) * factor)
            self.disc_opt.zero_grad(set_to_none=True)
            for micro, (x, rec) in enumerate(kept):
                sync = acc.no_sync(self.disc) if micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    with acc.autocast():
                        d_loss, dlogs = self.loss.discriminator_loss(x, rec, step=step, discriminator=self.disc)
                    self._check_finite(dlogs, "discriminator loss")
                    acc.backward(d_loss / accum)
                for k, v in dlogs.items():
                    logs["disc/" + k] = logs.get("disc/" + k, 0.0) + v / accum
            disc_params = [p for g in self.disc_opt.param_groups for p in g["params"]]
            logs["disc/grad_norm"] = self._clip(self.disc_opt, disc_params, "discriminator")
            self.disc_opt.step()
            if self.disc_opt.step_was_skipped:
                self.amp_skips += 1
            logs["disc/lr"] = torch.tensor((tc.disc_lr or tc.lr) * factor)
        if self.ema is not None:
            self.ema.update(vae_raw, step)
        self.step += 1
        logs["images"] = torch.tensor(float(n_images))
        return {k: v.detach().float().cpu() if torch.is_tensor(v) else torch.tensor(v) for k, v in logs.items()}

    # -- validation and export --------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Main process: PSNR/SSIM(/LPIPS) of the VAE (and EMA), grid PNG + TensorBoard image."""
        acc = self.acc
        metrics: dict[str, float] = {}
        if acc.is_main_process and self.val_images is not None:
            perceptual = self.loss.perceptual
            models = [("val", acc.unwrap_model(self.vae))]
            if self.ema is not None:
                models.append(("val_ema", self.ema.model))
            images = self.val_images
            for prefix, model in models:
                recs = reconstruct(model, images, batch_size=self.tc.batch_size)
                metrics.update({f"{prefix}/{k}": v for k, v in measure(images, recs, perceptual).items()})
                grid = comparison_grid(images, recs)
                save_png(grid, self.out / "samples" / f"{prefix}-step-{self.step:09d}.png")
                tracker = acc.get_tracker("tensorboard")
                tracker.log_images({f"{prefix}/input_vs_reconstruction": grid[None].numpy()}, self.step)
            acc.log(metrics, step=self.step)
            self.last_metrics = metrics
        acc.wait_for_everyone()
        return metrics

    def export(self) -> Path | None:
        """Final diffusers folder OUTPUT/export (EMA weights unless train.export_ema=false)."""
        path = None
        if self.acc.is_main_process:
            use_ema = self.ema is not None and self.tc.export_ema
            model = self.ema.model if use_ema else self.acc.unwrap_model(self.vae)
            final, tmp = self.out / "export", self.out / ".export.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_diffusers(model, tmp)
            (tmp / "latentae.json").write_text(f'{{"step": {self.step}, "ema": {str(use_ema).lower()}}}\n')
            shutil.rmtree(final, ignore_errors=True)
            tmp.replace(final)
            path = final
            log.info("exported %s weights to %s", "EMA" if use_ema else "final", final)
        self.acc.wait_for_everyone()
        return path

    # -- the loop -------------------------------------------------------------------------

    def _log(self, sums: dict[str, torch.Tensor], count: int, seconds: float) -> dict[str, float]:
        keys = sorted(sums)
        values = torch.stack([sums[k] / count for k in keys]).to(self.acc.device)
        if self.world > 1:
            values = self.acc.reduce(values, "mean")
        out = {}
        for k, v in zip(keys, values.tolist()):
            if k == "images":
                out["perf/img_per_s"] = v * count * self.world / max(seconds, 1e-9)
            elif k in ("lr", "grad_norm"):
                out[f"train/{k}"] = v
            elif k.startswith("disc/"):
                out[k] = v
            else:
                out[f"loss/{k}"] = v
        out["data/skipped_samples"] = float(self.skipped_total)
        if self.tc.mixed_precision == "fp16":
            out["amp/skipped_steps"] = float(self.amp_skips)
            out["amp/scale"] = float(self.acc.scaler.get_scale())
        self.acc.log(out, step=self.step)
        return out

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        acc, tc = self.acc, self.tc
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not acc.is_main_process, dynamic_ncols=True,
                   desc="train")  # fmt: skip
        self.batches = iter(self.loader)
        sums: dict[str, torch.Tensor] = {}
        count, busy = 0, 0.0  # busy: seconds inside train_step (img/s excludes checkpoints and validation)
        kill_after = os.environ.get(KILL_AFTER_STEP_ENV)
        try:
            if acc.is_main_process and self.step == 0:
                log.info("training to step %d into %s", tc.max_steps, self.out)
            while self.step < tc.max_steps:
                t0 = time.perf_counter()
                logs = self.train_step()
                busy += time.perf_counter() - t0
                if kill_after is not None and int(kill_after) == self.step:
                    os.kill(os.getpid(), signal.SIGKILL)  # test hook, see KILL_AFTER_STEP_ENV
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    out = self._log(sums, count, busy)
                    bar.set_postfix(
                        loss=f"{out['loss/total']:.4f}", rec=f"{out['loss/rec']:.4f}", kl=f"{out['loss/kl']:.1f}",
                        img_s=f"{out['perf/img_per_s']:.1f}", **({"psnr": f"{self.last_metrics['val/psnr']:.2f}"}
                                                                  if "val/psnr" in self.last_metrics else {}),
                    )  # fmt: skip
                    sums, count, busy = {}, 0, 0.0
                last = self.step == tc.max_steps
                if tc.val_every and self.step % tc.val_every == 0 and not last:
                    self.validate()
                if self.step % tc.checkpoint_every == 0 or last:
                    self.save_checkpoint()
            bar.close()
            self.validate()
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:09d}"):
                self.save_checkpoint()  # a resumed, already finished run still gets its final checkpoint
            export_dir = self.export()
        finally:
            bar.close()
            self.batches = None
            acc.end_training()
        return TrainResult(self.out, self.step, self.last_checkpoint, export_dir, dict(self.last_metrics))


__all__ = [
    "ARCHITECTURE_FIELDS",
    "NonFiniteError",
    "StartupError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "USER_ERRORS",
    "freeze_encoder",
    "initial_vae",
    "train",
]
