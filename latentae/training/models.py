"""The modules a run trains: the VAE (fresh or from ``train.init_from``), the discriminator."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from torch import nn

from latentae.discriminator import build_discriminator, convert_sync_batchnorm
from latentae.io import load_vae
from latentae.model import AutoencoderKL, ModelConfig, build_vae
from latentae.training.errors import StartupError

if TYPE_CHECKING:
    from latentae.recipe import Config

log = logging.getLogger("latentae.train")

# Architecture fields an ``init_from`` source (or a checkpoint to resume) must share with
# the config's model section. The rest (sample_size, scaling/shift factors, latents
# mean/std) describe how the VAE is *used* and come from the config.
ARCHITECTURE_FIELDS = (
    "latent_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "mid_block_attention",
    "use_quant_conv", "use_post_quant_conv", "in_channels", "out_channels",
)  # fmt: skip


def architecture_diff(a: ModelConfig, b: ModelConfig, fields=ARCHITECTURE_FIELDS) -> list[str]:
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
    diff = architecture_diff(cfg.model, loaded.config, fields)
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


def training_discriminator(cfg: Config, *, world_size: int, device_type: str) -> nn.Module | None:
    """The PatchGAN (None when the loss uses no GAN), with SyncBatchNorm across GPUs."""
    if not cfg.loss.uses_gan:
        return None
    disc = build_discriminator(cfg.discriminator)
    if world_size > 1 and cfg.discriminator.norm == "batch":
        if device_type == "cpu":
            log.warning(
                "BatchNorm discriminator on %d CPU processes: SyncBatchNorm needs a GPU, so each process "
                "normalises with its own batch statistics; use discriminator.norm=act for exact multi-process "
                "CPU runs",
                world_size,
            )
        else:
            disc = convert_sync_batchnorm(disc)
    return disc


__all__ = ["ARCHITECTURE_FIELDS", "architecture_diff", "freeze_encoder", "initial_vae", "training_discriminator"]
