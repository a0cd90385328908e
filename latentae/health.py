"""Latent health: per-channel statistics of a VAE's latents over a set of images.

What a diffusion model trained on these latents will see, and whether every channel
carries information:

* ``mean`` / ``std`` per channel of the latents ``z ~ q(z|x)`` (posterior *samples*,
  seeded, because that is what latent-diffusion training encodes; for a well-trained
  VAE the posterior std is tiny and samples equal the mode to a few decimals);
* ``kl_per_element``: KL(q(z|x) || N(0, 1)) in nats, averaged over every latent element
  of the channel (all images, all positions): independent of the image size, so it is
  the number to compare across runs and the one ``active`` uses;
* ``kl_per_image``: the same KL summed over the channel's spatial positions, averaged
  over images (nats per image; grows with the image area);
* ``active``: a channel is *active* when ``kl_per_element > active_kl`` (default 0.01
  nats). Below that its posterior is practically the prior N(0, 1): the decoder gets
  (almost) no information through it (posterior collapse);
* the normalisation factors a diffusion model would need, from all channels together:
  ``shift_factor = mean(z)`` and ``scaling_factor = 1 / std(z)`` (SD3 / FLUX convention
  ``(z - shift) * scale``), ``scaling_factor_no_shift = 1 / sqrt(mean(z^2))`` (SD 1.x /
  SDXL convention ``z * scale`` without a shift: unit second moment), and per-channel
  ``latents_mean`` / ``latents_std``;
* the **spectrum** (``SpectrumStats``, math in ``latentae.diffusability``): the radially
  averaged, normalised DCT power spectrum of the latents (channels pooled by energy, DC
  removed) averaged over images, and ``hf_share``, the share of the latent energy at or
  above half the latent Nyquist frequency, per channel and pooled; with the images, the
  same figures for the images area-downsampled to the latent size (the reference: a
  latent no rougher than its image has ``hf_share <= hf_share_image``).

Everything accumulates in float64 sums, streaming: one ``update`` per batch, constant memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from latentae import diffusability as dif
from latentae.model import DiagonalGaussian

DEFAULT_ACTIVE_KL = 0.01  # nats per latent element


class SpectrumStats:
    """Streaming spectrum summary of one VAE's latents (and of its images at the latent size).

    Per image: the normalised radial spectrum and the high-frequency shares
    (``latentae.diffusability``); accumulated as sums, so the result is the mean over
    images (each image counts once, whatever its size). Latents and images are first cut
    to the part they share (``diffusability.covered``: a padded image's last latent row
    partly describes padding).
    """

    def __init__(self, channels: int, downsample_factor: int, bins_per_nyquist: int = dif.BINS_PER_NYQUIST):
        self.channels, self.factor, self.bins_per_nyquist = channels, downsample_factor, bins_per_nyquist
        self.freq = dif.radial_bins(2, 2, bins_per_nyquist)[1]
        nb = self.freq.numel()
        self.images = self.with_images = self.with_mean = 0
        self.curve_sum = {k: torch.zeros(nb, dtype=torch.float64) for k in ("latent", "image")}
        self.curve_n = {k: torch.zeros(nb, dtype=torch.float64) for k in ("latent", "image")}
        self.share_sum = {k: 0.0 for k in ("latent", "latent_posterior_mean", "image")}
        self.channel_share_sum = torch.zeros(channels, dtype=torch.float64)

    def _add_curve(self, key: str, t: torch.Tensor) -> None:
        _, power = dif.radial_power_spectrum(t, self.bins_per_nyquist)
        ok = torch.isfinite(power)
        self.curve_sum[key] += torch.where(ok, power, torch.zeros_like(power)).sum(0)
        self.curve_n[key] += ok.sum(0)

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_mean: torch.Tensor | None = None, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Add latents ``z`` ``[N, C, h, w]`` (and optionally the posterior means and the
        images ``[N, 3, H, W]``); returns the per-image figures ``{"hf_share": [N], ...}``."""
        if images is not None:
            z, images_c = dif.covered(z, images, self.factor)
            if z_mean is not None:
                z_mean = dif.covered(z_mean, images, self.factor)[0]
        out = {"hf_share": dif.high_frequency_share(z)}
        self.images += z.shape[0]
        self.share_sum["latent"] += out["hf_share"].sum().item()
        self.channel_share_sum += dif.high_frequency_share(z, per_channel=True).sum(0)
        self._add_curve("latent", z)
        if z_mean is not None:
            out["hf_share_posterior_mean"] = dif.high_frequency_share(z_mean)
            self.with_mean += z_mean.shape[0]
            self.share_sum["latent_posterior_mean"] += out["hf_share_posterior_mean"].sum().item()
        if images is not None:
            ref = dif.image_at_latent_size(images_c.float(), self.factor).cpu()
            out["hf_share_image"] = dif.high_frequency_share(ref)
            self.with_images += ref.shape[0]
            self.share_sum["image"] += out["hf_share_image"].sum().item()
            self._add_curve("image", ref)
        return out

    def result(self) -> dict[str, Any]:
        """Means over images, JSON-ready. Curves: ``None`` where no image had a coefficient."""
        if self.images == 0:
            raise ValueError("no latents were added: cannot compute a spectrum of zero images")
        curve = lambda k: [None if n == 0 else s / n for s, n in zip(self.curve_sum[k].tolist(), self.curve_n[k].tolist())]  # noqa: E731
        return {
            "freq": self.freq.tolist(),
            "freq_unit": "fraction of the latent Nyquist frequency",
            "cutoff": dif.HALF_NYQUIST,
            "images": self.images,
            "latent": curve("latent"),
            "hf_share": self.share_sum["latent"] / self.images,
            "hf_share_posterior_mean": self.share_sum["latent_posterior_mean"] / self.with_mean if self.with_mean else None,
            "hf_share_per_channel": (self.channel_share_sum / self.images).tolist(),
            "image": curve("image") if self.with_images else None,
            "hf_share_image": self.share_sum["image"] / self.with_images if self.with_images else None,
        }


