"""Fast inference for ``AutoencoderKL``: same weights, same results, less work.

``optimize_for_inference(vae)`` attaches an :class:`InferenceEngine` to the model.
From then on ``vae.encode`` / ``vae.decode`` (and ``vae(images)``) take the fast
path whenever autograd is off (``torch.no_grad()`` / ``torch.inference_mode()``);
with gradients on, the plain modules run unchanged, so a model returned by
``load_vae`` can still be trained. ``state_dict()`` is untouched: the engine owns
no parameters, only caches derived from them, keyed on each parameter's storage
and version counter so that an optimizer step or ``load_state_dict`` invalidates
them.

What the fast path does differently (every item is exact up to float rounding,
checked against the plain modules in ``tests/test_fast.py``):

* channels-last activations: oneDNN's convolutions run 10-25 % faster in NHWC
  at 128/256 channels, and the attention tokens become a free view. (oneDNN's
  NHWC fp32 kernels round ~5x more than its NCHW ones - still ~2e-6 relative per
  conv; ``channels_last_max_width`` keeps wide tensors NCHW if that matters.)
* 3x3 convs with >= 256 channels in and out: Winograd F(2x2, 3x3) on CPU fp32,
  2.25x fewer multiplies, run in cache-sized bands of tile rows with the bias and
  the residual add folded into the output transform: ~1.4x faster than oneDNN's
  direct conv at 512 channels, ~1.15x at 256 (slower at 128, so not used there);
* nearest-2x upsample + 3x3 conv computed as four 2x2 convs at the *low*
  resolution, interleaved (sub-pixel): 2.25x fewer MACs in the three upsampler
  convs, the largest convs of the decoder;
* in-place SiLU and residual adds: no fresh buffer per elementwise op (on CPU a
  fresh buffer costs page faults as well as bandwidth);
* fused q/k/v projection and the residual add folded into the output projection.

torch.compile (``compile_backend``) is off by default: on CPU the first call
compiles for minutes, which a one-shot encode/decode never earns back.

Half precision: when the compute dtype is fp16/bf16 and an output is not finite
(the SD-1.x/SDXL VAE overflows fp16 in the decoder), the call is repeated in
fp32 and a warning is issued once per model. ``compute_dtype="auto"`` computes in
bf16 for an fp32 model on CUDA (with that retry) and in the model's dtype
elsewhere, so CPU results match the plain fp32 path within 1e-4.

The building blocks (:class:`VAEOps`) take a pluggable group-norm function so
that ``latentae.tiling`` can run the same code per tile with image-wide
statistics.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from latentae.model import Attention, AutoencoderKL, DiagonalGaussian, Downsample, MidBlock, ResnetBlock, Upsample

_HALF = (torch.float16, torch.bfloat16)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class FastConfig:
    # NHWC activations (exact; faster convs on CPU oneDNN and on GPU tensor cores).
    channels_last: bool = True
    # Only tensors at most this wide go NHWC (None: all); see the module docstring.
    channels_last_max_width: int | None = None
    # Nearest-2x upsample + 3x3 conv as four 2x2 convs + pixel interleave (exact).
    subpixel_upsample: bool = True
    # 3x3 convs at least this wide (in and out) use Winograd F(2x2,3x3) on CPU fp32:
    # 2.25x fewer MACs, ~1.4x faster at 512 channels, ~1.15x at 256, slower at 128.
    # None: off.
    winograd_min_channels: int | None = 256
    # "auto": bf16 for an fp32 model on CUDA, the model's own dtype elsewhere.
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Repeat a half-precision call in fp32 when its output has inf/nan.
    retry_fp32_on_nonfinite: bool = True
    # torch.compile backend for the whole encode/decode ("inductor"), or None for
    # eager. On CPU the first call compiles for minutes: only for long-running jobs.
    compile_backend: str | None = None

    def __post_init__(self):
        if self.channels_last_max_width is not None and self.channels_last_max_width < 1:
            raise ValueError(f"channels_last_max_width must be >= 1 or None, got {self.channels_last_max_width}")
        if self.winograd_min_channels is not None and self.winograd_min_channels < 1:
            raise ValueError(f"winograd_min_channels must be >= 1 or None, got {self.winograd_min_channels}")
        if self.compute_dtype not in ("auto", *_DTYPES):
            raise ValueError(f"compute_dtype must be auto/float32/bfloat16/float16, got {self.compute_dtype!r}")


class NormFn(Protocol):
    """``(module, x, silu) -> GroupNorm(x) [then SiLU]``; tiling swaps in image-wide statistics."""

    def __call__(self, m: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor: ...


def group_norm(m: nn.GroupNorm, x: torch.Tensor, silu: bool, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    y = F.group_norm(x, m.num_groups, weight, bias, m.eps)
    return F.silu(y, inplace=True) if silu else y  # y is ours: no second buffer


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


# Winograd F(2x2, 3x3) (Lavin & Gray 2015): a 2x2 output tile of a 3x3 conv from a 4x4
# input tile with 16 multiplies per (ci, co) pair instead of 36, i.e. 2.25x fewer MACs.
#   Y = A^T [ (G g G^T) * (B^T d B) ] A      (elementwise * over the 4x4 tile)
# The transforms only use 0, +-1 and 0.5, so in fp32 the result agrees with a direct
# conv to ~1e-6 relative (the same order as oneDNN's own NHWC-vs-NCHW difference).
WINOGRAD_BAND_BYTES = 8 << 20  # 2-16 MiB measured on a 2-core Xeon: 4-8 best quiet, larger under load
_WINO_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_kernels(weight: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3] -> U [16, Ci, Co] = G g G^T per (ci, co), laid out for bmm."""
    g = torch.tensor(_WINO_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.double(), g)  # [4, 4, Ci, Co]
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _winograd_transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B^T kron B^T [16, 16], A^T kron A^T [4, 16]): the 2-D transforms as one matrix each."""
    bt = torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=dtype, device=device)
    at = torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=dtype, device=device)
    return torch.kron(bt, bt), torch.kron(at, at)


def winograd_conv3x3(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    band_bytes: int | None = None,
) -> torch.Tensor:
    """conv2d(x, w, bias, padding=1) [+ residual] via Winograd F(2x2, 3x3); NHWC output.

    Works on bands of tile rows (~``band_bytes`` of transformed input each) so that
    the 4x larger transformed input stays cache-sized: unbanded, the transforms are
    memory bound and the whole thing is slower than oneDNN's direct conv. Per band:
    one gather of the 4x4 input tiles, the input transform as one [16, 16] matmul,
    the 16 tile-position GEMMs as one bmm, the output transform as one [4, 16]
    matmul, one write (+ residual, + bias). Few large ops: many small ones stall
    on a loaded machine, where every op waits for all of its threads.
    x [N, Ci, H, W] (any memory format), u from ``winograd_kernels``.
    """
    n, ci, h, w = x.shape
    co = u.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2  # output tiles
    # NHWC, zero-padded by 1 (plus 1 more on odd sizes): tile (i, j) reads rows 2i..2i+3.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2 * tw + 1 - w, 1, 2 * th + 1 - h))  # [N, 2th+2, 2tw+2, Ci]
    s_n, s_h, s_w, s_c = xp.stride()
    y = torch.empty((n, th, 2, tw, 2, co), dtype=x.dtype, device=x.device)  # NHWC with the 2x2 split out
    res = None
    if residual is not None:
        rp = residual.permute(0, 2, 3, 1)
        if 2 * th != h or 2 * tw != w:
            rp = F.pad(rp, (0, 0, 0, 2 * tw - w, 0, 2 * th - h))
        res = rp.reshape(n, th, 2, tw, 2, co)  # a view when residual is NHWC and even-sized
    k16, a16 = _winograd_transforms(x.dtype, x.device)
    band_tiles = (band_bytes or WINOGRAD_BAND_BYTES) // (16 * ci * x.element_size())
    rows = max(1, band_tiles // (tw * n))
    for t0 in range(0, th, rows):
        r = min(rows, th - t0)
        # [4 (ky), 4 (kx), N, r, tw, Ci] view of the overlapping 4x4 tiles; reshape gathers it once.
        d = xp[:, 2 * t0 :].as_strided((4, 4, n, r, tw, ci), (s_h, s_w, s_n, 2 * s_h, 2 * s_w, s_c))
        v = (k16 @ d.reshape(16, -1)).view(16, n * r * tw, ci)  # B^T d B per tile
        m = torch.bmm(v, u)  # [16, tiles, Co]
        del v
        o = (a16 @ m.view(16, -1)).view(2, 2, n, r, tw, co).permute(2, 3, 0, 4, 1, 5)  # A^T m A: [N, r, 2, tw, 2, Co]
        del m
        dst = y[:, t0 : t0 + r]
        if res is not None:
            torch.add(o, res[:, t0 : t0 + r], out=dst)
        else:
            dst.copy_(o)
        if bias is not None:
            dst += bias
    y = y.view(n, 2 * th, 2 * tw, co)
    if 2 * th != h or 2 * tw != w:
        y = y[:, :h, :w].contiguous()
    return y.permute(0, 3, 1, 2)  # [N, Co, H, W], channels-last


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

    One instance per call: it fixes the compute dtype, the memory format and the
    group-norm function. ``cache=None`` derives every weight inline (for
    ``torch.compile``, which must not see data pointers).
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
        norm: NormFn | None = None,
    ):
        self.dtype, self.channels_last, self.subpixel = dtype, channels_last, subpixel_upsample
        self.cl_max = channels_last_max_width
        self.winograd_min_channels = winograd_min_channels
        self.cache = cache
        self.norm: NormFn = norm if norm is not None else self.plain_norm

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

    def plain_norm(self, m: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
        return group_norm(m, x, silu, self.p(m.weight), self.p(m.bias))

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
        # CPU fp32 only: cuDNN has its own fast algorithms, and half-precision
        # transforms would lose the accuracy that makes this exact enough.
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

    def conv(self, m: nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """conv(x) [+ residual]; the add is folded into the Winograd output pass."""
        if self.winograd_ok(m, x):
            u = self._derived("winograd", (m.weight,), lambda: winograd_kernels(m.weight.detach()))
            return self.fmt(winograd_conv3x3(x, u, self.p(m.bias), residual))
        out = F.conv2d(x, self.p(m.weight), self.p(m.bias), m.stride, m.padding)
        if residual is not None:
            out += residual  # == residual + out bit for bit; saves a buffer
        return out

    def resnet(self, r: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
        x = self.fmt(x)
        h = self.conv(r.conv1, self.norm(r.norm1, x, True))
        h = self.norm(r.norm2, h, True)
        shortcut = x if r.conv_shortcut is None else self.conv(r.conv_shortcut, x)
        return self.conv(r.conv2, h, residual=shortcut)

    def attention(self, a: Attention, x: torch.Tensor) -> torch.Tensor:
        x = self.fmt(x)
        n, c, hh, ww = x.shape
        t = self.norm(a.group_norm, x, False)
        tokens = t.permute(0, 2, 3, 1).reshape(n, hh * ww, c)  # a view when channels-last
        w, b = self._derived(
            "qkv",
            (a.to_q.weight, a.to_k.weight, a.to_v.weight, a.to_q.bias, a.to_k.bias, a.to_v.bias),
            lambda: (
                torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight]).detach().to(self.dtype),
                torch.cat([a.to_q.bias, a.to_k.bias, a.to_v.bias]).detach().to(self.dtype),
            ),
        )
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

    def upsample(self, u: Upsample, x: torch.Tensor) -> torch.Tensor:
        x = self.fmt(x)
        if not self.subpixel:
            return self.conv(u.conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))
        n, _, h, w = x.shape
        def make():
            k, b = subpixel_kernels(u.conv.weight.detach(), u.conv.bias)
            return k.to(self.dtype), (b.detach().to(self.dtype) if b is not None else None)

        kernel, bias = self._derived("subpixel", (u.conv.weight, u.conv.bias), make)
        co = kernel.shape[0] // 4
        # Output position p of a 2x2 conv on the 1-padded input reads rows p-1, p:
        # phase a=0 wants rows (i-1, i) -> p = i; phase a=1 wants (i, i+1) -> p = i+1.
        phases = F.conv2d(x, kernel, bias, padding=1)  # [N, 4Co, H+1, W+1]
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

    def decode(self, vae: AutoencoderKL, z: torch.Tensor) -> torch.Tensor:
        dec = vae.decoder
        x = self.mid(dec.mid_block, self.decoder_in(vae, z))
        for blk in dec.up_blocks:
            x = self.level(blk, x)
        return self.decoder_out(vae, x)

    def encoder_out(self, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        """conv_norm_out + conv_out + quant_conv: -> moments [N, 2C, h, w]."""
        enc = vae.encoder
        m = self.conv(enc.conv_out, self.norm(enc.conv_norm_out, x, True))
        return self.conv(vae.quant_conv, m) if vae.quant_conv is not None else m

    def encode(self, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        """Padded images -> moments."""
        enc = vae.encoder
        x = self.conv(enc.conv_in, self.layout(x))
        for blk in enc.down_blocks:
            x = self.level(blk, x)
        return self.encoder_out(vae, self.mid(enc.mid_block, x))


def _model_dtype(vae: AutoencoderKL) -> torch.dtype:
    return vae.decoder.conv_in.weight.dtype


def _model_device(vae: AutoencoderKL) -> torch.device:
    return vae.decoder.conv_in.weight.device


class InferenceEngine:
    """The fast encode/decode for one model (see the module docstring)."""

    def __init__(self, config: FastConfig = FastConfig()):
        self.config = config
        self.cache = _Cache()
        self._warned = False
        self._compiled: dict[str, Callable] = {}
        self.retries = 0  # how many calls fell back to fp32 (for tests and logs)

    # Copies and pickles carry the settings, not the caches.
    def __getstate__(self):
        return {"config": self.config}

    def __setstate__(self, state):
        self.__init__(state["config"])

    def compute_dtype(self, vae: AutoencoderKL) -> torch.dtype:
        want, model = self.config.compute_dtype, _model_dtype(vae)
        if want != "auto":
            return _DTYPES[want]
        device = _model_device(vae)
        if device.type == "cuda" and model == torch.float32 and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return model

    def ops(self, dtype: torch.dtype, norm: NormFn | None = None, cached: bool = True) -> VAEOps:
        c = self.config
        return VAEOps(
            dtype=dtype,
            channels_last=c.channels_last,
            channels_last_max_width=c.channels_last_max_width,
            subpixel_upsample=c.subpixel_upsample,
            winograd_min_channels=c.winograd_min_channels,
            cache=self.cache if cached else None,
            norm=norm,
        )

    def _run(self, what: str, vae: AutoencoderKL, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        backend = self.config.compile_backend
        if backend is None:
            ops = self.ops(dtype)
            return ops.decode(vae, x) if what == "decode" else ops.encode(vae, x)
        key = f"{what}:{dtype}"
        if key not in self._compiled:
            ops = self.ops(dtype, cached=False)  # compiled code derives weights inline
            self._compiled[key] = torch.compile(getattr(ops, what), backend=backend, dynamic=False)
        return self._compiled[key](vae, x)

    def _with_retry(self, what: str, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(vae)
        out = self._run(what, vae, x, dtype)
        if dtype in _HALF and self.config.retry_fp32_on_nonfinite and not bool(torch.isfinite(out).all()):
            if not self._warned:
                warnings.warn(
                    f"{what} in {str(dtype).removeprefix('torch.')} produced inf/nan; repeating it in float32 "
                    "(this VAE overflows half precision; warned once per model)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned = True
            self.retries += 1
            out = self._run(what, vae, x, torch.float32)
        return out.to(_model_dtype(vae)).contiguous()

    def decode(self, vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
        c = vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"expected latents of shape [N, {c}, h, w], got {tuple(latents.shape)}")
        return self._with_retry("decode", vae, latents)

    def encode(self, vae: AutoencoderKL, images: torch.Tensor) -> DiagonalGaussian:
        x, _ = vae._check_size(images)
        return DiagonalGaussian(self._with_retry("encode", vae, x))


def optimize_for_inference(vae: AutoencoderKL, config: FastConfig = FastConfig()) -> AutoencoderKL:
    """Make ``vae.encode``/``vae.decode`` take the fast path under ``torch.no_grad()``.

    Returns the same model (not a copy); parameters and ``state_dict()`` are
    unchanged. Undo with ``vae.inference = None``.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"optimize_for_inference expects a latentae AutoencoderKL, got {type(vae).__name__}")
    vae.inference = InferenceEngine(config)
    return vae


