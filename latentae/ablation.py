"""Fine-tune one VAE several ways for the same budget and compare them on held-out images.

The evidence behind the diffusability regularisers (``tools/diffusability_finetune.py``
is the command line): from one starting VAE, every *arm* trains the same number of steps
on the same images with the same seed, differing only in its loss overrides; then
``latentae.compare`` measures every result and the start on images none of them saw:
reconstruction PSNR next to the latent high-frequency share and the equivariance PSNR
(``latentae.diffusability``), with paired per-image differences to the first arm.

    images = split_images(Path("photos"), out, holdout=8, shorter_side=256)
    start = train_start(images.train_dir, out / "start", steps=600)     # or any VAE path
    vaes = {a: finetune(start, a, images.train_dir, out / a, steps=300) for a in ("base", "se")}
    summary = compare_vaes({"start": start, **vaes}, images.eval_files, out / "compare", size=256)
    print(format_summary(summary))

Everything runs through the real trainer (``latentae.training.loop.train``) and the real
comparison, offline (random LPIPS backbone, no rFID), on CPU in minutes with the tiny
f8c16 config: the sizes and step counts are the caller's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from latentae.data.folder import spread
from latentae.sources import list_images

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny-f8c16.yaml"

# What each arm adds to the common fine-tuning config.
ARMS: dict[str, tuple[str, ...]] = {
    "base": (),  # the same fine-tune without a regulariser: the control
    "se": ("loss.scale_equivariance_weight={se_weight}", "loss.scale_equivariance_scales=[2, 4]"),
    "eqvae": ("loss.eq_vae_prob=0.5", "loss.eq_vae_low_res_prob=0.25"),
    "noise": ("loss.latent_noise=0.3", "loss.latent_noise_prob=0.5"),
}

# Offline and lean: random LPIPS AlexNet (the torchvision weights are not downloaded; the
# term then means little, as in the demo), no GAN (a fresh discriminator in a short run adds
# noise, not signal), no validation passes (the comparison measures afterwards), and random
# 64 px crops of the photos at their stored size (shorter side ``shorter_side``), as the demo.
COMMON = (
    "loss.lpips_pretrained=false", "loss.lpips_net=alex", "loss.disc_weight=0", "data.resize_shorter=false",
    "data.num_val=0", "train.num_val_images=0", "train.val_every=0", "train.log_every=25",
)  # fmt: skip


@dataclass(frozen=True)
class Split:
    train_dir: Path  # the training images, stored at the working size
    eval_files: list[Path]  # held out: never trained on by any arm or the start


def split_images(src: Path, out: Path, *, holdout: int, shorter_side: int = 256) -> Split:
    """Hold out ``holdout`` images of ``src`` spread over its sorted list; write the rest,
    resized to ``shorter_side`` (LANCZOS, never upscaled), as PNGs into ``out/train-images``."""
    from PIL import Image

    from latentae.imageio import decode_image

    files = list_images(src)
    if len(files) < holdout + 2:
        raise ValueError(f"{src} has {len(files)} images: need at least {holdout + 2} (holdout {holdout} + 2 to train on)")
    held = set(spread(len(files), holdout))
    train_dir = out / "train-images"
    train_dir.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        dest = train_dir / f"{f.stem}.png"
        if i in held or dest.exists():
            continue
        img = decode_image(f, str(f))
        s = shorter_side / min(img.size)
        if s < 1:
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.LANCZOS)
        img.save(dest)
    return Split(train_dir, [files[i] for i in sorted(held)])


def _run(config: Path, out: Path, overrides: Sequence[str]) -> Path:
    from latentae.recipe import load_config
    from latentae.training.loop import train

    cfg = load_config(config, list(overrides))
    result = train(cfg, out, resume="latest")  # an interrupted run continues; a finished one returns at once
    if result.export_dir is None:
        raise RuntimeError(f"training into {out} stopped early ({result.stopped}); run the command again to continue")
    return result.export_dir


def train_start(train_dir: Path, out: Path, *, steps: int, config: Path = DEFAULT_CONFIG, seed: int = 0,
                extra: Sequence[str] = ()) -> Path:  # fmt: skip
    """A starting VAE trained from scratch with the demo's recipe (``tools/demo.py``: lr 1e-3)."""
    overrides = [*COMMON, f"data.path={train_dir}", f"train.max_steps={steps}", "train.lr=1.0e-3",
                 f"train.checkpoint_every={max(steps // 2, 1)}", f"train.seed={seed}", *extra]  # fmt: skip
    return _run(config, out, overrides)


