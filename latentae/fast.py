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
* 3x3 convs with >= 256 channels in and out: Winograd F(2x2, 3x3) on CPU fp32
  (``latentae.winograd``), with the bias and the residual add folded in;
* nearest-2x upsample + 3x3 conv computed as four 2x2 convs at the *low*
  resolution, interleaved (sub-pixel): 2.25x fewer MACs in the three upsampler
  convs, the largest convs of the decoder;
* in-place SiLU and residual adds: no fresh buffer per elementwise op (on CPU a
  fresh buffer costs page faults as well as bandwidth);
* fused q/k/v projection and the residual add folded into the output projection.

Precision (``latentae.precision``): a model computes in its own dtype unless a
``compute_dtype`` is asked for. In fp16/bf16 the forward runs as *stages* - the
encoder's conv_in, each down level, mid block, output; the decoder's input convs,
mid block, each up level, output - and when an output is not finite, the call is
recomputed stage by stage: a stage whose half-precision output is not finite
while its float32 output is, is recomputed in float32 *and remembered*
(``InferenceEngine.upcast``), so from then on that stage runs in float32 and the
rest in half precision: later calls run once. (The SD-1.x/SDXL decoder overflows
fp16 in its up levels and output, as diffusers' ``force_upcast`` and the SDXL
fp16-fix experience show; the stages that overflow are found by running, not by
a list.) Stage granularity: coarse enough that the float32 parts stay large
blocks, fine enough that the low-resolution part (mid block, attention) keeps
half precision. ``precision_record(vae)`` says what ran.

torch.compile (``compile_backend``, ``load_vae(..., compile=True)``) is off by
default: on CPU the first call compiles for minutes, which a one-shot
encode/decode never earns back. Compiled code is keyed on the per-stage dtypes,
so an upcast decision recompiles once.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentae.model import Attention, AutoencoderKL, DiagonalGaussian, Downsample, MidBlock, ResnetBlock, Upsample
from latentae.precision import HALF, cuda_capability, dtype_name, parse_dtype, resolve_compute_dtype
from latentae.winograd import winograd_conv3x3, winograd_kernels


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
    # None: the model's own dtype (the default; never lower behind the user's back).
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # In half precision, recompute stages whose output has inf/nan in float32 (and remember them).
    retry_fp32_on_nonfinite: bool = True
    # torch.compile backend for the whole encode/decode ("inductor"), or None for
    # eager. On CPU the first call compiles for minutes: only for long-running jobs.
    compile_backend: str | None = None

    def __post_init__(self):
        if self.channels_last_max_width is not None and self.channels_last_max_width < 1:
            raise ValueError(f"channels_last_max_width must be >= 1 or None, got {self.channels_last_max_width}")
        if self.winograd_min_channels is not None and self.winograd_min_channels < 1:
            raise ValueError(f"winograd_min_channels must be >= 1 or None, got {self.winograd_min_channels}")
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", dtype_name(parse_dtype(self.compute_dtype)))


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


# --------------------------------------------------------------------------- stages
# The unit of the precision decision. A stage is fn(ops, vae, x) -> x; the names are
# also what precision_record() reports and what latentae.streaming runs.

Stage = tuple[str, Callable[[VAEOps, AutoencoderKL, torch.Tensor], torch.Tensor]]


