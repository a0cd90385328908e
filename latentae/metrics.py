"""Reconstruction metrics on image batches: PSNR, SSIM, MS-SSIM (per image, differentiable).

Convention everywhere: images are ``[N, 3, H, W]`` tensors in ``[-1, 1]`` (the VAE's
range), so the *data range* is 2. Every function returns one value per image, ``[N]``,
float32 (float64 stays float64), on the input's device. Clamp reconstructions to
``[-1, 1]`` before measuring if you want the numbers of the image a user would save.

The definitions follow scikit-image exactly, and the tests check it pixel for pixel:

* ``psnr``  = ``skimage.metrics.peak_signal_noise_ratio(a, b, data_range=2)`` (MSE over
  all channels and pixels of one image; identical images give ``+inf``, as skimage).
* ``ssim``  = ``skimage.metrics.structural_similarity(a, b, data_range=2,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0)``:
  Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma),
  K1=0.01, K2=0.03, averaged over the *valid* window positions (skimage crops the
  5-pixel border; a valid convolution gives the same numbers without padding) and
  over the channels.
* ``ms_ssim`` = Wang, Simoncelli & Bovik 2003: contrast-structure terms at scales
  1..M-1 and the full SSIM at scale M, each scale a 2x2 average-pool of the previous,
  combined as ``prod(cs_j ** w_j) * ssim_M ** w_M`` with the paper's 5 weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGE = 2.0  # images in [-1, 1]
K1, K2 = 0.01, 0.03
SIGMA = 1.5
TRUNCATE = 3.5  # scipy.ndimage.gaussian_filter's truncation, as skimage uses it
WIN_RADIUS = int(TRUNCATE * SIGMA + 0.5)  # 5
WIN_SIZE = 2 * WIN_RADIUS + 1  # 11
# Wang et al. 2003, Table/eq. (from their human-judgement calibration), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"{name}: expected image batches [N, C, H, W], got shape {tuple(a.shape)}")
    # Half precision loses the small variances SSIM divides by; compute in >= float32.
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(dtype), b.to(dtype)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: ``[N, C, H, W]`` x2 -> ``[N]``."""
    a, b = _check_pair(a, b, "psnr")
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf, as skimage


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-WIN_RADIUS, WIN_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SIGMA) ** 2)
    return (g / g.sum()).to(dtype=dtype, device=device)  # [11], sums to 1


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, valid positions only: [M, 1, H, W] -> [M, 1, H-10, W-10]."""
    x = F.conv2d(x, win.view(1, 1, -1, 1))
    return F.conv2d(x, win.view(1, 1, 1, -1))


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, data_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: mean SSIM and mean contrast-structure term over valid windows and channels."""
    n, c, h, w = a.shape
    if h < WIN_SIZE or w < WIN_SIZE:
        raise ValueError(f"SSIM needs images of at least {WIN_SIZE}x{WIN_SIZE} pixels (its Gaussian window), got {h}x{w}")
    win = _gaussian_window(a.dtype, a.device)
    # All five local moments in one filter call: [5 * N * C, 1, H, W].
    x = torch.cat([a, b, a * a, b * b, a * b]).reshape(5 * n * c, 1, h, w)
    mu_a, mu_b, aa, bb, ab = _blur(x, win).reshape(5, n, c, h - 2 * WIN_RADIUS, w - 2 * WIN_RADIUS)
    # Population (not sample) covariance: use_sample_covariance=False.
    var_a, var_b, cov = aa - mu_a * mu_a, bb - mu_b * mu_b, ab - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a * mu_a + mu_b * mu_b + c1)
    return (lum * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Structural similarity per image (skimage's Gaussian-window SSIM): -> ``[N]``, 1 = identical.

    Needs H, W >= 11. Differentiable, so ``1 - ssim`` can be a loss.
    """
    a, b = _check_pair(a, b, "ssim")
    return _ssim_terms(a, b, data_range)[0]


def ms_ssim_min_size(scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """Smallest image side MS-SSIM accepts: the coarsest scale must still hold one 11x11 window."""
    return WIN_SIZE * 2 ** (scales - 1)  # 176 for 5 scales


def ms_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = DATA_RANGE,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> torch.Tensor:
    """Multi-scale SSIM per image -> ``[N]``. Needs min(H, W) >= ``ms_ssim_min_size(len(weights))``.

    Negative contrast-structure terms (anti-correlated structure, only seen on very bad
    reconstructions) are clamped to 0 before the fractional powers, which would
    otherwise be NaN; the result is then 0 for that image, the worst score.
    """
    a, b = _check_pair(a, b, "ms_ssim")
    if not weights or any(w < 0 for w in weights):
        raise ValueError(f"ms_ssim: weights must be a non-empty tuple of non-negative numbers, got {weights}")
    need = ms_ssim_min_size(len(weights))
    if min(a.shape[-2:]) < need:
        raise ValueError(
            f"MS-SSIM with {len(weights)} scales needs images of at least {need}x{need} pixels "
            f"(11-pixel window at 1/{2 ** (len(weights) - 1)} scale), got {a.shape[-2]}x{a.shape[-1]}"
        )
    w = torch.tensor(weights, dtype=a.dtype, device=a.device)
    values = []
    for j in range(len(weights)):
        s, cs = _ssim_terms(a, b, data_range)
        values.append(cs if j < len(weights) - 1 else s)
        if j < len(weights) - 1:
            # 2x2 averaging, odd sizes lose their last row/column (as the reference MATLAB code).
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    v = torch.stack(values, 1).clamp_min(0.0)  # [N, scales]
    return torch.prod(v ** w, dim=1)


def mse_to_psnr(mse: float, data_range: float = DATA_RANGE) -> float:
    """PSNR of a given mean squared error (for averaging MSE first, then converting)."""
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


__all__ = ["psnr", "ssim", "ms_ssim", "ms_ssim_min_size", "mse_to_psnr", "MS_SSIM_WEIGHTS", "DATA_RANGE"]
