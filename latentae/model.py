"""The KL autoencoder: the SD / SDXL / SD3 / FLUX VAE architecture on one screen.

Parameter names, shapes and forward math equal ``diffusers.AutoencoderKL`` for the
same config, so weights move between the two with a plain ``load_state_dict``.
One knob, ``latent_channels``, covers 4 (SD 1.x / SDXL), 16 (SD3 / FLUX) or 32.

Shapes (f = 2 ** (len(block_out_channels) - 1), 8 for the SD family):
    images  [N, 3, H, W] in [-1, 1]  ->  latents [N, C, H/f, W/f]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ModelConfig:
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_attention: bool = True
    use_quant_conv: bool = True  # SD 1.x / SDXL: on; SD3 / FLUX: off
    use_post_quant_conv: bool = True
    in_channels: int = 3
    out_channels: int = 3
    # diffusers' enable_tiling() cuts tiles of this many pixels: a default left
    # unset silently changes tiled results, so every config names it.
    sample_size: int = 512
    # How latents are normalised for the diffusion model:  z' = (z - shift) * scale.
    # SD 1.x 0.18215; SDXL 0.13025; SD3 1.5305 / 0.0609; FLUX 0.3611 / 0.1159.
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # Out-of-multiple sizes: "pad" reflect-pads to a multiple of the downsampling
    # factor and crops the reconstruction back; "error" refuses them.
    odd_size: str = "pad"

    def __post_init__(self):
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one width")
        for w in self.block_out_channels:
            if w % self.norm_num_groups:
                raise ValueError(
                    f"every width in block_out_channels must divide by norm_num_groups={self.norm_num_groups}, got {w}"
                )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.sample_size < 8:
            raise ValueError(f"sample_size must be >= 8 pixels, got {self.sample_size}")
        if self.odd_size not in ("pad", "error"):
            raise ValueError(f"odd_size must be 'pad' or 'error', got {self.odd_size!r}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} has {len(v)} values, expected latent_channels={self.latent_channels}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels (the VAE mid block's)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = _norm(c, groups)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x):
        n, c, h, w = x.shape
        # Normalising the [N, C, HW] view (not [N, C, H, W]) matches diffusers' kernel choice bit for bit.
        t = self.group_norm(x.view(n, c, h * w)).transpose(1, 2)  # [N, HW, C]
        q, k, v = (m(t).view(n, -1, 1, c).transpose(1, 2) for m in (self.to_q, self.to_k, self.to_v))  # [N, 1, HW, C]
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, c)
        # (attention + residual), in this order: the sum takes the strides of the first
        # operand, which decides the next GroupNorm's kernel; this keeps us equal to diffusers.
        return self.to_out[0](o).transpose(1, 2).reshape(n, c, h, w) + x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        # Registration order follows diffusers so state_dict keys come out in the same order.
        self.attentions = nn.ModuleList([Attention(c, groups)]) if attention else None
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        # Asymmetric pad (right/bottom only), as LDM and diffusers do.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One resolution level: resnets, then an optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = s(x)
        return x


def _run(block: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``block(x)``, or with gradient checkpointing: keep only ``x``, recompute the block's
    activations during backward. The blocks draw no random numbers, so the RNG state need
    not be saved for the recomputation."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False, preserve_rng_state=False)
    return block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gradient_checkpointing = False
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < len(ch) - 1 else None)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):  # [N, 3, H, W] -> [N, 2C, H/f, W/f]
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = _run(b, x, self.gradient_checkpointing)
        x = _run(self.mid_block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gradient_checkpointing = False
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.up_blocks = nn.ModuleList(
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_attention)
        self.conv_norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):  # [N, C, h, w] -> [N, 3, h*f, w*f]
        x = _run(self.mid_block, self.conv_in(z), self.gradient_checkpointing)
        for b in self.up_blocks:
            x = _run(b, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar))."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM / diffusers: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per latent element, same shape as ``mean`` (reduce it yourself)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)


class AutoencoderKL(nn.Module):
    """The VAE. ``encode`` -> posterior, ``decode`` -> images in [-1, 1] (unclamped)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        # Set by latentae.fast.optimize_for_inference: the fast no-grad path. Not a
        # submodule and owns no parameters, so state_dict() is the same either way.
        self.inference = None

    def _check_size(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images of shape [N, {self.config.in_channels}, H, W], got {tuple(x.shape)}")
        f, (h, w) = self.config.downsample_factor, x.shape[-2:]
        ph, pw = (-h) % f, (-w) % f
        if ph or pw:
            if self.config.odd_size == "error":
                raise ValueError(f"image size {h}x{w} is not a multiple of the downsampling factor {f}")
            if ph >= h or pw >= w:  # reflect padding needs pad < size
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            else:
                x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        return x, (h, w)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        if self.inference is not None and not torch.is_grad_enabled():
            return self.inference.encode(self, images)
        x, _ = self._check_size(images)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.inference is not None and not torch.is_grad_enabled():
            return self.inference.decode(self, latents)
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def forward(self, images: torch.Tensor, sample_posterior: bool = True, generator=None):
        """Reconstruct ``images``: returns ``(reconstruction, posterior)``.

        This is the training-facing call. Wrap *this* module in DDP (via
        ``accelerator.prepare``) so the whole encode -> decode graph is seen by
        the gradient hooks; calling ``unwrap_model(vae).encode`` would bypass them.
        (latentae's trainer prepares ``training.forward.TrainingForward(vae)``, the same
        computation plus the diffusability regularisers' extra decodes, for that reason.)
        """
        h, w = images.shape[-2:]
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)[..., :h, :w], posterior

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint every encoder/decoder block (and mid block) while gradients are on;
        same results, less activation memory (SD-size, 256 px: 0.44x), ~20% more compute. No effect under no_grad."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight (for the adaptive GAN weight)."""
        return self.decoder.conv_out.weight

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the normalised latents a diffusion model sees."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    """A freshly initialised VAE (PyTorch default init, as diffusers)."""
    return AutoencoderKL(cfg)


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


__all__ = ["ModelConfig", "AutoencoderKL", "DiagonalGaussian", "build_vae", "count_params"]