def conv_flops(vae: AutoencoderKL, what: Literal["encode", "decode"], size: int) -> float:
    """Multiply-adds x 2 of the plain forward for one ``size`` x ``size`` image (for GFLOP/s)."""
    from torch.utils.flop_counter import FlopCounterMode

    f = vae.config.downsample_factor
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta = torch.device("meta")
        if what == "decode":
            z = torch.zeros(1, vae.config.latent_channels, math.ceil(size / f), math.ceil(size / f), device=meta)
            _meta_forward(vae, "decode", z)
        else:
            _meta_forward(vae, "encode", torch.zeros(1, vae.config.in_channels, size, size, device=meta))
    return float(counter.get_total_flops())


def _meta_forward(vae: AutoencoderKL, what: str, x: torch.Tensor) -> None:
    """Run the plain forward of a meta-device twin (no memory, no time)."""
    with torch.device("meta"):
        twin = AutoencoderKL(vae.config)
    getattr(twin, what)(x)


# --------------------------------------------------------------------------- measuring
# Shared by tools/bench.py and tools/bench_tiling.py. CPU memory: tracemalloc does
# not see torch's allocations, so we read the kernel's resident-set high-water mark.


class PeakRSS:
    """Peak extra resident memory (bytes) of the code inside ``with``, Linux only.

    Three witnesses, the largest wins (each one can only under-report):
    1. the kernel's high-water mark: reset on entry (``/proc/self/clear_refs`` = 5),
       ``VmHWM`` - ``VmRSS``(entry) on exit; ``exact`` says the reset was accepted;
    2. ``ru_maxrss`` growth, which only sees a peak above the process's earlier ones
       (so: run it in a fresh process, as the benchmarks do);
    3. ``VmRSS`` polled every ``poll_s`` by a thread, for sandboxes that refuse (1).
    Memory the allocator kept from earlier calls is reused unseen by all three.
    ``reset=False`` skips (1), to test the fallbacks.
    """

    def __init__(self, reset: bool = True, poll_s: float = 0.001):
        self.reset, self.poll_s = reset, poll_s

    def __enter__(self):
        import threading

        self.exact = False
        if self.reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.exact = True
            except OSError:
                pass
        self.start = _status_kb("VmRSS") * 1024
        if self.exact:  # a reset that was accepted but ignored would report an old peak
            self.exact = _status_kb("VmHWM") * 1024 <= self.start + (16 << 20)
        self.start_max = _maxrss_bytes()
        self.peak_bytes = self.peak_total_bytes = 0
        self._polled, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(self.poll_s):
            try:
                self._polled = max(self._polled, _status_kb("VmRSS") * 1024)
            except OSError:
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        polled = max(self._polled, _status_kb("VmRSS") * 1024)
        maxrss = _maxrss_bytes()  # counts only if it grew inside the block
        total = max(polled, maxrss if maxrss > self.start_max else 0)
        if self.exact:
            hwm = _status_kb("VmHWM") * 1024
            total = max(total, hwm if hwm >= self.start else 0)
        self.peak_total_bytes = total
        self.peak_bytes = max(0, total - self.start)
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each fn, run round-robin (rotating the order each round) so
    that load from other processes hits every contender alike."""
    import statistics
    import time

    names, times = list(fns), {k: [] for k in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def conv_peak_gflops(channels: int = 512, size: int = 64, repeats: int = 5, device: str = "cpu") -> float:
    """Achieved GFLOP/s of one big 3x3 conv (the best of NCHW and NHWC): the machine's practical ceiling."""
    x = torch.randn(1, channels, size, size, device=device)
    w = torch.randn(channels, channels, 3, 3, device=device) / (3 * channels**0.5)
    xl = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(inp):
        def f():
            F.conv2d(inp, w, padding=1)
            sync()

        return f

    with torch.no_grad():
        run(x)(), run(xl)()  # primitive creation
        t = interleaved_medians({"nchw": run(x), "nhwc": run(xl)}, repeats)
    return 2 * size * size * 9 * channels * channels / min(t.values()) / 1e9


__all__ = [
    "FastConfig",
    "InferenceEngine",
    "VAEOps",
    "NormFn",
    "optimize_for_inference",
    "subpixel_kernels",
    "winograd_kernels",
    "winograd_conv3x3",
    "conv_flops",
    "PeakRSS",
    "interleaved_medians",
    "conv_peak_gflops",
]
