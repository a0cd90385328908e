"""The encoder/decoder forward as functions over the model's modules, with the exact fast paths.

``VAEOps`` is what ``latentae.fast`` (whole tensors) and ``latentae.streaming`` (bands of
rows) run; see ``latentae.fast`` for what each fast path does and why it is exact.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from latentae.model import Attention, AutoencoderKL, Downsample, MidBlock, ResnetBlock, Upsample
from latentae.winograd import winograd_conv3x3, winograd_kernels


def subpixel_kernels(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """3x3 conv after nearest-2x upsampling == four 2x2 convs on the low-res input.

    Output pixel (2i+a, 2j+b) only ever reads input rows {i-1, i} (a=0) or {i, i+1}
    (a=1), because the upsampled rows 2i-1, 2i, 2i+1 are input rows i-1, i, i.
    So the three kernel rows collapse to two: (w0, w1+w2) for a=0 and (w0+w1, w2)
    for a=1; same for columns. Zero padding of the upsampled image is zero padding
    of the input, so borders are exact too.

    weight [Co, Ci, 3, 3] -> [4*Co, Ci, 2, 2], phases ordered (a, b) = 00, 01, 10, 11.
    """
    r = weight.new_tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)  # [a, 2, 3]
    w = weight.double()
    k = torch.einsum("apk,oikl,bql->aboipq", r, w, r)  # [2, 2, Co, Ci, 2, 2]
    k = k.reshape(4 * weight.shape[0], weight.shape[1], 2, 2).to(weight.dtype)
    return k, (bias.repeat(4) if bias is not None else None)


class _Cache:
    """Tensors derived from parameters, invalidated when the parameter changes.

    Keyed on the parameter object (weakly: a dead parameter never matches) plus
    its data pointer and version counter, which every in-place update bumps
    (optimizer steps, ``load_state_dict``'s ``copy_``, ``.to()`` makes a new tensor).
    """

    def __init__(self):
        self._entries: dict[tuple, tuple[weakref.ref, int, int, object]] = {}

    def get(self, key: str, sources: tuple[torch.Tensor, ...], extra: tuple, make: Callable[[], object]):
        k = (key, tuple(id(s) for s in sources), extra)
        stamp = [(s.data_ptr(), s._version) for s in sources]
        hit = self._entries.get(k)
        if hit is not None:
            refs, old_stamp, value = hit
            if all(r() is s for r, s in zip(refs, sources)) and old_stamp == stamp:
                return value
        value = make()
        self._entries[k] = (tuple(weakref.ref(s) for s in sources), stamp, value)
        return value

    def clear(self):
        self._entries.clear()


class VAEOps:
    """The encoder/decoder forward written as functions over the model's modules.

    One instance per compute dtype: it fixes the dtype and the memory format.
    ``cache=None`` derives every weight inline (for ``torch.compile``, which must
    not see data pointers). ``latentae.streaming`` runs the same layers band by band.
    """

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        channels_last: bool = True,
        channels_last_max_width: int | None = None,
        subpixel_upsample: bool = True,
        winograd_min_channels: int | None = None,
        cache: _Cache | None = None,
    ):
        self.dtype, self.channels_last, self.subpixel = dtype, channels_last, subpixel_upsample
        self.cl_max = channels_last_max_width
        self.winograd_min_channels = winograd_min_channels
        self.cache = cache

    # -- parameters ---------------------------------------------------------
    def _derived(self, key: str, sources: tuple[torch.Tensor, ...], make: Callable[[], object]):
        if self.cache is None:
            return make()
        return self.cache.get(key, sources, (self.dtype,), make)

    def p(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A parameter in the compute dtype (cached cast when it differs)."""
        if t is None or t.dtype == self.dtype:
            return t
        return self._derived("cast", (t,), lambda: t.detach().to(self.dtype))

    def norm(self, m: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
        y = F.group_norm(x, m.num_groups, self.p(m.weight), self.p(m.bias), m.eps)
        return F.silu(y, inplace=True) if silu else y  # y is ours: no second buffer

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """An input in the compute dtype and this tensor width's memory format."""
        return self.fmt(x.to(self.dtype))

    def memory_format(self, width: int) -> torch.memory_format:
        cl = self.channels_last and (self.cl_max is None or width <= self.cl_max)
        return torch.channels_last if cl else torch.contiguous_format

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format(x.shape[1]))  # no-op when already so

    # -- layers -------------------------------------------------------------
    def winograd_ok(self, m: nn.Conv2d, x: torch.Tensor) -> bool:
        return (
            self.winograd_min_channels is not None
            and self.cache is not None
            and x.device.type == "cpu"
            and self.dtype == torch.float32
            and m.kernel_size == (3, 3)
            and m.stride == (1, 1)
            and m.padding == (1, 1)
            and m.dilation == (1, 1)
            and m.groups == 1
            and min(m.in_channels, m.out_channels) >= self.winograd_min_channels
        )

    def conv(
        self, m: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None, pad_rows: bool = True
    ) -> torch.Tensor:
        """conv(x) [+ residual]; the add is folded into the Winograd output pass.

        ``pad_rows=False``: no zero padding above and below (``x`` carries halo rows)."""
        if self.winograd_ok(m, x):
            u = self._derived("winograd", (m.weight,), lambda: winograd_kernels(m.weight.detach()))
            return self.fmt(winograd_conv3x3(x, u, self.p(m.bias), residual, pad_rows=pad_rows))
        padding = m.padding if pad_rows else (0, m.padding[1])
        out = F.conv2d(x, self.p(m.weight), self.p(m.bias), m.stride, padding)
        if residual is not None:
            out += residual  # == residual + out bit for bit; saves a buffer
        return out

    def resnet(self, r: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
        x = self.fmt(x)
        h = self.conv(r.conv1, self.norm(r.norm1, x, True))
        h = self.norm(r.norm2, h, True)
        shortcut = x if r.conv_shortcut is None else self.conv(r.conv_shortcut, x)
        return self.conv(r.conv2, h, residual=shortcut)

    def qkv(self, a: Attention) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused q/k/v projection (weight [3C, C], bias [3C])."""
        return self._derived(
            "qkv",
            (a.to_q.weight, a.to_k.weight, a.to_v.weight, a.to_q.bias, a.to_k.bias, a.to_v.bias),
            lambda: (
                torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]).detach().to(self.dtype),
                torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]).detach().to(self.dtype),
            ),
        )

    def attention(self, a: Attention, x: torch.Tensor) -> torch.Tensor:
        x = self.fmt(x)
        n, c, hh, ww = x.shape
        t = self.norm(a.group_norm, x, False)
        tokens = t.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # a view when channels-last
        w, b = self.qkv(a)
        qkv = F.linear(tokens, w, b)  # [N, HW, 3C]
        del t, tokens
        q, k, v = qkv[:, None].split(c, dim=-1)  # [N, 1, HW, C] each
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]
        del qkv, q, k, v
        out = F.linear(o, self.p(a.to_out[0].weight), self.p(a.to_out[0].bias))  # [N, HW, C]
        out += x.permute(0, 2, 3, 1).reshape(n, hh * ww, c)
        out = out.view(n, hh, ww, c).permute(0, 3, 1, 2)  # channels-last [N, C, H, W]
        return self.fmt(out)

    def mid(self, m: MidBlock, x: torch.Tensor) -> torch.Tensor:
        x = self.resnet(m.resnets[0], x)
        if m.attentions is not None:
            x = self.attention(m.attentions[0], x)
        return self.resnet(m.resnets[1], x)

    def downsample(self, d: Downsample, x: torch.Tensor) -> torch.Tensor:
        return self.conv(d.conv, F.pad(x, (0, 1, 0, 1)))

    def upsample(self, u: Upsample, x: torch.Tensor, pad_rows: bool = True) -> torch.Tensor:
        """Nearest 2x + 3x3 conv. ``pad_rows=False``: ``x`` has one halo row above and below,
        and the output covers only the rows between them (2 x (rows - 2))."""
        x = self.fmt(x)
        if not self.subpixel:
            y = self.conv(u.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"), pad_rows=pad_rows)
            return y if pad_rows else y[:, :, 1:-1]  # the halo rows upsample to 2 rows each
        n, _, h, w = x.shape
        h = h if pad_rows else h - 2  # low-res rows produced

        def make():
            k, b = subpixel_kernels(u.conv.weight.detach(), u.conv.bias)
            return k.to(self.dtype), (b.detach().to(self.dtype) if b is not None else None)

        kernel, bias = self._derived("subpixel", (u.conv.weight, u.conv.bias), make)
        co = kernel.shape[0] // 4
        # Output position p of a 2x2 conv on the 1-padded input reads rows p-1, p:
        # phase a=0 wants rows (i-1, i) -> p = i; phase a=1 wants (i, i+1) -> p = i+1.
        # Unpadded rows (a halo row on each side) give the same indexing.
        phases = F.conv2d(x, kernel, bias, padding=(1 if pad_rows else 0, 1))  # [N, 4Co, h+1, W+1]
        fmt = self.memory_format(co)
        y = torch.empty((n, co, 2 * h, 2 * w), dtype=phases.dtype, device=phases.device, memory_format=fmt)
        y6 = y.view(n, co, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                p = 2 * a + b
                y6[:, :, :, a, :, b] = phases[:, p * co : (p + 1) * co, a : a + h, b : b + w]
        return y

    def level(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for r in blk.resnets:
            x = self.resnet(r, x)
        for d in getattr(blk, "downsamplers", None) or ():
            x = self.downsample(d, x)
        for u in getattr(blk, "upsamplers", None) or ():
            x = self.upsample(u, x)
        return x

    # -- halves -------------------------------------------------------------
    def decoder_in(self, vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv + conv_in: [N, C, h, w] -> [N, W0, h, w]."""
        z = self.layout(z)
        if vae.post_quant_conv is not None:
            z = self.conv(vae.post_quant_conv, z)
        return self.conv(vae.decoder.conv_in, z)

    def decoder_out(self, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        dec = vae.decoder
        return self.conv(dec.conv_out, self.norm(dec.conv_norm_out, x, True))

    def encoder_out(self, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        """conv_norm_out + conv_out + quant_conv: -> moments [N, 2C, h, w]."""
        enc = vae.encoder
        m = self.conv(enc.conv_out, self.norm(enc.conv_norm_out, x, True))
        return self.conv(vae.quant_conv, m) if vae.quant_conv is not None else m


__all__ = ["VAEOps", "subpixel_kernels"]
