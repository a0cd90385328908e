"""Export any VAE latentae reads to a diffusers folder or an LDM single file."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from latentae.io import load_vae, save_diffusers, save_ldm
from latentae.model import ModelConfig


def export_vae(
    source: str | Path,
    out: str | Path,
    fmt: Literal["diffusers", "ldm"],
    *,
    scaling_factor: float | None = None,
    shift_factor: float | None = None,
    latents_mean: Sequence[float] | None = None,
    latents_std: Sequence[float] | None = None,
    ldm_prefix: str = "",
    ema: bool = True,
    config: ModelConfig | None = None,
) -> Path:
    """Read ``source`` (checkpoint, run dir, diffusers folder, LDM file, weights-only pickle), write ``out``.

    Factors given here replace the source's; None keeps them. Weights are written in fp32.
    """
    vae = load_vae(source, ema=ema, config=config, fast=False)
    factors = dict(
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        latents_mean=tuple(latents_mean) if latents_mean is not None else None,
        latents_std=tuple(latents_std) if latents_std is not None else None,
    )
    if fmt == "diffusers":
        return save_diffusers(vae, out, **factors)
    if fmt == "ldm":
        out = Path(out)
        if out.suffix != ".safetensors":
            raise ValueError(f"--out for the ldm format must end in .safetensors, got {out}")
        return save_ldm(vae, out, prefix=ldm_prefix, **factors)
    raise ValueError(f"unknown format {fmt!r}: expected 'diffusers' or 'ldm'")
