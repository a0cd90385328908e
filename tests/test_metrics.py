"""PSNR / SSIM / MS-SSIM against independent references (scikit-image, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from latentae.metrics import MS_SSIM_WEIGHTS, ms_ssim, ms_ssim_min_size, psnr, ssim


def _pair(n=3, h=40, w=52, noise=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Smooth-ish "images" (so SSIM is far from 0 and 1) plus noise, inside [-1, 1].
    base = torch.nn.functional.interpolate(torch.rand(n, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    a = (base * 2 - 1).clamp(-1, 1)
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    return a.to(dtype), b.to(dtype)


def _np(x: torch.Tensor, i: int) -> np.ndarray:
    return x[i].double().numpy()  # [C, H, W]


def test_psnr_matches_skimage():
    a, b = _pair()
    got = psnr(a, b)
    assert got.shape == (3,)
    for i in range(3):
        want = peak_signal_noise_ratio(_np(a, i), _np(b, i), data_range=2.0)
        assert got[i].item() == pytest.approx(want, abs=1e-9)


def test_psnr_identical_is_inf_and_known_value():
    a, _ = _pair(n=1)
    assert math.isinf(psnr(a, a).item())
    # A constant error of 0.02 on range 2: 10*log10(4 / 4e-4) = 40 dB exactly.
    assert psnr(a, a + 0.02).item() == pytest.approx(40.0, abs=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_ssim_matches_skimage(dtype, tol):
    a, b = _pair(dtype=dtype)
    got = ssim(a, b)
    assert got.dtype == dtype and got.shape == (3,)
    for i in range(3):
        want = structural_similarity(
            _np(a, i), _np(b, i), data_range=2.0, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, channel_axis=0,
        )
        assert got[i].item() == pytest.approx(want, abs=tol)
    assert 0.05 < got.min().item() < got.max().item() < 0.99  # a non-trivial range was tested


def test_ssim_identical_is_one_and_degrades_with_noise():
    a, _ = _pair(n=1)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    values = [ssim(a, (a + s * torch.randn_like(a)).clamp(-1, 1)).item() for s in (0.02, 0.1, 0.4)]
    assert values[0] > values[1] > values[2]


def test_ssim_half_precision_input_computed_in_float32():
    a, b = _pair(dtype=torch.float32)
    got = ssim(a.half(), b.half())
    assert got.dtype == torch.float32
    assert torch.allclose(got, ssim(a.half().float(), b.half().float()))


def test_metrics_reject_bad_shapes():
    a, b = _pair(n=1)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, b[..., :-1])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        psnr(a[0], b[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[..., :10, :10], b[..., :10, :10])
    with pytest.raises(ValueError, match="at least 176x176"):
        ms_ssim(a, b)


def test_ssim_is_differentiable():
    a, b = _pair(n=2, dtype=torch.float32)
    b.requires_grad_(True)
    (1 - ssim(a, b)).mean().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


# ---------------------------------------------------------------- MS-SSIM


def _reference_ms_ssim(x: np.ndarray, y: np.ndarray, weights=MS_SSIM_WEIGHTS) -> float:
    """Direct MS-SSIM on [C, H, W] float64 arrays, built from scipy's Gaussian filter with
    skimage's conventions (reflect mode, 5-pixel border crop), numpy 2x2 averaging."""
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    terms = []
    for j in range(len(weights)):
        f = lambda z: np.stack([gaussian_filter(ch, 1.5, truncate=3.5) for ch in z])  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        cs = (2 * cxy + c2) / (vx + vy + c2)
        lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
        crop = (slice(None), slice(5, -5), slice(5, -5))
        terms.append((cs if j < len(weights) - 1 else lum * cs)[crop].mean())
        h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
        x = x[:, :h, :w].reshape(x.shape[0], h // 2, 2, w // 2, 2).mean((2, 4))
        y = y[:, :h, :w].reshape(y.shape[0], h // 2, 2, w // 2, 2).mean((2, 4))
    return float(np.prod([max(t, 0.0) ** wt for t, wt in zip(terms, weights)]))


def test_ms_ssim_matches_direct_multiscale_computation():
    a, b = _pair(n=2, h=181, w=192, noise=0.15)  # odd height exercises the pooling crop
    got = ms_ssim(a, b)
    for i in range(2):
        assert got[i].item() == pytest.approx(_reference_ms_ssim(_np(a, i), _np(b, i)), abs=1e-10)
    # Its last scale term equals skimage's own SSIM at that scale (a cross-check of the helper).
    x = torch.nn.functional.avg_pool2d(a, 2)
    assert ssim(x, torch.nn.functional.avg_pool2d(b, 2))[0].item() == pytest.approx(
        structural_similarity(_np(x, 0), _np(torch.nn.functional.avg_pool2d(b, 2), 0), data_range=2.0,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0),
        abs=1e-10,
    )


def test_ms_ssim_properties():
    a, b = _pair(n=1, h=176, w=176, noise=0.1)
    assert ms_ssim_min_size() == 176
    assert ms_ssim(a, a).item() == pytest.approx(1.0, abs=1e-12)
    assert sum(MS_SSIM_WEIGHTS) == pytest.approx(1.0, abs=1e-3)
    # One scale with weight 1 is plain SSIM.
    assert ms_ssim(a, b, weights=(1.0,)).item() == pytest.approx(ssim(a, b).item(), abs=1e-12)
    # Monotone in the noise level.
    vals = [ms_ssim(a, (a + s * torch.randn_like(a)).clamp(-1, 1)).item() for s in (0.02, 0.1, 0.3, 0.6)]
    assert all(x > y for x, y in zip(vals, vals[1:])), vals
    # Symmetric.
    assert ms_ssim(a, b).item() == pytest.approx(ms_ssim(b, a).item(), abs=1e-12)
