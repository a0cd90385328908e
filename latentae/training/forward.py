"""The training forward: one call of the prepared (DDP-wrapped) module returns all the loss needs.

DDP's reducer sees a parameter's gradient only when the parameter was used inside the
wrapped module's ``forward``. The diffusability regularisers need more than one decode
per micro-batch, so those decodes run *here*, inside ``TrainingForward.forward``, which
the trainer prepares instead of the bare VAE. A second ``unwrap_model(vae).decode(...)``
in the step would bypass the reducer (wrong gradients, or "marked ready twice").

    plan = draw_plan(cfg.loss, seed=hash_seed(seed, "regularizers", step, rank, micro),
                     image_size=x.shape[-2:], vae_factor=8, sample_posterior=True)
    out = prepared(x, plan, generator)               # TrainingForward(vae), DDP-wrapped
    loss, logs = VAELoss.generator_loss(out.target, out.reconstruction, out.posterior,
                                        scaled=out.scaled, ...)

``draw_plan`` makes every discrete choice (EQ-VAE step or not, its scale and rotation, a
low-resolution step, which scale-equivariance factors) as plain Python values from
Python's ``random`` seeded by (seed, step, rank, micro-batch): the same on a resumed run,
no tensor to read back from a device, and shapes known before the forward. The per-image latent noise is drawn inside the
forward from the device generator the trainer reseeds per micro-batch, after the posterior
sample, so the posterior noise is what it would be without it.

What one forward does (F = the VAE's downsampling factor; shapes for an R x R crop):

    x        [N, 3, R, R]        low-res step: area-resized to F*h' first (EQ-VAE's prior preservation)
    z        [N, C, R/F, R/F]    posterior sample (or mean), from the one encode
    EQ step: (z', x') = rotate_k(resize_area(z, (h', w'))), rotate_k(resize_area(x, F*(h', w')))
    else:    (z', x') = (z, x)
    z'      += sigma_i * std(z') * eps   for the images drawn for latent noise
    reconstruction = decode(z')  ->  matched with target = x'
    scaled   = [(decode(down_f(z)), down_f(x), f) for f in plan.se_factors]   from the clean z

All resampling is ``latentae.diffusability``'s (area), the operators the equivariance
figures of ``latentae.compare`` measure with: what is trained for is what is measured.
(EQ-VAE's code resizes bilinearly; the scale-equivariance paper's bilinear 2x equals area.)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from latentae import diffusability as dif
from latentae.losses import LossConfig, ScalePair
from latentae.model import AutoencoderKL, DiagonalGaussian

FORWARD_LOG_KEYS = ("eq", "eq_low_res", "latent_noise")


@dataclass(frozen=True)
class ForwardPlan:
    """What one training forward computes (all plain Python values; see the module docstring)."""

    sample_posterior: bool = True
    eq_size: tuple[int, int] | None = None  # EQ-VAE step: the latent is area-resized to (h', w') ...
    eq_rotation: int = 0  # ... then rotated by this many 90-degree turns (0-3), the image alike
    low_res_size: tuple[int, int] | None = None  # low-res step: the image is area-resized to F x (h', w')
    se_factors: tuple[int, ...] = ()  # scale-equivariance pairs to decode
    noise_prob: float = 0.0  # per image: probability of latent noise
    noise_strength: float = 0.0  # noise std ~ U[0, strength) x std(z)


@dataclass
class ForwardOutput:
    reconstruction: Tensor  # [N, 3, H', W']: decode of the (transformed, noised) latent
    target: Tensor  # [N, 3, H', W']: what it must match (x, or T(x) in an EQ-VAE step)
    posterior: DiagonalGaussian  # of the encoded image (for the KL)
    scaled: tuple[ScalePair, ...] = ()
    logs: dict[str, Tensor] = field(default_factory=dict)  # FORWARD_LOG_KEYS, device scalars


def _scaled_size(size: tuple[int, int], s: float) -> tuple[int, int]:
    return max(1, round(s * size[0])), max(1, round(s * size[1]))


def draw_plan(cfg: LossConfig, *, seed: int, image_size: tuple[int, int], vae_factor: int,
              sample_posterior: bool = True) -> ForwardPlan:  # fmt: skip
    """The regularisers' choices for one micro-batch, a pure function of ``seed``.

    Six uniforms are always drawn, one per decision, so switching one regulariser on or
    off does not change the draws of the others.
    """
    rng = random.Random(seed)  # Python's Mersenne Twister: no tensor, nothing to read back from a device
    r = [rng.random() for _ in range(6)]
    lat = dif.covered_size(tuple(image_size), vae_factor)
    lo, hi = cfg.eq_vae_scales
    eq_size = low_res = None
    k = 0
    if r[0] < cfg.eq_vae_prob:
        eq_size = _scaled_size(lat, lo + (hi - lo) * r[1])
        k = 1 + min(2, int(3 * r[2])) if cfg.eq_vae_rotation else 0
    elif r[3] < cfg.eq_vae_low_res_prob:
        low_res = _scaled_size(lat, lo + (hi - lo) * r[4])
    se: tuple[int, ...] = ()
    if cfg.scale_equivariance_weight > 0:
        grid = low_res or lat
        fits = tuple(f for f in cfg.scale_equivariance_scales if f <= min(grid))  # never in full-size steps (plan.py checks)
        if fits and cfg.scale_equivariance_sampling == "one":
            fits = (fits[min(len(fits) - 1, int(len(fits) * r[5]))],)
        se = fits
    noisy = cfg.latent_noise > 0 and cfg.latent_noise_prob > 0
    return ForwardPlan(
        sample_posterior=sample_posterior, eq_size=eq_size, eq_rotation=k, low_res_size=low_res, se_factors=se,
        noise_prob=cfg.latent_noise_prob if noisy else 0.0, noise_strength=cfg.latent_noise if noisy else 0.0,
    )  # fmt: skip


def add_latent_noise(z: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """``z + sigma_i * std(z) * eps``: ``sigma`` [N] in units of the standard deviation of all
    of ``z``'s elements (detached: the noise level is not something to train)."""
    scale = z.detach().float().std(correction=0)
    return z + (sigma.float().view(-1, *([1] * (z.ndim - 1))) * scale).to(z.dtype) * eps