class LatentStats:
    """Streaming per-channel latent statistics for one VAE (see the module docstring)."""

    def __init__(self, channels: int, downsample_factor: int = 8):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.images = 0
        z = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        self.count, self.sum, self.sumsq = z(), z(), z()
        self.kl_sum, self.post_std_sum = z(), z()
        self.spectrum = SpectrumStats(channels, downsample_factor)

    @torch.no_grad()
    def update(self, posterior: DiagonalGaussian, z: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Add a batch: its posterior, the latents drawn from it (``[N, C, h, w]``) and
        optionally the images (for the spectrum reference). Returns the per-image
        spectrum figures (``SpectrumStats.update``)."""
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"expected latents [N, {self.channels}, h, w], got {tuple(z.shape)}")
        dims = (0, 2, 3)
        zd = z.detach().to("cpu", torch.float64)
        self.images += z.shape[0]
        self.count += z.shape[0] * z.shape[2] * z.shape[3]
        self.sum += zd.sum(dims)
        self.sumsq += zd.pow(2).sum(dims)
        # KL in float32 from the posterior's own parameters (exact formula in model.py).
        self.kl_sum += posterior.kl().detach().to("cpu", torch.float64).sum(dims)
        self.post_std_sum += posterior.std.detach().to("cpu", torch.float64).sum(dims)
        # The spectrum of the samples (what latent-diffusion training encodes); the posterior
        # mean's share is kept too, to tell encoder structure from posterior noise.
        return self.spectrum.update(zd, posterior.mean.detach().to("cpu", torch.float64), images)

    def result(
        self,
        active_kl: float = DEFAULT_ACTIVE_KL,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
    ) -> dict[str, Any]:
        """The summary as plain Python numbers (JSON-ready). ``scaling_factor`` /
        ``shift_factor``: the VAE's configured factors, to show how far they are off."""
        if self.images == 0:
            raise ValueError("no latents were added: cannot compute latent statistics of zero images")
        n = self.count
        mean = self.sum / n
        var = (self.sumsq / n - mean**2).clamp_min(0.0)
        kl_el = self.kl_sum / n
        total = n.sum()
        mean_all = (self.sum.sum() / total).item()
        second = (self.sumsq.sum() / total).item()
        std_all = math.sqrt(max(second - mean_all**2, 0.0))
        active = [bool(k > active_kl) for k in kl_el.tolist()]
        out: dict[str, Any] = {
            "channels": self.channels,
            "images": self.images,
            "latent_elements_per_channel": int(n[0].item()),
            "latents_from": "posterior samples (seeded)",
            "mean": mean.tolist(),
            "std": var.sqrt().tolist(),
            "posterior_std_mean": (self.post_std_sum / n).tolist(),
            "kl_per_element": kl_el.tolist(),
            "kl_per_image": (self.kl_sum / self.images).tolist(),
            "kl_per_element_all": (self.kl_sum.sum() / total).item(),
            "active_kl_threshold": active_kl,
            "active": active,
            "active_channels": sum(active),
            "spectrum": self.spectrum.result(),
            "suggested": {
                "shift_factor": mean_all,
                "scaling_factor": 1.0 / std_all if std_all > 0 else math.inf,
                "scaling_factor_no_shift": 1.0 / math.sqrt(second) if second > 0 else math.inf,
                "latents_mean": mean.tolist(),
                "latents_std": var.sqrt().tolist(),
            },
        }
        if scaling_factor is not None:
            shift = shift_factor or 0.0
            # std and mean of the *normalised* latents with the configured factors (ideal: 1 and 0).
            out["configured"] = {
                "scaling_factor": scaling_factor,
                "shift_factor": shift_factor,
                "normalised_mean": (mean_all - shift) * scaling_factor,
                "normalised_std": std_all * abs(scaling_factor),
            }
        return out


__all__ = ["LatentStats", "SpectrumStats", "DEFAULT_ACTIVE_KL"]
