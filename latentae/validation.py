"""Validation during training: reconstruct held-out images, measure, draw a comparison grid.

Reconstructions use the posterior mode (no sampling noise), in fp32 and
clamped to [-1, 1], i.e. the image a user of the exported VAE would get, so the
numbers are comparable across steps and runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from latentae.metrics import psnr, ssim
from latentae.model import AutoencoderKL


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """images [N, 3, H, W] in [-1, 1] -> reconstructions [N, 3, H, W], clamped, on images' device."""
    was_training = vae.training
    vae.eval()
    try:
        device = next(vae.parameters()).device
        outs = []
        for chunk in images.split(batch_size):
            rec, _ = vae(chunk.to(device, torch.float32), sample_posterior=False)
            outs.append(rec.float().clamp(-1.0, 1.0).to(images.device))
        return torch.cat(outs)
    finally:
        vae.train(was_training)


@torch.no_grad()
def measure(images: torch.Tensor, recs: torch.Tensor, perceptual: nn.Module | None = None) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and, when a perceptual net is given, LPIPS over the batch."""
    out = {"psnr": psnr(images, recs).mean().item(), "ssim": ssim(images, recs).mean().item()}
    if perceptual is not None:
        device = next(perceptual.parameters()).device
        out["lpips"] = perceptual(images.to(device), recs.to(device)).mean().item()
    return out


def comparison_grid(images: torch.Tensor, recs: torch.Tensor, max_rows: int = 8) -> torch.Tensor:
    """One row per image: input | reconstruction. -> [3, rows*H, 2*W] in [0, 1] (CPU, float)."""
    n = min(len(images), max_rows)
    rows = torch.cat([images[:n], recs[:n]], dim=-1)  # [n, 3, H, 2W]
    grid = torch.cat(list(rows), dim=-2)  # [3, n*H, 2W]
    return ((grid.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """[3, H, W] in [0, 1] -> 8-bit RGB PNG (written to a temp name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)
    return path


__all__ = ["comparison_grid", "measure", "reconstruct", "save_png"]