def draw_latent_noise(z: Tensor, prob: float, strength: float, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Per image ``sigma`` [N] (0 for the images not drawn, else U[0, strength)) and ``eps`` like ``z``,
    on ``z``'s device from ``generator``."""
    n = z.shape[0]
    picked = torch.rand(n, generator=generator, device=z.device) < prob
    sigma = strength * torch.rand(n, generator=generator, device=z.device) * picked
    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return sigma, eps


class TrainingForward(nn.Module):
    """Wraps the VAE for training: the module the trainer prepares (DDP) and calls.

    Holds no parameters of its own (``vae`` is its only child), so its state is the VAE's
    (keys prefixed ``vae.``; the trainer saves the VAE itself). Validation, the EMA and
    saving use the bare VAE.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor, plan: ForwardPlan = ForwardPlan(), generator: torch.Generator | None = None) -> ForwardOutput:
        vae, f = self.vae, self.vae.config.downsample_factor
        x = images
        if plan.low_res_size is not None:  # EQ-VAE's prior preservation at a lower resolution
            x = dif.resize_area(dif.crop_to_multiple(x, f), (f * plan.low_res_size[0], f * plan.low_res_size[1]))
        posterior = vae.encode(x)
        z = posterior.sample(generator) if plan.sample_posterior else posterior.mode()  # [N, C, h, w]
        if plan.eq_size is not None:
            zt, target = dif.resize_pair(z, x, plan.eq_size, f)
            zt, target = dif.rotate90(zt, plan.eq_rotation), dif.rotate90(target, plan.eq_rotation)
        else:
            zt, target = z, x
        sigma = torch.zeros(z.shape[0], device=z.device)
        if plan.noise_strength > 0:
            sigma, eps = draw_latent_noise(zt, plan.noise_prob, plan.noise_strength, generator)
            zt = add_latent_noise(zt, sigma, eps)
        h, w = target.shape[-2:]
        rec = vae.decode(zt)[..., :h, :w]  # a padded image decodes to the padded size: crop back
        scaled = []
        for s in plan.se_factors:  # from the clean latent of the (possibly low-res) image
            zs, xs = dif.scale_pair(z, x, s, f)
            scaled.append(ScalePair(vae.decode(zs), xs, s))
        # Filled on the device (no host-to-device copy): the step stays free of host syncs.
        flag = lambda on: torch.full((), float(on), device=z.device)  # noqa: E731
        logs = {"eq": flag(plan.eq_size is not None), "eq_low_res": flag(plan.low_res_size is not None),
                "latent_noise": sigma.float().mean()}  # fmt: skip
        return ForwardOutput(rec, target, posterior, tuple(scaled), logs)


__all__ = [
    "FORWARD_LOG_KEYS", "ForwardOutput", "ForwardPlan", "TrainingForward", "add_latent_noise", "draw_latent_noise",
    "draw_plan",
]  # fmt: skip
