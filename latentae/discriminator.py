"""PatchGAN discriminator (pix2pix's N-layer design, as LDM trains its VAEs with).

Each output logit judges one overlapping patch of the input (70x70 px for
n_layers=3), so the adversarial loss sharpens local texture without a global
"is this a photo" judgement.

Layout (k4 = 4x4 conv, padding 1; widths cap at 8 x base_channels):

    conv k4 s2 (3 -> base)                  + LeakyReLU(0.2)     # no norm on the first layer
    n_layers-1 x  conv k4 s2 (widths x2)    + norm + LeakyReLU(0.2)
    conv k4 s1                              + norm + LeakyReLU(0.2)
    conv k4 s1 (-> 1 logit channel)

    images [N, 3, H, W]  ->  logits [N, 1, H/2**n - 2, W/2**n - 2]   (H >= 3 * 2**n)

``norm="batch"``: BatchNorm. Under multi-GPU training convert it with
``convert_sync_batchnorm(disc)`` before wrapping in DDP so statistics cover the global
batch. ``norm="act"``: ActNorm (Glow), a per-channel affine initialised from the first
training batch's statistics; no running statistics, so train/eval behave the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DiscriminatorConfig:
    n_layers: int = 3  # number of stride-2 convs; receptive field 70 px at 3
    base_channels: int = 64
    norm: Literal["batch", "act"] = "batch"
    in_channels: int = 3

    def __post_init__(self):
        if self.n_layers < 1:
            raise ValueError(f"discriminator n_layers must be >= 1, got {self.n_layers}")
        if self.base_channels < 1:
            raise ValueError(f"discriminator base_channels must be >= 1, got {self.base_channels}")
        if self.norm not in ("batch", "act"):
            raise ValueError(f"discriminator norm must be 'batch' or 'act', got {self.norm!r}")
        if self.in_channels < 1:
            raise ValueError(f"discriminator in_channels must be >= 1, got {self.in_channels}")

    @property
    def min_size(self) -> int:
        """Smallest input side that still yields a 1x1 logit map."""
        return 3 * 2**self.n_layers


class ActNorm(nn.Module):
    """Per-channel ``y = x * scale + bias``, initialised so the first training batch is standardised.

    The "already initialised" flag is a buffer, so it travels with ``state_dict``:
    a resumed run must not re-initialise (that would overwrite trained weights).
    Under torch.distributed the first-batch statistics are averaged over ranks, so
    every rank starts from the same parameters (DDP only broadcasts parameters at
    construction, before this init happens).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # uint8 rather than bool: every collective backend broadcasts it (DDP broadcast_buffers).
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        # Host-side memo of "initialized is 1": reading the buffer is a device-to-host sync,
        # so it is read until it says 1, then never again (a load_state_dict resets the memo).
        self._known_initialized = False

    @torch.no_grad()
    def _init_from(self, x: torch.Tensor) -> None:
        x = x.detach().float().transpose(0, 1).flatten(1)  # [C, N*H*W]
        moments = torch.stack([x.mean(1), x.pow(2).mean(1)])  # [2, C]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(moments)
            moments /= dist.get_world_size()
        mean, sq = moments
        std = (sq - mean.pow(2)).clamp_min(0).sqrt()
        scale = 1.0 / (std + self.eps)
        self.scale.copy_(scale.view_as(self.scale))
        self.bias.copy_((-mean * scale).view_as(self.bias))
        self.initialized.fill_(1)

    def _load_from_state_dict(self, *args, **kwargs):
        self._known_initialized = False
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only a training batch initialises: eval calls must not freeze in statistics.
        if self.training and not self._known_initialized:
            if not bool(self.initialized):
                self._init_from(x)
            self._known_initialized = True
        return x * self.scale + self.bias


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else ActNorm(channels)


class PatchDiscriminator(nn.Module):
    """forward(images [N, C, H, W]) -> patch logits [N, 1, h, w] (unnormalised, real > 0)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.config = cfg
        base = cfg.base_channels
        widths = [base * min(2**i, 8) for i in range(cfg.n_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        # Convs followed by a norm have no bias: the norm's own shift makes it redundant.
        for i in range(1, cfg.n_layers):
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=False), _norm(cfg.norm, widths[i])]
            layers += [nn.LeakyReLU(0.2)]
        last = widths[cfg.n_layers]
        layers += [nn.Conv2d(widths[cfg.n_layers - 1], last, 4, 1, 1, bias=False), _norm(cfg.norm, last)]
        layers += [nn.LeakyReLU(0.2), nn.Conv2d(last, 1, 4, 1, 1)]
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """pix2pix / DCGAN init: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), biases 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
            # ActNorm initialises itself from data on the first training batch.

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if images.ndim != 4 or images.shape[1] != cfg.in_channels:
            raise ValueError(f"discriminator expects [N, {cfg.in_channels}, H, W], got {tuple(images.shape)}")
        if min(images.shape[-2:]) < cfg.min_size:
            raise ValueError(
                f"discriminator with n_layers={cfg.n_layers} needs images of at least "
                f"{cfg.min_size}x{cfg.min_size} px, got {tuple(images.shape[-2:])}"
            )
        return self.layers(images)


def build_discriminator(cfg: DiscriminatorConfig) -> PatchDiscriminator:
    return PatchDiscriminator(cfg)


def convert_sync_batchnorm(disc: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (for world_size > 1, before DDP wrapping). ActNorm is left alone."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(disc)


__all__ = ["ActNorm", "DiscriminatorConfig", "PatchDiscriminator", "build_discriminator", "convert_sync_batchnorm"]