def arm_overrides(arm: str, *, se_weight: float = 0.5) -> list[str]:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}: choose from {', '.join(ARMS)}")
    return [o.format(se_weight=se_weight) for o in ARMS[arm]]


def finetune(start: Path | str, arm: str, train_dir: Path, out: Path, *, steps: int, config: Path = DEFAULT_CONFIG,
             seed: int = 1, se_weight: float = 0.5, extra: Sequence[str] = ()) -> Path:  # fmt: skip
    """Fine-tune ``start`` (encoder and decoder) as ``arm`` for ``steps``; returns its export (EMA weights)."""
    overrides = [*COMMON, f"data.path={train_dir}", f"train.init_from={start}", f"train.max_steps={steps}",
                 f"train.checkpoint_every={max(steps // 2, 1)}", f"train.seed={seed}", "train.finetune=full",
                 *arm_overrides(arm, se_weight=se_weight), *extra]  # fmt: skip
    return _run(config, out, overrides)


def compare_vaes(vaes: dict[str, Path | str], eval_files: Sequence[Path], out: Path, *, size: int = 256,
                 seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """``latentae.compare`` of ``vaes`` (the first is the baseline of the paired differences)
    on ``eval_files``, resized to ``size`` on the shorter side and centre-cropped; offline."""
    from latentae.compare import CompareConfig, run_compare
    from latentae.imageio import decode_image

    images = [(f.name, decode_image(f, str(f))) for f in eval_files]
    cfg = CompareConfig(size=size, lpips="off", fid="off", seed=seed)
    return run_compare(list(vaes.items()), images, out, cfg)


# Columns of the side-by-side table: (metric key, header).
COLUMNS = (
    ("psnr", "rec PSNR"), ("hf_share", "latent HF"), ("hf_share_image", "image HF"),
    ("eq_down2_psnr", "eq 1/2"), ("eq_down4_psnr", "eq 1/4"), ("eq_rot90_psnr", "eq rot90"),
)  # fmt: skip


def format_summary(summary: dict[str, Any]) -> str:
    """The compare summary as one table: means (95% interval half-width) per VAE, then the
    paired per-image differences to the baseline (the first VAE)."""
    agg, paired = summary["aggregate"], summary["paired_vs_baseline"]
    base = paired["baseline"]
    names = [v["name"] for v in summary["vaes"]]
    width = max(len(n) for n in names + [f"{names[-1]} - {base}"]) + 2
    lines = [f"{summary['images_used']} held-out images; mean (+- 95% CI half-width); PSNR in dB, HF = share of "
             "energy >= half Nyquist (lower = smoother latents)", ""]  # fmt: skip
    lines.append("".ljust(width) + "".join(h.rjust(16) for _, h in COLUMNS))

    def cell(stats: dict[str, Any] | None, digits: int) -> str:
        if not stats or stats.get("mean") is None:
            return "n/a".rjust(16)
        lo, hi = stats.get("ci95", [None, None])
        half = "" if lo is None else f" +-{(hi - lo) / 2:.{digits}f}"
        return f"{stats['mean']:.{digits}f}{half}".rjust(16)

    for n in names:
        lines.append(n.ljust(width) + "".join(cell(agg[n].get(k), 3 if "hf" in k else 2) for k, _ in COLUMNS))
    lines.append("")
    for n in names[1:]:
        diffs = paired.get(n, {})
        lines.append(f"{n} - {base}".ljust(width) + "".join(cell(diffs.get(k), 3 if "hf" in k else 2) for k, _ in COLUMNS))
    return "\n".join(lines)


__all__ = ["ARMS", "COLUMNS", "Split", "arm_overrides", "compare_vaes", "finetune", "format_summary", "split_images",
           "train_start"]  # fmt: skip
