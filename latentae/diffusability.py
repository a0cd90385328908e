"""Diffusability figures of a latent space: its power spectrum and the decoder's equivariance.

A VAE is judged twice: by how well it reconstructs and by how easily a diffusion model
learns its latents. Two cheap proxies for the second, from the 2025 literature:

* **Spectrum** (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders",
  arXiv 2502.14831): natural images have a steeply falling power spectrum, which suits the
  coarse-to-fine order in which diffusion models generate. Latents of common VAEs are
  flatter (more high-frequency energy), the more so the more channels they have.
  ``high_frequency_share`` is the share of a latent's energy at or above half its Nyquist
  frequency; the same figure for the image downsampled to the latent size is the reference.
* **Equivariance** (the same paper's scale equivariance; EQ-VAE, Kouzelis et al. 2025,
  arXiv 2502.09509, adds rotations): a latent space in which downsampling or rotating the
  latent downsamples or rotates the decoded image is simpler to model.
  ``equivariance_psnr`` is the PSNR of ``decode(T(z))`` against ``T(x)``.

Everything here is a plain tensor function; the training losses use the very same
operators (``downsample``, ``rotate90``, ``scale_pair``, ``resize_pair``, ``rotation_pair``)
so that what is trained for is what is measured.

Conventions and the reasons for them:

* **Resampling: area (block mean) for latents and images alike.** ``downsample(t, f)``
  averages each f x f block. It is linear, so it commutes with the latent normalisation
  ``(z - shift) * scale`` (the figures do not depend on the factors), it is antialiased
  (a box filter: no aliasing of the content it removes from the image), and for f = 2 it
  equals the bilinear ``F.interpolate(scale_factor=0.5)`` the scale-equivariance paper
  uses; for f = 4 plain bilinear would read only 2 of every 4 pixels per axis (aliasing),
  area still reads all. Sizes that are not a multiple of f are cropped on the
  bottom/right to the largest multiple first (never padded: padding would invent content
  the target then demands). ``resize_area`` / ``resize_pair`` are the same block mean for
  non-integer scales (EQ-VAE's random scales); there the windows (floor/ceil of the
  fractional edges) of latent and image can differ by up to one pixel.
* **Latent / image alignment.** A VAE reflect-pads images whose side is not a multiple of
  its factor F; the last latent row/column then partly describes padding. The pairs
  (``scale_pair``, ``rotation_pair``, ``image_at_latent_size``) keep only the latent
  pixels whose F x F image block lies inside the image, and the image pixels under them.
* **Spectrum: orthonormal 2-D DCT-II, no window.** The DCT treats the signal as mirrored
  at its edges, so unlike the FFT it sees no jump where the right edge wraps onto the
  left: there is no edge leakage to hide with a window, and a window would throw away
  much of a 32 x 32 latent (a Hann window keeps ~14% of the energy weight). It is also
  the transform of the scale-equivariance paper. Coefficient (ky, kx) of an h x w signal
  has the frequency ``r = sqrt((ky/h)^2 + (kx/w)^2)`` in units of the Nyquist frequency
  (0 .. sqrt(2); r >= 1 only in the diagonal corners).
* **DC removed per channel** (the coefficient (0, 0) is exactly the channel mean): a
  channel's mean is an offset the normalisation ``shift_factor`` removes, not structure;
  left in, it would dominate the energy and make the share depend on the offset.
* **Channels pooled by energy**: the power of all channels is summed before normalising.
  A diffusion model's loss weighs every latent element alike after one global scaling
  (SD, SDXL, SD3, FLUX), so a loud channel matters more than a quiet one, as here. The
  per-channel shares are available too (``high_frequency_share(per_channel=True)``).
* **Normalised** to unit mean power per (non-DC) coefficient: a flat spectrum (white
  noise) is 1 at every frequency, whatever the number of channels or the latent's scale,
  so curves of 4- and 16-channel VAEs, and of images, share one axis.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from latentae.metrics import psnr

HALF_NYQUIST = 0.5  # the cutoff of high_frequency_share, in units of the Nyquist frequency
BINS_PER_NYQUIST = 16  # radial bins of width 1/16 Nyquist; 0.5 is a bin edge


# ----------------------------------------------------------------------------- resampling


def crop_to_multiple(t: torch.Tensor, m: int) -> torch.Tensor:
    """Crop ``[..., H, W]`` on the bottom/right to the largest multiple of ``m`` per side."""
    h, w = t.shape[-2:]
    if h < m or w < m:
        raise ValueError(f"cannot crop a {h}x{w} tensor to a multiple of {m}: it is smaller than {m}")
    return t[..., : h - h % m, : w - w % m]


def downsample(t: torch.Tensor, factor: int) -> torch.Tensor:
    """Area downsampling of ``[N, C, H, W]`` by an integer ``factor``: the mean of each
    ``factor x factor`` block (after ``crop_to_multiple``). Latents and images alike."""
    if factor < 1 or int(factor) != factor:
        raise ValueError(f"downsample factor must be a positive integer, got {factor}")
    if factor == 1:
        return t
    return F.avg_pool2d(crop_to_multiple(t, factor), factor)


def resize_area(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area resampling of ``[N, C, H, W]`` to ``size`` (h, w) <= (H, W), for non-integer
    scales (each output pixel is the mean of the input pixels its window covers)."""
    h, w = t.shape[-2:]
    if size[0] > h or size[1] > w or min(size) < 1:
        raise ValueError(f"resize_area only shrinks: {h}x{w} -> {size[0]}x{size[1]}")
    return F.adaptive_avg_pool2d(t, size)


