"""What ``latentae.compare`` measures and how it summarises it over images.

The metric definitions (``MetricSpec``: key, label, direction, the table group), the
backbones that need weights (LPIPS, Inception: pretrained, random or skipped with a
notice), the latent rate, and the statistics over images: a mean with its 95%
Student-t interval, per VAE and for the paired per-image difference to the baseline.
The per-image loop and the outputs live in ``latentae.compare``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from latentae.fid import build_inception
from latentae.metrics import ms_ssim_min_size
from latentae.perceptual import MissingWeightsError, build_lpips

BackboneMode = Literal["auto", "pretrained", "random", "off"]


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    higher_is_better: bool
    digits: int
    help: str = ""
    rank: bool = True  # a quality metric: the report highlights the best VAE (not for the rate)
    group: str = "reconstruction"  # or "diffusability": its own table in the terminal and the report


def pixel_metrics() -> list[MetricSpec]:
    """PSNR, SSIM, MS-SSIM (``latentae.metrics``)."""
    return [
        MetricSpec("psnr", "PSNR dB", True, 2),
        MetricSpec("ssim", "SSIM", True, 4, "Gaussian 11x11, sigma 1.5 (skimage)"),
        MetricSpec("ms_ssim", "MS-SSIM", True, 4, f"5 scales; needs >= {ms_ssim_min_size()} px"),
    ]


DIFFUSABILITY_NOTE = (
    "HF share: share of the latent's energy (posterior samples, DC removed, channels pooled) at or above half the "
    "latent Nyquist frequency; the image figure is the same for the image area-downsampled to the latent size. "
    "Lower = smoother latents, easier for a diffusion model (Skorokhodov et al. 2025). Equivariance PSNR: "
    "decode(T(z)) vs T(x) for area downsampling by 2 / 4 and a 90-degree rotation; it includes the reconstruction "
    "error, so read it next to the reconstruction PSNR (a perfectly equivariant VAE scores the same). Higher = "
    "easier latents (Skorokhodov et al. 2025; EQ-VAE, Kouzelis et al. 2025)."
)


def diffusability_metrics(scales: Sequence[int] = (2, 4), rotation: bool = True) -> list[MetricSpec]:
    """The per-image diffusability figures (``latentae.diffusability``) as table metrics."""
    g = "diffusability"
    out = [
        MetricSpec("hf_share", "latent HF share", False, 3, "share of latent energy >= half Nyquist (DCT, DC removed)", group=g),
        MetricSpec("hf_share_image", "image HF share", False, 3, "the same for the image at the latent size: the reference", rank=False, group=g),
    ]
    for s in scales:
        out.append(MetricSpec(f"eq_down{s}_psnr", f"eq-PSNR 1/{s} dB", True, 2, f"PSNR of decode(down{s}(z)) vs down{s}(x), area downsampling", group=g))
    if rotation:
        out.append(MetricSpec("eq_rot90_psnr", "eq-PSNR rot90 dB", True, 2, "PSNR of decode(rot90(z)) vs rot90(x)", group=g))
    return out


def t_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and Student-t confidence interval of the mean (n-1 degrees of freedom).

    Non-finite values (PSNR of a pixel-exact image is +inf) are left out and counted.
    """
    from scipy.stats import t as student_t  # scipy comes with scikit-image

    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    finite = v[np.isfinite(v)]
    n = int(finite.size)
    out: dict[str, Any] = {"n": n, "non_finite": int(v.size - n), "mean": None, "std": None, "ci95": [None, None]}
    if n == 0:
        return out
    mean = float(finite.mean())
    out["mean"] = mean
    if n >= 2:
        sd = float(finite.std(ddof=1))
        half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
        out.update(std=sd, ci95=[mean - half, mean + half])
    return out


