"""Streamed encode / decode: the whole image, layer by layer, band by band; equal to untiled.

Why tiles that each normalise with their own statistics (diffusers' ``enable_tiling``)
show seams and tone shifts: every GroupNorm sees only its tile. Exact statistics need
the whole tensor at that layer before any of it can be normalised. So this module
runs the network *layer by layer over the whole image*, each layer in bands of rows:

* a layer reads its input band with one halo row above and below (3x3 convs) from the
  kept input tensor - no overlap to recompute, no seams: every pixel sees exactly
  what it sees untiled (zero rows only at the image border, as untiled);
* each band it writes is added to the output's ``ChannelMoments``, so when the
  layer is done the next group norm's image-wide statistics are ready;
* the layer's output is kept until the next layer has read it: in memory up to
  ``memory`` bytes, beyond that on disk (``latentae.activations``).

Work: one pass of the network (+ one halo row per band for the group-norm/SiLU in
front of a conv, and one statistics pass over each written tensor): ~1.0-1.1x an
untiled call, plus the disk traffic when activations spill. Memory: the kept tensors
(bounded by ``memory``) + one band's working set + the output. The mid-block
attention keeps K and V of all tokens in memory (at latent resolution:
2 x N x h x w x C, 1 GiB for an SD-size 4096 x 4096 decode in fp32) and runs the
queries band by band (the SDPA kernels are blocked: no tokens x tokens matrix).

Precision: the layers run in the dtype of their stage (``latentae.fast`` stage names,
the engine's ``upcast`` decisions). In half precision, a layer whose output is not
finite (its statistics say so) is recomputed in float32 from its input, which is
kept until then, and its stage is remembered as float32 on the engine.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from latentae.activations import Activation, ActivationStore, ChannelMoments, InMemory
from latentae.fast import InferenceEngine
from latentae.ops import VAEOps
from latentae.model import Attention, AutoencoderKL, Downsample, ResnetBlock, Upsample
from latentae.precision import HALF

Affine = tuple[torch.Tensor, torch.Tensor]


def norm_affine(m: nn.GroupNorm, moments: ChannelMoments, dtype: torch.dtype) -> Affine:
    """GroupNorm with image-wide statistics as one per-(sample, channel) scale and shift [N, C, 1, 1]."""
    mean, var = moments.group_stats(m.num_groups)  # float64 [N, G]
    n, g = mean.shape
    c = m.num_channels
    rstd = (var + m.eps).rsqrt()
    scale = m.weight.double().view(1, g, c // g) * rstd[..., None]  # [N, G, C/G]
    shift = m.bias.double().view(1, g, c // g) - mean[..., None] * scale
    work = torch.float32 if dtype in HALF else dtype  # half: scale-and-shift in fp32, no cancellation
    return scale.reshape(n, c, 1, 1).to(work), shift.reshape(n, c, 1, 1).to(work)


def apply_norm(x: torch.Tensor, affine: Affine, silu: bool) -> torch.Tensor:
    scale, shift = affine
    y = torch.addcmul(shift, x.to(scale.dtype), scale).to(x.dtype)
    return F.silu(y, inplace=True) if silu else y


def norm_into(dst: torch.Tensor, x: torch.Tensor, affine: Affine) -> None:
    """dst = GroupNorm(x) with the given scale and shift (in dst's dtype)."""
    scale, shift = affine
    if x.dtype == scale.dtype == dst.dtype:
        torch.addcmul(shift, x, scale, out=dst)
    else:
        dst.copy_(torch.addcmul(shift, x.to(scale.dtype), scale))


class Streamer:
    """One streamed call: the model, its engine (dtypes, caches), the store, the band height."""

    def __init__(
        self, vae: AutoencoderKL, engine: InferenceEngine, dtype: torch.dtype, store: ActivationStore,
        band_bytes: int, widths: dict[int, int], what: str,
    ):
        self.vae, self.engine, self.dtype, self.store = vae, engine, dtype, store
        self.band_bytes, self.widths, self.what = band_bytes, widths, what
        self.recomputed = False

    def bands(self, shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """Row bands of a tensor: as many rows as fit ``band_bytes`` in fp32 at the widest tensor of
        that resolution (``widths``: height -> channels), an even number (an upsampler's output band
        reads whole input rows). Every tensor of one resolution gets the same bands, so a layer's
        residual and its in-place output line up with how its input was written; low resolutions
        run in few large bands (efficient kernels)."""
        n, c, h, w = shape
        rows = max(2, self.band_bytes // (n * max(c, self.widths.get(h, c)) * w * 4) // 2 * 2)
        return [(r0, min(h, r0 + rows)) for r0 in range(0, h, rows)]

    def halo(self, o: VAEOps, x: Activation, r0: int, r1: int, pre: Affine | nn.Conv2d | None = None) -> torch.Tensor:
        """Rows [r0 - 1, r1 + 1) of ``x`` in ``o``'s dtype and memory format, with zero rows beyond
        the image (what a padded 3x3 conv sees there), through ``pre``: a group norm (its affine,
        then SiLU) or a 1x1 conv. Assembled in one buffer: no separate concatenation or padding."""
        n, _, h, w = x.shape
        a, b = max(0, r0 - 1), min(h, r1 + 1)
        top, bottom = 1 - (r0 - a), 1 - (b - r1)
        c = pre.out_channels if isinstance(pre, nn.Conv2d) else x.shape[1]
        buf = torch.empty((n, c, r1 - r0 + 2, w), dtype=o.dtype, device=x.device, memory_format=o.memory_format(c))
        row = top
        for p in x.pieces(a, b):
            dst = buf[:, :, row : row + p.shape[2]]
            if isinstance(pre, nn.Conv2d):
                dst.copy_(o.conv(pre, o.layout(p)))
            elif pre is not None:
                norm_into(dst, p, pre)
            else:
                dst.copy_(p)
            row += p.shape[2]
        if top:
            buf[:, :, :1].zero_()
        if bottom:
            buf[:, :, -1:].zero_()
        if pre is not None and not isinstance(pre, nn.Conv2d):
            F.silu(buf, inplace=True)  # silu(0) = 0: the zero rows stay zero
        return buf

    def op(self, stage: str, run: Callable[[VAEOps, bool], Activation]) -> Activation:
        """``run(ops, in_place_ok)`` in the stage's dtype. In half precision the input stays
        intact, so a non-finite output can be recomputed in float32 (and the stage remembered)."""
        dt = self.engine.stage_dtype(self.dtype, stage)
        guard = dt in HALF and self.engine.config.retry_fp32_on_nonfinite
        out = run(self.engine.ops(dt, self.store.device.type), not guard)
        if guard and not out.moments.finite():
            out.free()
            self.recomputed = True
            out = run(self.engine.ops(torch.float32, self.store.device.type), True)
            if out.moments.finite():  # else the input was bad: nothing to learn about the stage
                self.engine.mark_upcast(self.dtype, [stage], f"tiled {self.what}")
        return out

    def new(self, o: VAEOps, like: tuple[int, ...], channels: int, rows: int | None = None, cols: int | None = None):
        n, _, h, w = like
        return self.store.new((n, channels, rows or h, cols or w), o.dtype)

    # -- layers --------------------------------------------------------------
    def first_conv(self, stage: str, conv: nn.Conv2d, x: Activation, pre: nn.Conv2d | None = None) -> Activation:
        """[1x1 ``pre`` +] 3x3 ``conv`` on an input tensor (latents or images)."""

        def run(o: VAEOps, _: bool) -> Activation:
            out = self.new(o, x.shape, conv.out_channels)
            for r0, r1 in self.bands(x.shape):
                out.write(r0, o.conv(conv, self.halo(o, x, r0, r1, pre), pad_rows=False))
            return out

        return self.op(stage, run)

    def resnet(self, stage: str, r: ResnetBlock, x: Activation) -> Activation:
        def run(o: VAEOps, in_place: bool) -> Activation:
            aff1 = norm_affine(r.norm1, x.moments, o.dtype)
            hid = self.new(o, x.shape, r.conv1.out_channels)
            for r0, r1 in self.bands(x.shape):
                t = self.halo(o, x, r0, r1, aff1)
                hid.write(r0, o.conv(r.conv1, t, pad_rows=False))
            aff2 = norm_affine(r.norm2, hid.moments, o.dtype)
            # Band r0:r1 of the output reads only rows r0:r1 of x (the residual), so it may
            # replace them (fp32 only: in half precision x is kept for a float32 recompute).
            if in_place and r.conv_shortcut is None and x.dtype == o.dtype:
                out = x
                out.rewrite()
            else:
                out = self.new(o, x.shape, r.conv2.out_channels)
            for r0, r1 in self.bands(x.shape):
                xr = o.layout(x.rows(r0, r1))
                res = xr if r.conv_shortcut is None else o.conv(r.conv_shortcut, xr)
                t = self.halo(o, hid, r0, r1, aff2)
                out.write(r0, o.conv(r.conv2, t, residual=res, pad_rows=False))
            hid.free()
            return out

        return self._consume(x, self.op(stage, run))

    def attention(self, stage: str, a: Attention, x: Activation) -> Activation:
        def run(o: VAEOps, in_place: bool) -> Activation:
            n, c, h, w = x.shape
            aff = norm_affine(a.group_norm, x.moments, o.dtype)
            wqkv, bqkv = o.qkv(a)

            def tokens(xr: torch.Tensor) -> torch.Tensor:  # rows of x [N, C, r, W] -> normalised [N, r*W, C]
                return apply_norm(xr, aff, False).permute(0, 2, 3, 1).reshape(n, -1, c)

            k = torch.empty((n, h * w, c), dtype=o.dtype, device=x.device)
            v = torch.empty_like(k)
            for r0, r1 in self.bands(x.shape):
                kv = F.linear(tokens(o.layout(x.rows(r0, r1))), wqkv[c:], bqkv[c:])  # [N, r*W, 2C]
                k[:, r0 * w : r1 * w], v[:, r0 * w : r1 * w] = kv[..., :c], kv[..., c:]
            out = x if in_place and x.dtype == o.dtype else self.new(o, x.shape, c)
            if out is x:
                out.rewrite()  # band r0:r1 reads (queries, residual) only its own rows
            for r0, r1 in self.bands(x.shape):
                xr = o.layout(x.rows(r0, r1))  # read once: the queries and the residual
                q = F.linear(tokens(xr), wqkv[:c], bqkv[:c])
                y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
                y = F.linear(y, o.p(a.to_out[0].weight), o.p(a.to_out[0].bias))  # [N, r*W, C]
                y = y.view(n, r1 - r0, w, c).permute(0, 3, 1, 2) + xr
                out.write(r0, y)
            return out

        return self._consume(x, self.op(stage, run))

    def upsample(self, stage: str, u: Upsample, x: Activation) -> Activation:
        def run(o: VAEOps, _: bool) -> Activation:
            n, c, h, w = x.shape
            out = self.new(o, x.shape, c, 2 * h, 2 * w)
            for r0, r1 in self.bands(out.shape):  # output rows (even); they read rows r0/2 .. r1/2
                out.write(r0, o.upsample(u, self.halo(o, x, r0 // 2, r1 // 2), pad_rows=False))
            return out

        return self._consume(x, self.op(stage, run))

    def downsample(self, stage: str, d: Downsample, x: Activation) -> Activation:
        def run(o: VAEOps, _: bool) -> Activation:
            n, c, h, w = x.shape
            ho, wo = (h - 2) // 2 + 1, (w - 2) // 2 + 1  # 3x3 stride 2 after padding right/bottom by 1
            out = self.new(o, x.shape, c, ho, wo)
            for r0, r1 in self.bands((n, c, ho, wo)):
                a, b = 2 * r0, min(h, 2 * r1 + 1)  # output row i reads input rows 2i .. 2i+2
                # + the zero column (and at the end the zero row) of the right/bottom pad
                buf = torch.empty((n, c, 2 * (r1 - r0) + 1, w + 1), dtype=o.dtype, device=x.device,
                                  memory_format=o.memory_format(c))
                buf[:, :, :, w:].zero_()
                buf[:, :, b - a :].zero_()
                row = 0
                for p in x.pieces(a, b):
                    buf[:, :, row : row + p.shape[2], :w] = p
                    row += p.shape[2]
                out.write(r0, o.conv(d.conv, buf))
            return out

        return self._consume(x, self.op(stage, run))

    def level(self, stage: str, blk: nn.Module, x: Activation) -> Activation:
        for r in blk.resnets:
            x = self.resnet(stage, r, x)
        for d in getattr(blk, "downsamplers", None) or ():
            x = self.downsample(stage, d, x)
        for u in getattr(blk, "upsamplers", None) or ():
            x = self.upsample(stage, u, x)
        return x

    def mid(self, stage: str, m, x: Activation) -> Activation:
        x = self.resnet(stage, m.resnets[0], x)
        if m.attentions is not None:
            x = self.attention(stage, m.attentions[0], x)
        return self.resnet(stage, m.resnets[1], x)

    def norm_conv_out(
        self, stage: str, norm: nn.GroupNorm, conv: nn.Conv2d, x: Activation, post: nn.Conv2d | None = None
    ) -> Activation:
        """GroupNorm + SiLU + 3x3 ``conv`` [+ 1x1 ``post``] into an in-memory result."""

        def run(o: VAEOps, _: bool) -> Activation:
            n, _, h, w = x.shape
            aff = norm_affine(norm, x.moments, o.dtype)
            last = post if post is not None else conv
            out = self.store.new((n, last.out_channels, h, w), o.dtype, result=True)
            for r0, r1 in self.bands(x.shape):
                y = o.conv(conv, self.halo(o, x, r0, r1, aff), pad_rows=False)
                out.write(r0, o.conv(post, y) if post is not None else y)
            return out

        return self._consume(x, self.op(stage, run))

    def _consume(self, x: Activation, out: Activation) -> Activation:
        if out is not x:
            x.free()
        return out

    # -- halves --------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae, dec = self.vae, self.vae.decoder
        x = self.first_conv("decoder.in", dec.conv_in, InMemory.wrap(latents), pre=vae.post_quant_conv)
        x = self.mid("decoder.mid", dec.mid_block, x)
        for i, blk in enumerate(dec.up_blocks):
            x = self.level(f"decoder.up.{i}", blk, x)
        return self.norm_conv_out("decoder.out", dec.conv_norm_out, dec.conv_out, x).tensor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Padded images -> moments."""
        vae, enc = self.vae, self.vae.encoder
        x = self.first_conv("encoder.in", enc.conv_in, InMemory.wrap(images))
        for i, blk in enumerate(enc.down_blocks):
            x = self.level(f"encoder.down.{i}", blk, x)
        x = self.mid("encoder.mid", enc.mid_block, x)
        return self.norm_conv_out("encoder.out", enc.conv_norm_out, enc.conv_out, x, post=vae.quant_conv).tensor


def stream(
    what: str,
    vae: AutoencoderKL,
    engine: InferenceEngine,
    x: torch.Tensor,
    *,
    tile: int,
    memory: int | None,
    spill_dir=None,
    report: dict | None = None,
) -> torch.Tensor:
    """Streamed ``what`` ("decode": latents -> images, "encode": padded images -> moments).

    Bands hold half as many bytes as one ``tile`` x ``tile`` latent px tile's widest
    activation at full resolution (SD-size, tile 64: 134 MB in fp32); ``memory``, ``spill_dir``:
    see ``latentae.activations``. ``report`` (a dict) receives the peak bytes of kept
    activations in memory and on disk.
    """
    widths = _widths(vae, what, x.shape[-2])
    # Half of one tile's widest activation (fp32): a band's working set (its halo buffer, the conv
    # output, a read-back from disk, kernel temporaries) is then about two tiles' worth.
    band_bytes = tile_bytes(vae, what, tile, x.shape[0]) // 2
    dtype = engine.compute_dtype(vae)
    store = ActivationStore(x.device, memory, spill_dir)
    s = Streamer(vae, engine, dtype, store, band_bytes, widths, what)
    try:
        out = s.decode(x) if what == "decode" else s.encode(x)
    finally:
        store.close()
    if s.recomputed:
        engine.retries += 1
    if report is not None:
        report.update(peak_in_memory=store.peak_in_memory, peak_disk=store.peak_disk, band_bytes=band_bytes)
    return out


def tile_bytes(vae: AutoencoderKL, what: str, tile: int, n: int = 1) -> int:
    """Bytes of the widest full-resolution activation of ``n`` tiles of ``tile`` x ``tile`` latent px
    in a ``what`` ("decode" / "encode"), fp32: the unit bands and budgets are measured in."""
    f = vae.config.downsample_factor
    top = tile * f  # the full-resolution level of both networks
    return n * top**2 * _widths(vae, what, tile if what == "decode" else top)[top] * 4


def _widths(vae: AutoencoderKL, what: str, h: int) -> dict[int, int]:
    """Height -> channels of the widest tensor at that resolution, for a decode of latents of height
    ``h`` or an encode of (padded) images of height ``h``."""
    ch = vae.config.block_out_channels
    if what == "decode":
        rev = tuple(reversed(ch))  # level i runs at h * 2**i: its input (upsampled) and its own width
        return {h * 2**i: max(rev[max(i - 1, 0)], rev[i]) for i in range(len(rev))}
    return {h // 2**i: max(ch[max(i - 1, 0)], ch[i]) for i in range(len(ch))}  # level i at h / 2**i


__all__ = ["Streamer", "stream", "norm_affine", "apply_norm", "tile_bytes"]
