"""How raw VAE latents become the latents a diffusion model sees (and back)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LatentNorm:
    """How raw VAE latents become the latents a diffusion model sees.

    Global (SD / SDXL / SD3 / FLUX): ``z' = (z - shift) * scale``, as ``AutoencoderKL.scale_latents``.
    Per channel (``per_channel=True``, diffusers' latents_mean/latents_std convention):
    ``z' = (z - mean_c) * scale / std_c``.
    """

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    per_channel: bool = False

    def __post_init__(self):
        if not math.isfinite(self.scaling_factor) or self.scaling_factor == 0:
            raise ValueError(f"scaling_factor must be finite and non-zero, got {self.scaling_factor}")
        if self.per_channel and (self.latents_mean is None or self.latents_std is None):
            raise ValueError("per_channel normalisation needs latents_mean and latents_std")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], per_channel: bool = False) -> "LatentNorm":
        """From a model config dict (ours, as stored in the manifest, or a diffusers config.json)."""
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        return cls(
            scaling_factor=float(cfg.get("scaling_factor", 1.0)),
            shift_factor=cfg.get("shift_factor"),
            latents_mean=tuple(mean) if mean is not None else None,
            latents_std=tuple(std) if std is not None else None,
            per_channel=per_channel,
        )

    def _channel(self, values: tuple[float, ...], z: torch.Tensor) -> torch.Tensor:
        if len(values) != z.shape[-3]:
            raise ValueError(f"latents have {z.shape[-3]} channels, the per-channel statistics {len(values)}")
        return torch.tensor(values, dtype=z.dtype, device=z.device).view(-1, 1, 1)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:  # [..., C, h, w]
        if self.per_channel:
            return (z - self._channel(self.latents_mean, z)) * self.scaling_factor / self._channel(self.latents_std, z)
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return z * self._channel(self.latents_std, z) / self.scaling_factor + self._channel(self.latents_mean, z)
        return z / self.scaling_factor + (self.shift_factor or 0.0)


def manifest_norm(manifest: dict[str, Any], per_channel: bool = False) -> LatentNorm:
    return LatentNorm.from_config(manifest["job"]["vae"]["config"], per_channel=per_channel)