def latent_bpp(latent_shape: Sequence[int], height: int, width: int, bits: int) -> float:
    """Rate of the stored latents: elements x bits / pixels (f8c4 at 16 bits = 1 bpp)."""
    return math.prod(latent_shape) * bits / (height * width)



def aggregate_rows(rows: Sequence[dict[str, Any]], names: Sequence[str], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{vae: {key: t_interval(values over its images)}}`` from per-(image, VAE) rows."""
    return {n: {k: t_interval([r.get(k) for r in rows if r["vae"] == n]) for k in keys} for n in names}


def paired_vs_baseline(rows: Sequence[dict[str, Any]], names: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """Per-image differences ``VAE - names[0]`` on the images both measured, as intervals:
    ``{"baseline": names[0], vae: {key: t_interval(differences)}}``."""
    base = names[0]
    by_vae_image = {(r["vae"], r["image"]): r for r in rows}
    out: dict[str, Any] = {"baseline": base}
    for n in names[1:]:
        out[n] = {}
        mine = [r for r in rows if r["vae"] == n]
        for k in keys:
            d = []
            for r in mine:
                b = by_vae_image.get((base, r["image"]))
                if b is not None and r.get(k) is not None and b.get(k) is not None:
                    d.append(r[k] - b[k])
            out[n][k] = t_interval(d)
    return out


# ----------------------------------------------------------------------------- backbones


def setup_lpips(mode: BackboneMode, device: torch.device, notices: list[str]) -> tuple[dict[str, torch.nn.Module], list[MetricSpec]]:
    """LPIPS-VGG and -AlexNet per ``mode``: ``({key: net}, their MetricSpecs)``; what was
    skipped or randomised is appended to ``notices``."""
    nets, specs = {}, []
    if mode == "off":
        notices.append("LPIPS not computed (--lpips off).")
        return nets, specs
    for net in ("vgg", "alex"):
        if mode == "random":
            lp, key = build_lpips(net, pretrained=False), f"lpips_{net}_random"
            specs.append(MetricSpec(key, f"LPIPS-{net} RANDOM", False, 4, "random backbone: not a perceptual metric"))
        else:
            try:
                lp, key = build_lpips(net, pretrained=True), f"lpips_{net}"
            except MissingWeightsError as e:
                if mode == "pretrained":
                    raise
                notices.append(f"LPIPS-{net} skipped: pretrained backbone not on disk. {e}".replace(
                    "Offline alternative for tests/demos only: set loss.lpips_pretrained=false",
                    "For tests/demos only: --lpips random",
                ))
                continue
            specs.append(MetricSpec(key, f"LPIPS-{net}", False, 4))
        nets[key] = lp.to(device)
    if mode == "random":
        notices.append(
            "LPIPS computed with RANDOM backbones (--lpips random / --offline): the lpips_*_random columns "
            "are not a perceptual metric; use them to exercise the pipeline only."
        )
    return nets, specs


def setup_fid(mode: BackboneMode, device: torch.device, notices: list[str]) -> tuple[torch.nn.Module | None, str | None, str | None]:
    """The Inception network for rFID per ``mode``: ``(net or None, metric key, label)``."""
    if mode == "off":
        notices.append("rFID not computed (--fid off).")
        return None, None, None
    try:
        net = build_inception(pretrained=mode != "random")
    except MissingWeightsError as e:
        if mode == "pretrained":
            raise
        notices.append(f"rFID skipped: {e}")
        return None, None, None
    if not net.pretrained:
        notices.append("rFID computed with a RANDOM Inception (--fid random / --offline): not a metric.")
    return net.to(device), ("rfid" if net.pretrained else "rfid_random"), ("rFID" if net.pretrained else "rFID RANDOM")


__all__ = [
    "DIFFUSABILITY_NOTE", "BackboneMode", "MetricSpec", "aggregate_rows", "diffusability_metrics", "latent_bpp",
    "paired_vs_baseline", "pixel_metrics", "setup_fid", "setup_lpips", "t_interval",
]