def _up(i: int, o: VAEOps, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return o.level(vae.decoder.up_blocks[i], x)


def _down(i: int, o: VAEOps, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return o.level(vae.encoder.down_blocks[i], x)


def decoder_stages(vae: AutoencoderKL) -> list[Stage]:
    stages: list[Stage] = [
        ("decoder.in", lambda o, m, z: o.decoder_in(m, z)),
        ("decoder.mid", lambda o, m, x: o.mid(m.decoder.mid_block, x)),
    ]
    stages += [(f"decoder.up.{i}", functools.partial(_up, i)) for i in range(len(vae.decoder.up_blocks))]
    return stages + [("decoder.out", lambda o, m, x: o.decoder_out(m, x))]


def encoder_stages(vae: AutoencoderKL) -> list[Stage]:
    stages: list[Stage] = [("encoder.in", lambda o, m, x: o.conv(m.encoder.conv_in, x))]
    stages += [(f"encoder.down.{i}", functools.partial(_down, i)) for i in range(len(vae.encoder.down_blocks))]
    return stages + [
        ("encoder.mid", lambda o, m, x: o.mid(m.encoder.mid_block, x)),
        ("encoder.out", lambda o, m, x: o.encoder_out(m, x)),
    ]


def _model_dtype(vae: AutoencoderKL) -> torch.dtype:
    return vae.decoder.conv_in.weight.dtype


def _model_device(vae: AutoencoderKL) -> torch.device:
    return vae.decoder.conv_in.weight.device


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class InferenceEngine:
    """The fast encode/decode for one model (see the module docstring)."""

    def __init__(self, config: FastConfig = FastConfig()):
        self.config = config
        self.cache = _Cache()
        self._compiled: dict[tuple, Callable] = {}
        # Per half dtype: the stages that overflowed it once and now run in float32.
        self.upcast: dict[torch.dtype, set[str]] = {}
        self.retries = 0  # calls whose output was not finite and were recomputed stage by stage

    # Copies and pickles carry the settings and the precision decisions, not the caches.
    def __getstate__(self):
        return {"config": self.config, "upcast": {dtype_name(k): sorted(v) for k, v in self.upcast.items()}}

    def __setstate__(self, state):
        self.__init__(state["config"])
        self.upcast = {parse_dtype(k): set(v) for k, v in state.get("upcast", {}).items()}

    # -- precision -----------------------------------------------------------
    def compute_dtype(self, vae: AutoencoderKL) -> torch.dtype:
        """The dtype a call on ``vae`` computes in (``latentae.precision.resolve_compute_dtype``);
        stages listed in ``upcast`` run in float32 instead."""
        device = _model_device(vae)
        return resolve_compute_dtype(
            _model_dtype(vae), device.type, self.config.compute_dtype, cuda_capability=cuda_capability(device)
        )

    def stage_dtype(self, dtype: torch.dtype, stage: str) -> torch.dtype:
        return torch.float32 if stage in self.upcast.get(dtype, ()) else dtype

    def mark_upcast(self, dtype: torch.dtype, stages: list[str], what: str) -> None:
        """Remember that ``stages`` overflow ``dtype``: they run in float32 from now on."""
        if not stages:
            return
        self.upcast.setdefault(dtype, set()).update(stages)
        warnings.warn(
            f"{what} in {dtype_name(dtype)} overflowed in {', '.join(stages)}; for this model these parts now run "
            f"in float32, the rest in {dtype_name(dtype)} (float32 parts: {', '.join(sorted(self.upcast[dtype]))})",
            RuntimeWarning,
            stacklevel=6,  # the caller of vae.decode / vae.encode
        )

    def precision_record(self, vae: AutoencoderKL) -> dict[str, Any]:
        """JSON-ready: what a call on ``vae`` computes in (see ``latentae.precision.precision_record``)."""
        dtype = self.compute_dtype(vae)
        return {
            "compute_dtype": dtype_name(dtype),
            "model_dtype": dtype_name(_model_dtype(vae)),
            "requested": self.config.compute_dtype,
            "upcast_to_float32": sorted(self.upcast.get(dtype, ())),
            "nonfinite_recomputes": self.retries,
            "fast_path": True,
        }

    # -- running -------------------------------------------------------------
    def ops(self, dtype: torch.dtype, cached: bool = True) -> VAEOps:
        c = self.config
        return VAEOps(
            dtype=dtype,
            channels_last=c.channels_last,
            channels_last_max_width=c.channels_last_max_width,
            subpixel_upsample=c.subpixel_upsample,
            winograd_min_channels=c.winograd_min_channels,
            cache=self.cache if cached else None,
        )

    def _forward(self, what: str, vae: AutoencoderKL, x: torch.Tensor, stages: list[Stage], dtypes: tuple):
        """One pass, each stage in its dtype (eager, or compiled per dtype plan)."""
        backend = self.config.compile_backend
        if backend is None:
            ops = {dt: self.ops(dt) for dt in set(dtypes)}
            for (_, fn), dt in zip(stages, dtypes):
                x = fn(ops[dt], vae, ops[dt].layout(x))
            return x
        key = (what, dtypes)
        if key not in self._compiled:
            ops = {dt: self.ops(dt, cached=False) for dt in set(dtypes)}  # compiled code derives weights inline

            def forward(vae_: AutoencoderKL, x_: torch.Tensor) -> torch.Tensor:
                for (_, fn), dt in zip(stages, dtypes):
                    x_ = fn(ops[dt], vae_, ops[dt].layout(x_))
                return x_

            self._compiled[key] = torch.compile(forward, backend=backend, dynamic=False)
        return self._compiled[key](vae, x)

    def _recover(self, what: str, vae: AutoencoderKL, x: torch.Tensor, stages: list[Stage], dtype: torch.dtype):
        """Stage by stage, checking each output: a stage that overflows ``dtype`` (non-finite in
        half precision, finite in float32) is recomputed from its input in float32 and remembered.
        A stage that is not finite in float32 either has a bad input: stop, return it as it is."""
        new = []
        for name, fn in stages:
            dt = self.stage_dtype(dtype, name)
            o = self.ops(dt)
            y = fn(o, vae, o.layout(x))
            if not _finite(y):
                if dt == torch.float32:
                    return y
                o32 = self.ops(torch.float32)
                y = fn(o32, vae, o32.layout(x))
                if not _finite(y):
                    return y
                new.append(name)
            x = y
        self.mark_upcast(dtype, new, what)
        return x

    def _call(self, what: str, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(vae)
        stages = decoder_stages(vae) if what == "decode" else encoder_stages(vae)
        dtypes = tuple(self.stage_dtype(dtype, name) for name, _ in stages)
        out = self._forward(what, vae, x, stages, dtypes)
        if self.config.retry_fp32_on_nonfinite and any(d in HALF for d in dtypes) and not _finite(out):
            self.retries += 1
            out = self._recover(what, vae, x, stages, dtype)
        return out.to(_model_dtype(vae)).contiguous()

    def decode(self, vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
        c = vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"expected latents of shape [N, {c}, h, w], got {tuple(latents.shape)}")
        return self._call("decode", vae, latents)

    def moments(self, vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
        """The encoder's output [N, 2C, h, w] (mean and logvar), images padded like ``vae.encode``."""
        x, _ = vae._check_size(images)
        return self._call("encode", vae, x)

    def encode(self, vae: AutoencoderKL, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(vae, images))


def optimize_for_inference(
    vae: AutoencoderKL,
    config: FastConfig = FastConfig(),
    *,
    compute_dtype: str | torch.dtype | None = None,
    compile: bool | None = None,
) -> AutoencoderKL:
    """Make ``vae.encode``/``vae.decode`` take the fast path under ``torch.no_grad()``.

    ``compute_dtype`` (float32 / bfloat16 / float16) and ``compile`` (torch.compile with
    inductor) override ``config``. Returns the same model (not a copy); parameters
    and ``state_dict()`` are unchanged. Undo with ``vae.inference = None``.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"optimize_for_inference expects a latentae AutoencoderKL, got {type(vae).__name__}")
    if compute_dtype is not None:
        config = replace(config, compute_dtype=dtype_name(parse_dtype(compute_dtype)))
    if compile is not None:
        config = replace(config, compile_backend="inductor" if compile else None)
    vae.inference = InferenceEngine(config)
    return vae


__all__ = [
    "FastConfig",
    "InferenceEngine",
    "VAEOps",
    "Stage",
    "decoder_stages",
    "encoder_stages",
    "optimize_for_inference",
    "subpixel_kernels",
]
