"""Validation during training and the final export, always in fp32 outside autocast.

The models evaluated are the plain modules (``parts.vae_raw`` and the EMA copy): no
DDP wrapper, no torch.compile wrapper, no autocast patch, so PSNR/SSIM/LPIPS measure
the weights as a user of the export will run them, whatever ``train.mixed_precision`` is.

Both run on the main process only and return without a barrier: the trainer then waits
with ``Ranks.barrier``, which is where a failure here reaches the other ranks at once.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latentae.io import save_diffusers
from latentae.validation import comparison_grid, measure, reconstruct, save_png

if TYPE_CHECKING:
    from latentae.training.setup import Parts

log = logging.getLogger("latentae.train")


def validate(parts: Parts, *, step: int, output_dir: Path, batch_size: int) -> dict[str, float]:
    """Main process: PSNR/SSIM(/LPIPS) of the VAE (and EMA), grid PNG + TensorBoard image ({} elsewhere).

    The grid (``latentae.validation.comparison_grid``): a row per image, input | reconstruction
    | error map, each at least 256 px wide."""
    acc = parts.acc
    metrics: dict[str, float] = {}
    if acc.is_main_process and parts.val_images is not None:
        models = [("val", parts.vae_raw)] + ([("val_ema", parts.ema.model)] if parts.ema is not None else [])
        images = parts.val_images
        # Explicitly off: validation may be called from code that runs under autocast.
        with torch.autocast(parts.device.type, enabled=False):
            for prefix, model in models:
                recs = reconstruct(model, images, batch_size=batch_size)
                metrics.update({f"{prefix}/{k}": v for k, v in measure(images, recs, parts.loss.perceptual).items()})
                grid = comparison_grid(images, recs)
                save_png(grid, output_dir / "samples" / f"{prefix}-step-{step:09d}.png")
                tracker = acc.get_tracker("tensorboard")
                tracker.log_images({f"{prefix}/input_vs_reconstruction": grid[None].numpy()}, step)
        acc.log(metrics, step=step)
    return metrics


def export(parts: Parts, *, step: int, output_dir: Path, use_ema: bool) -> Path | None:
    """Main process: final diffusers folder OUTPUT/export (EMA weights when ``use_ema`` and EMA is on)."""
    path = None
    if parts.acc.is_main_process:
        use_ema = use_ema and parts.ema is not None
        model = parts.ema.model if use_ema else parts.vae_raw
        final, tmp = output_dir / "export", output_dir / ".export.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_diffusers(model, tmp)
        (tmp / "latentae.json").write_text(f'{{"step": {step}, "ema": {str(use_ema).lower()}}}\n')
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        path = final
        log.info("exported %s weights to %s", "EMA" if use_ema else "final", final)
    return path


__all__ = ["export", "validate"]
