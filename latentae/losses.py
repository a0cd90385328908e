"""The VAE training loss: reconstruction + LPIPS + KL + adaptive-weighted PatchGAN (LDM's recipe).

    nll   = reduce( (rec_weight * |x - x̂|  +  perceptual_weight * LPIPS(x, x̂)) / exp(logvar) + logvar )
    total = nll  +  kl_weight * reduce(KL(q(z|x) || N(0, I)))  +  d_weight * disc_factor * g
    g     = -mean(D(x̂))                          (the generator's adversarial term)
    d_weight = disc_weight * clamp(‖∇_last nll‖ / (‖∇_last g‖ + 1e-4), 0, 1e4)   (detached)

``|x - x̂|`` is per pixel (L1, or squared for L2); LPIPS is one number per image,
broadcast to every pixel as LDM does. ``last`` is the decoder's final conv weight
(``vae.last_layer``): the adaptive weight balances the two gradients where they meet.

Reductions (they decide what the weights mean):
    "sum_mean" (LDM): sum over every element of one image (C*H*W pixels for nll,
                      C*h*w latent elements for KL), mean over the batch.
    "mean":           mean over all elements.
LDM's ``kl_weight: 1.0e-6`` assumes "sum_mean" for *both* terms: with "mean" KL the
weight must be about C*h*w times larger to mean the same (e.g. 4*32*32 = 4096x at
256 px, f8, C=4), and mixing reductions (one "sum_mean", one "mean") changes the
KL/nll balance by roughly the pixel-to-latent element ratio. Keep them equal unless
you mean it.

Diffusability regularisers (what a diffusion model needs from the latent space; the
per-step draws and the extra decodes live in ``latentae.training.forward``):

    total += scale_equivariance_weight * se
    se    = mean over the pairs (x̃, x̂̃) = (down_f(x), decode(down_f(z))) of
            reduce-like-nll( rec_weight * |x̃ - x̂̃| + perceptual_weight * LPIPS(x̃, x̂̃) )

``se`` is normalised so that the weight means the same whatever ``nll_reduction`` and
whatever f: it is the per-pixel error times the element count of the image the pair
was downsampled from (sum_mean) or the per-pixel error (mean), i.e. weight 1 = as much
per pixel as the main reconstruction term. EQ-VAE steps need no term of their own: the
main pair is then (T(x), decode(T(z))). LPIPS runs on every image its backbone can take
(``LPIPS.min_size``: 31 px AlexNet, 16 px VGG); smaller ones get the pixel loss alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, NamedTuple, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentae.perceptual import build_lpips

Reduction = Literal["sum_mean", "mean"]
MAX_ADAPTIVE_WEIGHT = 1.0e4

GENERATOR_LOG_KEYS = (
    "total", "rec", "lpips", "nll", "kl", "logvar", "g", "d_weight", "disc_factor", "nll_grad_norm", "g_grad_norm",
    "se", "se_rec", "se_lpips",
)  # fmt: skip
DISCRIMINATOR_LOG_KEYS = ("d_loss", "logits_real", "logits_fake", "disc_factor")


@dataclass(frozen=True)
class LossConfig:
    rec_loss: Literal["l1", "l2"] = "l1"  # per-pixel |x - x̂| or (x - x̂)^2
    rec_weight: float = 1.0
    perceptual_weight: float = 1.0  # 0 disables LPIPS (and skips building it)
    lpips_net: Literal["vgg", "alex"] = "vgg"
    # false: random LPIPS backbone, for tests/demos without the torchvision weights file.
    lpips_pretrained: bool = True
    # LDM's 1e-6 means "per image, summed over C*h*w latent elements" (kl_reduction="sum_mean").
    # With kl_reduction="mean" the same strength needs ~C*h*w times the weight.
    kl_weight: float = 1.0e-6
    kl_reduction: Reduction = "sum_mean"
    # Keep equal to kl_reduction so kl_weight keeps LDM's meaning (see the module docstring).
    nll_reduction: Reduction = "sum_mean"
    learn_logvar: bool = False  # LDM's learned output log-variance (a single scalar)
    logvar_init: float = 0.0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_weight: float = 0.5  # multiplies the adaptive weight; 0 disables the GAN
    disc_factor: float = 1.0  # multiplies both the generator's and the discriminator's GAN terms
    disc_start: int = 50001  # first step the VAE gets the adversarial term
    disc_train_start: int | None = None  # first step the discriminator trains (default: disc_start)
    # -- diffusability regularisers (see README "Training for diffusability") ---------------
    # Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of
    # Autoencoders", arXiv 2502.14831): also decode the sampled latent area-downsampled by f
    # and match the image downsampled by f, with the pixel and LPIPS losses above. Weight
    # per pixel relative to the main reconstruction term (any nll_reduction); 0 = off.
    # Costs one extra decode at 1/f^2 of the pixels per scale used (f = 2, 4: +31% decoder
    # work with "all", +16% on average with "one").
    scale_equivariance_weight: float = 0.0
    scale_equivariance_scales: tuple[int, ...] = (2, 4)  # integer downsampling factors of the latent
    # "all": every scale each micro-batch, their mean; "one": one of them, drawn per
    # micro-batch (the same objective in expectation at about half the extra cost).
    scale_equivariance_sampling: Literal["all", "one"] = "all"
    # EQ-VAE (Kouzelis et al. 2025, arXiv 2502.09509): with probability eq_vae_prob per
    # micro-batch the reconstruction is decode(T(z)) against T(x) instead of decode(z)
    # against x, T = area resize by s ~ U[eq_vae_scales) (the paper's code: s in
    # {8/32, ..., 31/32}) then a rotation by 90, 180 or 270 degrees (eq_vae_rotation). The
    # whole loss (pixel, LPIPS, GAN) sees the transformed pair; no extra decode. 0 = off.
    eq_vae_prob: float = 0.0
    eq_vae_scales: tuple[float, ...] = (0.25, 1.0)
    eq_vae_rotation: bool = True
    # The EQ-VAE code's "prior preservation at low resolution": this share of the *other*
    # micro-batches encodes and reconstructs the image area-resized by s ~ U[eq_vae_scales).
    eq_vae_low_res_prob: float = 0.0
    # Latent noise: before decoding, with probability latent_noise_prob per image, add
    # Gaussian noise of std  sigma x std(z),  sigma ~ U[0, latent_noise),  std(z) the standard
    # deviation of all the micro-batch's latent elements (detached): the unit a diffusion
    # model's errors come in after the latent normalisation. Teaches the decoder to tolerate
    # a generator's imperfect latents. 0 = off; no extra decode.
    latent_noise: float = 0.0
    latent_noise_prob: float = 0.5

    def __post_init__(self):
        for name in ("rec_weight", "perceptual_weight", "kl_weight", "disc_weight", "disc_factor",
                     "scale_equivariance_weight", "latent_noise"):  # fmt: skip
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for name in ("eq_vae_prob", "eq_vae_low_res_prob", "latent_noise_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} is a probability: it must be in [0, 1], got {v}")
        for name in ("scale_equivariance_scales", "eq_vae_scales"):
            if isinstance(getattr(self, name), list):  # built in code from a list: keep the config hashable
                object.__setattr__(self, name, tuple(getattr(self, name)))
        scales = self.scale_equivariance_scales
        if not scales or any(not isinstance(f, int) or isinstance(f, bool) or f < 2 for f in scales):
            raise ValueError(f"scale_equivariance_scales must be integers >= 2 (downsampling factors), got {list(scales)}")
        if len(self.eq_vae_scales) != 2 or not 0.0 < self.eq_vae_scales[0] <= self.eq_vae_scales[1] <= 1.0:
            raise ValueError(f"eq_vae_scales must be [low, high] with 0 < low <= high <= 1, got {list(self.eq_vae_scales)}")
        if self.scale_equivariance_sampling not in ("all", "one"):
            raise ValueError(f"scale_equivariance_sampling must be 'all' or 'one', got {self.scale_equivariance_sampling!r}")
        if not math.isfinite(self.logvar_init):
            raise ValueError(f"logvar_init must be finite, got {self.logvar_init}")
        choices = {
            "rec_loss": ("l1", "l2"),
            "lpips_net": ("vgg", "alex"),
            "kl_reduction": ("sum_mean", "mean"),
            "nll_reduction": ("sum_mean", "mean"),
            "disc_loss": ("hinge", "vanilla"),
        }
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")
        if self.disc_train_start is not None:
            if self.disc_train_start < 0:
                raise ValueError(f"disc_train_start must be >= 0, got {self.disc_train_start}")
            if self.disc_train_start > self.disc_start:
                raise ValueError(
                    f"disc_train_start ({self.disc_train_start}) must be <= disc_start ({self.disc_start}): the "
                    f"discriminator has to be training before the VAE is judged by it"
                )

    @property
    def uses_gan(self) -> bool:
        """False when disc_weight or disc_factor is 0: no discriminator is needed at all."""
        return self.disc_weight > 0 and self.disc_factor > 0

    @property
    def discriminator_start(self) -> int:
        return self.disc_start if self.disc_train_start is None else self.disc_train_start


class Posterior(Protocol):
    def kl(self) -> Tensor: ...


class ScalePair(NamedTuple):
    """One scale-equivariance pair: ``decode(down_f(z))`` and ``down_f(x)``, ``[N, 3, H/f, W/f]``."""

    reconstruction: Tensor
    target: Tensor
    factor: int  # f: the target was area-downsampled by f from the image the main loss sees


# --------------------------------------------------------------------------- terms
# Small functions, each pinned by a hand computation in tests/test_losses.py.


def reduce_loss(x: Tensor, how: Reduction) -> Tensor:
    """[N, ...] -> scalar: "sum_mean" = sum over all but the batch dim, mean over the batch."""
    x = x.float()
    return x.sum() / x.shape[0] if how == "sum_mean" else x.mean()


def pixel_loss(inputs: Tensor, reconstructions: Tensor, kind: Literal["l1", "l2"]) -> Tensor:
    """Per-element reconstruction error [N, C, H, W] in float32."""
    diff = inputs.float() - reconstructions.float()
    return diff.abs() if kind == "l1" else diff.pow(2)


def kl_loss(posterior: Posterior, how: Reduction) -> Tensor:
    """KL(q(z|x) || N(0, I)), reduced: per-element 0.5 * (mu^2 + var - 1 - logvar)."""
    return reduce_loss(posterior.kl(), how)


def nll_loss(rec: Tensor, logvar: Tensor, how: Reduction) -> Tensor:
    """Gaussian/Laplace-style nll with one learned log-variance (LDM): rec / exp(logvar) + logvar."""
    return reduce_loss(rec / torch.exp(logvar) + logvar, how)


def perceptual_fits(perceptual: nn.Module | None, image: Tensor) -> bool:
    """Can ``perceptual`` (LPIPS) process ``image`` [N, 3, H, W]? False below its backbone's
    smallest input (31 px AlexNet, 16 px VGG: their last layers would be empty)."""
    return perceptual is not None and min(image.shape[-2:]) >= getattr(perceptual, "min_size", 1)


def generator_adversarial(logits_fake: Tensor) -> Tensor:
    """g = -mean(D(x̂)) (LDM uses this for both hinge and vanilla discriminators)."""
    return -logits_fake.float().mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    # softplus(-x) = -log(sigmoid(x)): binary cross-entropy with real=1, fake=0.
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def adaptive_weight(nll: Tensor, g: Tensor, last_layer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (weight, ‖∇_last nll‖, ‖∇_last g‖).

    weight = clamp(‖∇nll‖ / (‖∇g‖ + 1e-4), 0, 1e4), detached: it scales the adversarial
    gradient to the reconstruction gradient's size at the last decoder layer.

    Two extra ``autograd.grad`` calls (graph retained for the real backward).
    """
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True, allow_unused=True)[0]
    g_grad = torch.autograd.grad(g, last_layer, retain_graph=True, allow_unused=True)[0]
    if nll_grad is None or g_grad is None:
        raise ValueError(
            f"last_layer (shape {tuple(last_layer.shape)}) is not in the graph of the "
            f"{'reconstruction loss' if nll_grad is None else 'adversarial term'}: pass the final decoder conv "
            f"weight of the model that produced the reconstructions (unwrap_model(vae).last_layer)"
        )
    nll_norm, g_norm = nll_grad.float().norm(), g_grad.float().norm()
    weight = (nll_norm / (g_norm + 1e-4)).clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()
    return weight, nll_norm.detach(), g_norm.detach()


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Turn off requires_grad on ``module``'s parameters for the block, then restore each flag."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- the module