def rotate90(t: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Rotate ``[..., H, W]`` by ``k`` x 90 degrees counter-clockwise (``torch.rot90``)."""
    return torch.rot90(t, k, dims=(-2, -1))


def covered_size(image_size: tuple[int, int], vae_factor: int) -> tuple[int, int]:
    """(h, w): the latent pixels whose ``vae_factor``-block lies inside an image of ``image_size``
    (a VAE reflect-pads images whose sides are not multiples of it)."""
    h, w = image_size[0] // vae_factor, image_size[1] // vae_factor
    if h < 1 or w < 1:
        raise ValueError(f"image {tuple(image_size)} is smaller than one {vae_factor}x{vae_factor} latent pixel")
    return h, w


def covered(z: torch.Tensor, x: torch.Tensor, vae_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ``[N, C, h, w]`` and images ``[N, 3, H, W]`` cut to the part where they
    describe each other: the latent pixels of :func:`covered_size`, and their blocks."""
    h, w = covered_size(tuple(x.shape[-2:]), vae_factor)
    if z.shape[-2] < h or z.shape[-1] < w:
        raise ValueError(
            f"latents {tuple(z.shape[-2:])} are smaller than image {tuple(x.shape[-2:])} / factor {vae_factor}"
        )
    return z[..., :h, :w], x[..., : h * vae_factor, : w * vae_factor]


def scale_pair(z: torch.Tensor, x: torch.Tensor, factor: int, vae_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale-equivariance pair: ``(downsample(z, factor), downsample(x, factor))`` on
    the covered part, cropped so that both stay aligned (the image's side is always
    ``vae_factor`` x the latent's). ``decode`` of the first should give the second."""
    z, x = covered(z, x, vae_factor)
    z = crop_to_multiple(z, factor)
    x = x[..., : z.shape[-2] * vae_factor, : z.shape[-1] * vae_factor]
    return downsample(z, factor), downsample(x, factor)


def resize_pair(z: torch.Tensor, x: torch.Tensor, size: tuple[int, int], vae_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair for a non-integer scale (EQ-VAE's random scales): the covered latent
    area-resized to ``size`` (h, w) and the image to ``vae_factor`` x that. Equals
    ``scale_pair`` when the scale is an integer that divides both sides."""
    z, x = covered(z, x, vae_factor)
    return resize_area(z, size), resize_area(x, (size[0] * vae_factor, size[1] * vae_factor))


def rotation_pair(z: torch.Tensor, x: torch.Tensor, k: int, vae_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation-equivariance pair ``(rotate90(z, k), rotate90(x, k))`` on the covered part."""
    z, x = covered(z, x, vae_factor)
    return rotate90(z, k), rotate90(x, k)


def image_at_latent_size(x: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` area-downsampled to the (covered) latent grid: the spectrum
    reference a latent is compared with."""
    return downsample(x, vae_factor)


# ----------------------------------------------------------------------------- equivariance


def equivariance_psnr(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    x: torch.Tensor,
    transform: str,
    vae_factor: int,
) -> torch.Tensor:
    """PSNR (dB, per image ``[N]``) of ``decode(T(z))`` against ``T(x)``.

    ``transform``: ``"down2"`` / ``"down4"`` / ``"downF"`` (``scale_pair``) or ``"rot90"``,
    ``"rot180"``, ``"rot270"`` (``rotation_pair``). ``z`` are the latents of ``x`` (images in
    [-1, 1]); the decoded image is clamped to [-1, 1] like a reconstruction. The transformed
    latent is computed in float32 and decoded in ``z``'s dtype. A perfectly equivariant
    decoder scores its reconstruction PSNR (the figure includes the reconstruction error);
    an exact identity codec scores +inf.
    """
    zt, xt = transform_pair(z.float(), x.float(), transform, vae_factor)
    rec = decode(zt.to(z.dtype)).float()
    if rec.shape != xt.shape:
        raise ValueError(f"{transform}: decoded {tuple(rec.shape)}, expected the target's {tuple(xt.shape)}")
    return psnr(rec.clamp(-1, 1), xt)


def transform_pair(z: torch.Tensor, x: torch.Tensor, transform: str, vae_factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T(z), T(x))`` for a transform named as in ``equivariance_psnr``."""
    if transform.startswith("down") and transform[4:].isdigit():
        return scale_pair(z, x, int(transform[4:]), vae_factor)
    if transform in ("rot90", "rot180", "rot270"):
        return rotation_pair(z, x, int(transform[3:]) // 90, vae_factor)
    raise ValueError(f"unknown transform {transform!r}: expected downN (e.g. down2, down4), rot90, rot180 or rot270")


# ----------------------------------------------------------------------------- spectrum


def dct_matrix(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[n, n]``: ``D @ v`` are the coefficients of ``v``."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * k * (2 * i + 1) / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def dct_power(t: torch.Tensor) -> torch.Tensor:
    """Power (squared orthonormal 2-D DCT-II coefficients) of ``[..., h, w]``, float64, with
    the DC coefficient (the mean) removed. Sums to the variance x h x w (Parseval).

    The mean is subtracted before the transform (not only zeroed after it): a constant
    then has exactly zero power, not rounding noise whose *shares* would be arbitrary.
    Power below 1e-24 of the signal's mean square (rounding level) counts as zero.
    """
    h, w = t.shape[-2:]
    t = t.detach().to(torch.float64)
    scale = t.square().mean((-2, -1), keepdim=True)
    t = t - t.mean((-2, -1), keepdim=True)
    c = dct_matrix(h, device=t.device) @ t @ dct_matrix(w, device=t.device).T
    p = c.square()
    p[..., 0, 0] = 0.0
    return torch.where(p.sum((-2, -1), keepdim=True) > 1e-24 * scale * h * w, p, torch.zeros_like(p))


def radial_frequency(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[h, w]`` frequency of each DCT coefficient in units of the Nyquist frequency."""
    ky = torch.arange(h, dtype=torch.float64, device=device)[:, None] / h
    kx = torch.arange(w, dtype=torch.float64, device=device)[None, :] / w
    return (ky.square() + kx.square()).sqrt()


def radial_bins(h: int, w: int, bins_per_nyquist: int = BINS_PER_NYQUIST, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin index ``[h, w]`` of every coefficient (-1 for DC) and the bin centres ``[B]``
    (units of Nyquist; bin i covers [i, i+1) / bins_per_nyquist, up to sqrt(2))."""
    r = radial_frequency(h, w, device)
    # The epsilon keeps coefficients exactly on an edge (e.g. r = 0.5) in the upper bin.
    idx = torch.floor(r * bins_per_nyquist + 1e-9).long()
    idx[0, 0] = -1
    n = math.ceil(math.sqrt(2) * bins_per_nyquist)
    centres = (torch.arange(n, dtype=torch.float64) + 0.5) / bins_per_nyquist
    return idx, centres


def radial_power_spectrum(t: torch.Tensor, bins_per_nyquist: int = BINS_PER_NYQUIST) -> tuple[torch.Tensor, torch.Tensor]:
    """Radially averaged, normalised power spectrum of ``[N, C, h, w]`` (channels pooled).

    Returns ``(freq [B], power [N, B])``: bin centres in units of the Nyquist frequency,
    and per sample the mean power of the DCT coefficients in each bin divided by the
    mean power of all non-DC coefficients (white noise: 1 everywhere). Bins with no
    coefficient (small latents) are NaN. A sample with zero energy (constant) is all 0.
    """
    if t.ndim != 4:
        raise ValueError(f"expected [N, C, h, w], got {tuple(t.shape)}")
    n, _, h, w = t.shape
    p = dct_power(t).sum(1).reshape(n, -1)  # [N, h*w], channels pooled
    idx, freq = radial_bins(h, w, bins_per_nyquist, t.device)
    idx = idx.flatten()
    keep = idx >= 0
    p, idx = p[:, keep], idx[keep]
    mean = p.mean(1, keepdim=True)
    p = torch.where(mean > 0, p / mean.clamp_min(1e-300), torch.zeros_like(p))
    sums = torch.zeros(n, freq.numel(), dtype=torch.float64, device=t.device).index_add_(1, idx, p)
    count = torch.zeros(freq.numel(), dtype=torch.float64, device=t.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    power = sums / count  # 0/0 -> NaN for empty bins
    return freq, power.cpu()


def high_frequency_share(t: torch.Tensor, cutoff: float = HALF_NYQUIST, per_channel: bool = False) -> torch.Tensor:
    """Share of the (DC-free) energy of ``[N, C, h, w]`` at frequencies >= ``cutoff`` x Nyquist.

    ``[N]`` with channels pooled by energy, or ``[N, C]`` with ``per_channel``. In [0, 1];
    a constant (zero energy) has share 0; white noise has about the share of coefficients
    above the cutoff (1 - pi/16 = 0.80 for 0.5 on a large grid).
    """
    if t.ndim != 4:
        raise ValueError(f"expected [N, C, h, w], got {tuple(t.shape)}")
    h, w = t.shape[-2:]
    p = dct_power(t)  # [N, C, h, w]
    hi = (radial_frequency(h, w, t.device) >= cutoff - 1e-9).to(p.dtype)
    dims = (-2, -1) if per_channel else (1, 2, 3)
    total, high = p.sum(dims), (p * hi).sum(dims)
    return torch.where(total > 0, high / total.clamp_min(1e-300), torch.zeros_like(total)).cpu()


def area_share_above(h: int, w: int, cutoff: float = HALF_NYQUIST) -> float:
    """Share of the non-DC coefficients of an h x w grid at or above ``cutoff``: the
    expected ``high_frequency_share`` of white noise of that size."""
    r = radial_frequency(h, w)
    return ((r >= cutoff - 1e-9).sum().item()) / (h * w - 1)


__all__ = [
    "BINS_PER_NYQUIST", "HALF_NYQUIST", "area_share_above", "covered", "covered_size", "crop_to_multiple", "dct_matrix", "dct_power",
    "downsample", "equivariance_psnr", "high_frequency_share", "image_at_latent_size", "radial_bins",
    "radial_frequency", "radial_power_spectrum", "resize_area", "resize_pair", "rotate90", "rotation_pair", "scale_pair", "transform_pair",
]
