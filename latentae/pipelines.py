"""Put a latentae VAE into a diffusers pipeline, after checking that it fits.

``swap_vae(pipe, vae)`` refuses, with a message saying what and why, a VAE whose latents
the pipeline's backbone cannot read: a wrong channel count, a different downsampling
factor, or a missing ``shift_factor`` in a pipeline that normalises latents with one.
Any of these otherwise produces garbage images silently, or a shape error deep inside
the denoiser.

How many latent channels a backbone expects:

* UNet pipelines (SD 1.x / 2.x / SDXL): ``unet.config.out_channels`` (the UNet predicts
  noise in latent space). ``in_channels`` can be larger: inpainting UNets read
  9 = 4 latents + 4 masked-image latents + 1 mask, InstructPix2Pix 8 = 4 + 4.
* Patch-packing transformers (FLUX family: the pipeline packs 2x2 latent patches into
  tokens): ``(transformer.config.out_channels or in_channels) / 4``, e.g. 64 = 16 x 4.
* Other transformers (SD3, PixArt, Sana, ...): ``transformer.config.in_channels``.

The pipeline gets a real ``diffusers.AutoencoderKL`` (pipelines call its
diffusers-specific methods and read ``vae.config.*``): same state dict as ours (the key
names are identical by construction), config from ``latentae.io.diffusers_config``, on
the pipeline's device with the dtype of the VAE it replaces.
"""

from __future__ import annotations

import inspect
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from latentae.io import diffusers_config, load_vae
from latentae.model import AutoencoderKL

# Used when a pipeline's source cannot be read (frozen installs): families whose code
# computes (z - vae.config.shift_factor) * vae.config.scaling_factor.
_SHIFT_FAMILIES = ("StableDiffusion3", "Flux", "Chroma", "HiDream", "Lumina2")


class VAEMismatchError(ValueError):
    """The VAE does not fit the pipeline (channels, downsampling, or latent normalisation)."""


def to_diffusers(vae: AutoencoderKL, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Our model -> ``diffusers.AutoencoderKL`` with the identical state dict."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    cfg = {k: v for k, v in diffusers_config(vae.config).items() if not k.startswith("_")}
    dvae = DiffusersAutoencoderKL(**cfg)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in vae.state_dict().items()}
    result = dvae.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise VAEMismatchError(
            f"cannot convert to diffusers.AutoencoderKL: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]}"
        )
    return dvae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _module_source(pipe) -> str | None:
    try:
        return inspect.getsource(inspect.getmodule(type(pipe)))
    except (OSError, TypeError):
        return None


def needs_shift_factor(pipe) -> bool:
    """Whether the pipeline normalises latents as ``(z - vae.config.shift_factor) * scaling_factor``."""
    src = _module_source(pipe)
    if src is not None:
        return "vae.config.shift_factor" in src
    return type(pipe).__name__.startswith(_SHIFT_FAMILIES)


def expected_latent_channels(pipe) -> tuple[int, str]:
    """The latent channel count the pipeline's backbone reads, and how it was derived."""
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    if unet is not None:
        cin, cout = unet.config.in_channels, unet.config.out_channels
        how = f"unet.config.out_channels={cout}"
        if cin == 2 * cout + 1:
            how += f" (inpainting UNet: in_channels {cin} = {cout} latents + {cout} masked-image latents + 1 mask)"
        elif cin != cout:
            how += f" (in_channels {cin} includes {cin - cout} conditioning channels)"
        return cout, how
    if transformer is not None:
        cfg = transformer.config
        packs = hasattr(type(pipe), "_pack_latents") or type(transformer).__name__.startswith("Flux")
        if packs:
            tokens = cfg.get("out_channels") or cfg["in_channels"]
            if tokens % 4:
                raise VAEMismatchError(
                    f"{type(pipe).__name__}: transformer channels {tokens} are not 4 x latent channels "
                    f"(the pipeline packs 2x2 latent patches)"
                )
            return tokens // 4, (
                f"transformer.config.{'out_channels' if cfg.get('out_channels') else 'in_channels'}={tokens} "
                f"= {tokens // 4} latent channels x 4 (2x2 patches packed into each token)"
            )
        return cfg["in_channels"], f"transformer.config.in_channels={cfg['in_channels']}"
    raise VAEMismatchError(
        f"{type(pipe).__name__} has neither a 'unet' nor a 'transformer' component: cannot check which latents it reads"
    )