class VAELoss(nn.Module):
    """LDM's LPIPSWithDiscriminator, split into a generator (VAE) and a discriminator step.

    Owns the frozen LPIPS network and the (optionally learned) output log-variance;
    the discriminator itself is built and optimised by the trainer and passed in.

    Trainer contract:

    * VAE optimizer: ``vae.parameters()`` + ``loss.trainable_parameters()`` ([logvar] when
      ``learn_logvar``, else []). Under multi-process training the loss module is not
      DDP-wrapped: all-reduce (mean) ``loss.logvar.grad`` before the optimizer step, or
      ranks drift apart.
    * Generator step: ``loss.generator_loss(x, x̂, posterior, step=, last_layer=vae.last_layer,
      discriminator=D)``. The discriminator's parameters get **no** gradients from it:
      ``generator_loss`` runs D inside ``frozen(D)`` (requires_grad off, restored after),
      so the graph never reaches them and the trainer need not zero anything. Pass the
      *unwrapped* discriminator here (``accelerator.unwrap_model(D)``): calling the DDP
      wrapper would arm its gradient reducer for a backward that never reaches its
      parameters. Its parameters are identical on every rank, so this is exact.
      ``last_layer`` = ``unwrap_model(vae).last_layer``; ``None`` disables the adaptive
      weight (d_weight = disc_weight, fixed).
    * Discriminator step: ``loss.discriminator_loss(x, x̂, step=, discriminator=D_ddp)``,
      only when ``loss.disc_active(step)`` (it is then multiplied by disc_factor; when
      called before ``disc_train_start`` it returns 0 * loss and the call is wasted).
      It detaches both inputs, so the VAE gets no gradient from this step.
    * Validation (``torch.no_grad()``): the adaptive weight needs gradients, so
      d_weight = 0 there: ``total`` excludes the adversarial term; ``g`` is still logged.
    * Autocast (bf16) is fine: LPIPS and D may run in low precision; every difference,
      reduction and logged value is computed in float32.

    Logs (detached float32 scalars, always the same keys; 0 where a term is off):
      generator: total, rec (mean per-pixel L1/L2, unweighted), lpips (mean per-image
      LPIPS, unweighted), nll, kl (reduced per kl_reduction, before kl_weight),
      logvar, g, d_weight (adaptive weight incl. disc_weight), disc_factor (0 before
      disc_start), nll_grad_norm, g_grad_norm (the norms the adaptive weight used),
      se (the scale-equivariance term before its weight), se_rec, se_lpips (its pixel
      error and LPIPS, unweighted; 0 without pairs).
      discriminator: d_loss (before disc_factor), logits_real, logits_fake (means),
      disc_factor.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.config = cfg
        self.perceptual = (
            build_lpips(cfg.lpips_net, pretrained=cfg.lpips_pretrained) if cfg.perceptual_weight > 0 else None
        )
        # A Parameter even when fixed, so checkpoints have the same keys either way.
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        # LPIPS is frozen and rebuilt from its own weight files: keep its ~60 MB out of
        # our checkpoints, and never let a checkpoint swap a pretrained backbone for a
        # random one (or back).
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_pre_hook(_fill_perceptual_keys)

    # -- schedule ------------------------------------------------------------------

    def gan_active(self, step: int) -> bool:
        """Does the VAE get the adversarial term at ``step``? (step >= disc_start)"""
        return self.config.uses_gan and step >= self.config.disc_start

    def disc_active(self, step: int) -> bool:
        """Does the discriminator train at ``step``? (step >= disc_train_start, default disc_start)"""
        return self.config.uses_gan and step >= self.config.discriminator_start

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong in the VAE optimizer: [logvar] if learned, else []."""
        return [self.logvar] if self.config.learn_logvar else []

    # -- steps ---------------------------------------------------------------------

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: Posterior,
        *,
        step: int,
        last_layer: Tensor | None,
        discriminator: nn.Module | None,
        scaled: Sequence[ScalePair] = (),
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The VAE's loss. inputs, reconstructions: [N, 3, H, W] in [-1, 1]; ``scaled``: the
        scale-equivariance pairs (``latentae.training.forward``), added with
        ``scale_equivariance_weight``."""
        cfg = self.config
        _check_pair(inputs, reconstructions)
        zero = torch.zeros((), device=inputs.device)

        pix = pixel_loss(inputs, reconstructions, cfg.rec_loss)  # [N, C, H, W]
        rec = cfg.rec_weight * pix
        if perceptual_fits(self.perceptual, inputs):
            lp = self.perceptual(inputs.contiguous(), reconstructions.contiguous())  # [N]
            rec = rec + cfg.perceptual_weight * lp.view(-1, 1, 1, 1)  # broadcast per pixel, as LDM
        else:
            lp = zero
        logvar = self.logvar.float()
        nll = nll_loss(rec, logvar, cfg.nll_reduction)
        kl = kl_loss(posterior, cfg.kl_reduction)
        total = nll + cfg.kl_weight * kl
        se, se_rec, se_lpips = self.scale_equivariance(scaled) if scaled else (zero, zero, zero)
        if scaled and cfg.scale_equivariance_weight > 0:
            total = total + cfg.scale_equivariance_weight * se

        g = d_weight = disc_factor = nll_norm = g_norm = zero
        if self.gan_active(step):
            if discriminator is None:
                raise ValueError(
                    f"step {step} >= disc_start ({cfg.disc_start}) but no discriminator was passed to "
                    f"generator_loss; to train without a GAN set loss.disc_weight=0"
                )
            with frozen(discriminator):
                g = generator_adversarial(discriminator(_for_module(discriminator, reconstructions)))
            disc_factor = torch.tensor(cfg.disc_factor, device=inputs.device)
            if last_layer is None:
                d_weight = torch.tensor(cfg.disc_weight, device=inputs.device)
            elif torch.is_grad_enabled() and nll.requires_grad and g.requires_grad:
                weight, nll_norm, g_norm = adaptive_weight(nll, g, last_layer)
                d_weight = weight * cfg.disc_weight
            # else: no gradients (validation) -> d_weight stays 0, g is only logged.
            total = total + d_weight * disc_factor * g

        logs = {
            "total": total, "rec": pix.mean(), "lpips": lp.mean(), "nll": nll, "kl": kl, "logvar": logvar,
            "g": g, "d_weight": d_weight, "disc_factor": disc_factor, "nll_grad_norm": nll_norm, "g_grad_norm": g_norm,
            "se": se, "se_rec": se_rec, "se_lpips": se_lpips,
        }  # fmt: skip
        return total, {k: v.detach().float() for k, v in logs.items()}

    def scale_equivariance(self, pairs: Sequence[ScalePair]) -> tuple[Tensor, Tensor, Tensor]:
        """``(se, se_rec, se_lpips)`` for the pairs (see the module docstring), float32 scalars.

        Per pair: e = rec_weight * mean |x̃ - x̂̃| + perceptual_weight * mean LPIPS (LPIPS
        where the image fits its backbone), the per-pixel error of the pair; ``se`` is the
        mean of e over the pairs, times the elements of one full image (3 x H x W = 3 x
        f*h x f*w) under "sum_mean". ``se_rec`` / ``se_lpips``: the mean pixel error and
        LPIPS of the pairs (LPIPS over the pairs that had it; 0 when none), unweighted.
        No learned log-variance divides it: it is a regulariser, not the likelihood.
        """
        cfg = self.config
        se, recs, lps = [], [], []
        for p in pairs:
            _check_pair(p.target, p.reconstruction)
            pix = pixel_loss(p.target, p.reconstruction, cfg.rec_loss).mean((1, 2, 3))  # [N]
            e = cfg.rec_weight * pix
            recs.append(pix.mean())
            if perceptual_fits(self.perceptual, p.target):
                lp = self.perceptual(p.target.contiguous(), p.reconstruction.contiguous())  # [N]
                e = e + cfg.perceptual_weight * lp
                lps.append(lp.mean())
            full = p.target[0].numel() * p.factor**2  # elements of the image it was downsampled from
            se.append(e.mean() * (full if cfg.nll_reduction == "sum_mean" else 1))
        mean = lambda xs: torch.stack(xs).mean() if xs else torch.zeros((), device=pairs[0].target.device)  # noqa: E731
        return mean(se), mean(recs), mean(lps)

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, *, step: int, discriminator: nn.Module
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss on real ``inputs`` vs. (detached) ``reconstructions``."""
        cfg = self.config
        _check_pair(inputs, reconstructions)
        # Detach both: this step must not send gradients into the VAE (or the data pipeline).
        logits_real = discriminator(_for_module(discriminator, inputs.detach()))
        logits_fake = discriminator(_for_module(discriminator, reconstructions.detach()))
        d_fn = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss
        d_loss = d_fn(logits_real, logits_fake)
        factor = cfg.disc_factor if self.disc_active(step) else 0.0
        loss = factor * d_loss
        logs = {
            "d_loss": d_loss,
            "logits_real": logits_real.float().mean(),
            "logits_fake": logits_fake.float().mean(),
            "disc_factor": torch.tensor(factor, device=inputs.device),
        }
        return loss, {k: v.detach().float() for k, v in logs.items()}


