"""Validation during training: reconstruct held-out images, measure, draw a comparison grid
(input | reconstruction | error map, at least 256 px per image).

Reconstructions use the posterior mode (no sampling noise), in fp32 and
clamped to [-1, 1], i.e. the image a user of the exported VAE would get, so the
numbers are comparable across steps and runs.
"""

from __future__ import annotations

import math
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


# Grids show every image at least this many pixels wide: a 64 px validation crop is
# enlarged 4x (nearest neighbour: each pixel the VAE produced stays a visible square,
# nothing is smoothed away), so a reconstruction can be judged by eye.
GRID_TILE = 256
# The error map's fixed colour scale: black = exact, pale yellow = a mean absolute error
# of at least this fraction of the pixel range. Fixed, so grids of different steps and
# runs are comparable (an SD-class VAE at ~26 dB shows dark purple with red edges).
ERROR_VMAX = 0.2


def error_map(images: torch.Tensor, recs: torch.Tensor, vmax: float = ERROR_VMAX) -> torch.Tensor:
    """[N, 3, H, W] pairs in [-1, 1] -> colour-mapped |error| [N, 3, H, W] in [-1, 1]: the mean
    over channels of |input - reconstruction| as a fraction of the range (0..1), on ``heatmap``'s
    black -> purple -> red -> orange -> pale yellow scale, saturating at ``vmax``."""
    from latentae.report import heatmap

    err = ((images.float() - recs.float()).abs().mean(1) / 2.0).cpu().numpy()  # [N, H, W] in [0, 1]
    rgb = np.stack([heatmap(e, vmax) for e in err])  # [N, H, W, 3] uint8
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def comparison_grid(images: torch.Tensor, recs: torch.Tensor, max_rows: int = 8, min_tile: int = GRID_TILE,
                    vmax: float = ERROR_VMAX) -> torch.Tensor:
    """One row per image: input | reconstruction | error map (``error_map``), each enlarged by
    the smallest integer factor that makes it at least ``min_tile`` px on its shorter side
    (nearest neighbour; never shrunk). -> [3, rows*k*H, 3*k*W] in [0, 1] (CPU, float)."""
    n = min(len(images), max_rows)
    x, r = images[:n].float().cpu(), recs[:n].float().cpu()
    rows = torch.cat([x, r, error_map(x, r, vmax)], dim=-1)  # [n, 3, H, 3W]
    k = max(1, math.ceil(min_tile / min(x.shape[-2:])))
    rows = rows.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)  # [n, 3, kH, 3kW]
    grid = torch.cat(list(rows), dim=-2)  # [3, n*kH, 3kW]
    return ((grid + 1.0) / 2.0).clamp(0.0, 1.0)


def save_png(grid: torch.Tensor, path: str | Path) -> Path:
    """[3, H, W] in [0, 1] -> 8-bit RGB PNG (written to a temp name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)
    return path


__all__ = ["ERROR_VMAX", "GRID_TILE", "comparison_grid", "error_map", "measure", "reconstruct", "save_png"]