def _as_model(vae: Any) -> tuple[AutoencoderKL | None, Any, str]:
    """(our model or None, diffusers model or None, description)."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    if isinstance(vae, (str, Path)):
        return load_vae(vae, fast=False), None, str(vae)
    if isinstance(vae, AutoencoderKL):
        return vae, None, "the given latentae VAE"
    if isinstance(vae, DiffusersAutoencoderKL):
        return None, vae, "the given diffusers.AutoencoderKL"
    raise TypeError(
        f"vae must be a path, a latentae.AutoencoderKL or a diffusers.AutoencoderKL, got {type(vae).__name__}"
    )


def check_vae_fits(pipe, vae) -> None:
    """Raise ``VAEMismatchError`` unless the VAE (ours or diffusers') fits ``pipe``; see the module docstring."""
    cfg = vae.config
    name = type(pipe).__name__
    c = cfg.latent_channels
    want, how = expected_latent_channels(pipe)
    if c != want:
        raise VAEMismatchError(
            f"latent channel mismatch: the VAE has latent_channels={c}, but {name}'s backbone reads {want} "
            f"({how}). A {c}-channel VAE cannot drive this model; use a VAE with {want} latent channels."
        )
    f = 2 ** (len(cfg.block_out_channels) - 1)
    pf = getattr(pipe, "vae_scale_factor", None)
    if pf is not None and pf != f:
        raise VAEMismatchError(
            f"downsampling mismatch: the VAE downsamples by {f} (len(block_out_channels)={len(cfg.block_out_channels)}), "
            f"but {name} was built for vae_scale_factor={pf} (its image processor and default sizes use it)"
        )
    scale = cfg.scaling_factor
    if scale is None or not math.isfinite(scale) or scale <= 0:
        raise VAEMismatchError(f"scaling_factor must be a positive number, got {scale!r}")
    if needs_shift_factor(pipe):
        shift = getattr(cfg, "shift_factor", None)
        if shift is None:
            raise VAEMismatchError(
                f"{name} normalises latents as (z - vae.config.shift_factor) * scaling_factor, but the VAE has "
                f"shift_factor=None. Set it when exporting (tools/export.py ... --shift-factor X; "
                f"tools/compare.py reports the suggested value under latent health)."
            )
        if not math.isfinite(shift):
            raise VAEMismatchError(f"shift_factor must be finite, got {shift!r}")
    if scale == 1.0:
        warnings.warn(
            "the VAE's scaling_factor is 1.0 (the default): if it was never calibrated, latents reach the "
            "backbone at the wrong scale (see tools/compare.py's latent health for the suggested factor)",
            stacklevel=3,
        )


def swap_vae(pipe, vae: str | Path | AutoencoderKL | Any):
    """Replace ``pipe.vae`` with ``vae`` (a path ``latentae.load_vae`` reads, our model, or a
    ``diffusers.AutoencoderKL``) after ``check_vae_fits``. Returns the diffusers VAE now in the pipe.
    """
    ours, theirs, _ = _as_model(vae)
    check_vae_fits(pipe, ours if ours is not None else theirs)
    old = getattr(pipe, "vae", None)
    ref = old if old is not None else (getattr(pipe, "unet", None) or getattr(pipe, "transformer", None))
    device, dtype = ref.device, ref.dtype
    dvae = to_diffusers(ours, device, dtype) if ours is not None else theirs.to(device=device, dtype=dtype)
    pipe.register_modules(vae=dvae)
    return dvae


__all__ = ["VAEMismatchError", "check_vae_fits", "expected_latent_channels", "needs_shift_factor", "swap_vae", "to_diffusers"]