# --------------------------------------------------------------------------- checkpoint hooks


def _drop_perceptual_keys(module: VAELoss, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _fill_perceptual_keys(module: VAELoss, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    # Whatever a checkpoint says about LPIPS is ignored; the rebuilt copy stays, and
    # strict loading of LPIPS-free checkpoints still passes.
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]
    if module.perceptual is not None:
        for key, value in module.perceptual.state_dict().items():
            state_dict[prefix + "perceptual." + key] = value


def _for_module(module: nn.Module, x: Tensor) -> Tensor:
    # A reconstruction made under bf16 autocast is bf16; a discriminator called outside
    # autocast would reject it. Match its parameter dtype (autocast still recasts inside).
    p = next(module.parameters(), None)
    x = x.contiguous()
    return x if p is None or x.dtype == p.dtype else x.to(p.dtype)


def _check_pair(inputs: Tensor, reconstructions: Tensor) -> None:
    if inputs.shape != reconstructions.shape or inputs.ndim != 4:
        raise ValueError(
            f"inputs and reconstructions must have the same [N, C, H, W] shape, got {tuple(inputs.shape)} "
            f"and {tuple(reconstructions.shape)}"
        )


__all__ = [
    "DISCRIMINATOR_LOG_KEYS",
    "GENERATOR_LOG_KEYS",
    "LossConfig",
    "ScalePair",
    "VAELoss",
    "adaptive_weight",
    "frozen",
    "generator_adversarial",
    "hinge_d_loss",
    "kl_loss",
    "nll_loss",
    "perceptual_fits",
    "pixel_loss",
    "reduce_loss",
    "vanilla_d_loss",
]
