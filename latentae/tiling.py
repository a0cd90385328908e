"""Tiled encode / decode: memory bounded by the tile, results close to untiled.

Why naive tiling (diffusers' ``enable_tiling``) shows seams and tone shifts: every
GroupNorm normalises with the statistics of *its own tile*, and the mid-block
attention only sees its own tile. Blending the overlaps hides the seams, not the
differences in brightness and contrast.

What this module does instead (decode; encode is the mirror image):

1. Everything at latent resolution - ``post_quant_conv``, ``conv_in``, the mid block
   with its attention, the resnets of the first up level - runs on the *whole*
   latent, in row bands: group-norm statistics over the whole tensor first, 3x3
   convs with a one-row halo, attention with K and V for all tokens and the
   queries band by band (the CPU SDPA kernel is blocked: no tokens x tokens
   matrix). Exact, and cheap at 1/8 resolution (4096 px: 0.5 GiB per tensor).
2. The upsampling levels run tile by tile from that tensor. Tiles overlap by
   ``overlap`` latent px and each keeps only its core (the overlap split down the
   middle): every kept pixel is >= overlap/2 from a cut. The default 16 leaves 8
   latent px, more than the ~5 px receptive field of those levels in the SD
   decoder, so cutting adds no error by itself.
3. Every group norm of the tiled levels uses *image-wide* statistics, from
   ``stats=``
   * ``"exact"`` (default): as many tiles as ``stats_memory`` allows (default 2 GiB)
     run side by side as one batch, every norm pooling its statistics over all of
     their cores. If that is all tiles, the batch *is* the result: exact, in one
     pass (the tiny demo VAE at 2048 px: all 25 tiles fit). Otherwise one tile at
     a time with a pass per norm layer, each pass stopping at the first layer whose
     statistics are still unknown: exact with one tile in memory, but ~(layers / 2
     + 1) x the work (19 norm layers in the SD decoder's tiled levels), with a
     warning that says so.
   * ``"sample"``: the same batch, evenly spread tiles; when not all fit, their
     statistics serve every tile: an estimate, for ~1 extra batch of work. Good
     only when the batch covers much of the image: measured on photos with the
     demo VAE, ~40-43 dB vs untiled with 12 of 25 tiles but 25-30 dB (visible tone
     shifts) with 2 of 9 or 25.
   * ``"proxy"``: statistics of the tiled levels run untiled on a strided subsample
     (decode) or area-downscaled copy (encode) of ``proxy_size``: cheap, ~30-50 dB.
   * ``"tile"``: each tile's own statistics, like diffusers; for comparison.

Memory: the latent-resolution tensor + one tile (or the statistics batch) + the
output. Time: tiles overlap, ~(tile / (tile - overlap))^2 x the tiled levels' work.

``tiled_decode(vae, latents, tile=64, overlap=16)``: tile / overlap in latent px.
``tiled_encode(vae, images, tile=512, overlap=128)``: tile / overlap in image px.
Both fall back to the plain call when one tile covers the input. Measured numbers:
``tools/bench_tiling.py``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from latentae.fast import FastConfig, InferenceEngine, VAEOps
from latentae.model import Attention, AutoencoderKL, DiagonalGaussian, ResnetBlock

Stats = Literal["exact", "sample", "proxy", "tile"]
NormFnLike = Callable[[nn.GroupNorm, torch.Tensor, bool], torch.Tensor]
BAND_BYTES = 64 << 20  # per band of a full-tensor op at latent resolution


# --------------------------------------------------------------------------- statistics


class ChannelMoments:
    """Running per-(sample, channel) count, sum and sum of squares, in float64."""

    def __init__(self):
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add every pixel of ``x`` [N, C, h, w]."""
        n = x.shape[-1] * x.shape[-2]
        if n == 0:
            return
        mean, var = _channel_moments(x)
        s, sq = mean * n, (var + mean * mean) * n
        if self.sum is None:
            self.sum, self.sumsq = s, sq
        else:
            self.sum += s
            self.sumsq += sq
        self.count += n

    def group_stats(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) per [N, G]: pooled over the group's channels (equal counts each)."""
        if self.sum is None:
            raise RuntimeError("no pixels were accumulated")
        n, c = self.sum.shape
        m = (self.sum / self.count).view(n, groups, c // groups).mean(-1)
        m2 = (self.sumsq / self.count).view(n, groups, c // groups).mean(-1)
        return m, (m2 - m * m).clamp_min(0.0)


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and variance of x [N, C, h, w], float64 [N, C].

    Uses the group-norm kernel with one group per channel: ~2.5x faster than
    ``var_mean`` over the spatial dims (slow for channels-last) and as accurate as
    the group norms of an untiled run, which use the same kernel (~1e-5 relative).
    """
    if x.dtype != torch.float32:
        x = x.float()
    cl = x.stride(1) == 1 and x.shape[1] > 1
    x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)  # no-op if already
    n, c, h, w = x.shape
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, h * w, c, 0.0)
    return mean.double().view(n, c), rstd.double().pow(-2).view(n, c)


def group_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    acc = ChannelMoments()
    acc.add(x)
    return acc.group_stats(groups)


def apply_group_norm(
    m: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, silu: bool
) -> torch.Tensor:
    """GroupNorm(x) with given group statistics (float64 [N, G]), as one scale-and-shift pass."""
    n, c, g = x.shape[0], x.shape[1], m.num_groups
    rstd = (var + m.eps).rsqrt()  # [N, G]
    w = m.weight.double().view(1, g, c // g)
    scale = w * rstd[..., None]  # [N, G, C/G]
    shift = m.bias.double().view(1, g, c // g) - mean[..., None] * scale
    scale = scale.reshape(n, c, 1, 1).to(x.dtype)
    shift = shift.reshape(n, c, 1, 1).to(x.dtype)
    y = torch.addcmul(shift, x, scale)
    return F.silu(y, inplace=True) if silu else y


class ImageNorm:
    """Group norm with fixed image-wide statistics, for tile-by-tile runs (a ``fast.NormFn``).

    ``stats`` maps a GroupNorm module to its (mean, var) per [N, G]. With ``record``
    (the untiled proxy run) a module uses the statistics of the tensor it is given
    and stores them.
    """

    def __init__(self, stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] | None = None, record: bool = False):
        self.stats = dict(stats or {})
        self.record = record

    def __call__(self, m: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
        if self.record:
            self.stats[m] = group_stats(x, m.num_groups)
        elif m not in self.stats:
            raise KeyError(f"no image-wide statistics for {m}")
        mean, var = self.stats[m]
        return apply_group_norm(m, x, mean, var, silu)


class _StopTile(Exception):
    """Raised inside a tile once the layer being measured has been reached."""


class ProgressiveNorm:
    """``stats="exact"``: one pass over the tiles per group-norm layer.

    Layers with known image-wide statistics are applied; at the first unknown one
    the tile's core statistics are accumulated and the tile stops there. Because
    every earlier layer used exact statistics, what is accumulated is exact too.
    """

    def __init__(self, stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]):
        self.stats = stats
        self.target: nn.Module | None = None
        self.acc = ChannelMoments()
        self.window: tuple[int, int] = (1, 1)  # current tile input size, in its px
        self.core: tuple[int, int, int, int] = (0, 1, 0, 1)  # its core rows/cols, same px

    def on_tile(self, window: tuple[int, int], core: tuple[int, int, int, int]) -> None:
        self.window, self.core = window, core

    def __call__(self, m: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
        if m in self.stats:
            return apply_group_norm(m, x, *self.stats[m], silu)
        if self.target is None:
            self.target = m
        assert self.target is m, "tiles reached different layers first"
        (wh, ww), (xh, xw) = self.window, x.shape[-2:]
        r0, r1, c0, c1 = self.core  # window px -> this tensor's px (tiles align to the grid)
        self.acc.add(x[:, :, r0 * xh // wh : r1 * xh // wh, c0 * xw // ww : c1 * xw // ww])
        raise _StopTile


# --------------------------------------------------------------------------- full tensors in bands


def _band_rows(x: torch.Tensor, width_factor: int = 1) -> int:
    per_row = x.shape[0] * x.shape[1] * x.shape[3] * x.element_size() * width_factor
    return max(1, BAND_BYTES // max(1, per_row))


def _banded(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, halo: int, out: torch.Tensor) -> torch.Tensor:
    """out[rows] = fn(x[rows +- halo])[rows]: a local op (pointwise + 3x3 convs) band by band."""
    h, step = x.shape[2], _band_rows(x, 4)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        a, b = max(0, r0 - halo), min(h, r1 + halo)
        out[:, :, r0:r1] = fn(x[:, :, a:b])[:, :, r0 - a : r0 - a + (r1 - r0)]
    return out


def _empty_like(ops: VAEOps, x: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.empty((n, channels, h, w), dtype=x.dtype, device=x.device, memory_format=ops.memory_format(channels))


def banded_resnet(ops: VAEOps, r: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
    """``ops.resnet`` on a whole tensor with exact statistics, ~BAND_BYTES at a time."""
    x = ops.fmt(x)
    s1 = group_stats(x, r.norm1.num_groups)
    h = _empty_like(ops, x, r.conv1.out_channels)
    h = _banded(lambda t: ops.conv(r.conv1, apply_group_norm(r.norm1, t, *s1, True)), x, 1, h)
    s2 = group_stats(h, r.norm2.num_groups)
    # Without a shortcut conv x's rows are only read again as their own residual: update in place.
    out = x if r.conv_shortcut is None else _empty_like(ops, x, r.conv2.out_channels)
    rows, hh = _band_rows(h, 4), h.shape[2]
    for r0 in range(0, hh, rows):
        r1 = min(hh, r0 + rows)
        a, b = max(0, r0 - 1), min(hh, r1 + 1)
        res = x[:, :, r0:r1] if r.conv_shortcut is None else ops.conv(r.conv_shortcut, x[:, :, r0:r1])
        y = ops.conv(r.conv2, apply_group_norm(r.norm2, h[:, :, a:b], *s2, True))[:, :, r0 - a : r0 - a + (r1 - r0)]
        out[:, :, r0:r1] = res + y
    return out


def banded_attention(ops: VAEOps, a: Attention, x: torch.Tensor) -> torch.Tensor:
    """``ops.attention`` over all tokens, queries in bands; x is updated in place."""
    x = ops.fmt(x)
    n, c, h, w = x.shape
    mean, var = group_stats(x, a.group_norm.num_groups)
    p = ops.p

    def tokens(rows: torch.Tensor) -> torch.Tensor:  # [N, C, r, W] -> normalised [N, r*W, C]
        t = apply_group_norm(a.group_norm, rows, mean, var, False)
        return t.permute(0, 2, 3, 1).reshape(n, -1, c)

    k = torch.empty((n, h * w, c), dtype=x.dtype, device=x.device)
    v = torch.empty_like(k)
    step = _band_rows(x, 4)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        t = tokens(x[:, :, r0:r1])
        k[:, r0 * w : r1 * w] = F.linear(t, p(a.to_k.weight), p(a.to_k.bias))
        v[:, r0 * w : r1 * w] = F.linear(t, p(a.to_v.weight), p(a.to_v.bias))
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        q = F.linear(tokens(x[:, :, r0:r1]), p(a.to_q.weight), p(a.to_q.bias))
        o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        o = F.linear(o, p(a.to_out[0].weight), p(a.to_out[0].bias))  # [N, r*W, C]
        x[:, :, r0:r1] += o.view(n, r1 - r0, w, c).permute(0, 3, 1, 2)
    return x


def banded_norm_out(ops: VAEOps, m: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    s = group_stats(x, m.num_groups)
    out = _empty_like(ops, x, conv.out_channels)
    return _banded(lambda t: ops.conv(conv, apply_group_norm(m, t, *s, True)), x, 1, out)


# --------------------------------------------------------------------------- tiles


def _windows(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """1-D tiling of [0, size): (start, end, core_start, core_end), cores partition [0, size).

    Windows are ``tile`` long at stride ``tile - overlap`` (the last one flush with the
    end); neighbouring cores meet halfway through their overlap; everything is
    snapped to multiples of ``align``.
    """
    if size <= tile:
        return [(0, size, 0, size)]
    stride = max(align, (tile - overlap) // align * align)
    starts = list(range(0, size - tile, stride)) + [(size - tile) // align * align]
    starts = sorted(set(starts))
    ends = [min(size, s + tile) for s in starts]
    cuts = [0] + [((ends[i] + starts[i + 1]) // 2) // align * align for i in range(len(starts) - 1)] + [size]
    return [(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


def _tiles(h: int, w: int, tile: int, overlap: int, align: int = 1):
    for r in _windows(h, tile, overlap, align):
        for c in _windows(w, tile, overlap, align):
            yield r, c


def _run_tiles(
    src: torch.Tensor,
    tile: int,
    overlap: int,
    align: int,
    run: Callable[[torch.Tensor], torch.Tensor | None],
    write: Callable[[tuple[int, int], tuple[int, int], torch.Tensor], None],
    scale_out: Callable[[int], int],
    on_tile: Callable[[tuple[int, int], tuple[int, int, int, int]], None] | None = None,
) -> None:
    """Run ``run`` on every window of ``src`` (in src px) and hand each core to ``write``."""
    h, w = src.shape[-2:]
    for (rs, re, rc0, rc1), (cs, ce, cc0, cc1) in _tiles(h, w, tile, overlap, align):
        if on_tile is not None:
            on_tile((re - rs, ce - cs), (rc0 - rs, rc1 - rs, cc0 - cs, cc1 - cs))
        y = run(src[:, :, rs:re, cs:ce])
        if y is None:  # stopped early (statistics pass)
            continue
        a, b = scale_out(rc0 - rs), scale_out(rc1 - rs)
        c, d = scale_out(cc0 - cs), scale_out(cc1 - cs)
        write((scale_out(rc0), scale_out(rc1)), (scale_out(cc0), scale_out(cc1)), y[:, :, a:b, c:d])


def _engine(vae: AutoencoderKL) -> InferenceEngine:
    return vae.inference if isinstance(vae.inference, InferenceEngine) else InferenceEngine(FastConfig())


def _check(tile: int, overlap: int, unit: str, minimum: int) -> None:
    if tile < minimum:
        raise ValueError(f"tile must be >= {minimum} {unit}, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}) {unit}, got {overlap}")


class CropBatchNorm:
    """Group norm over a batch of crops run side by side (lockstep): each layer's
    statistics are pooled over the crops' cores, per image, and recorded. When the
    cores cover the whole image this is exactly the untiled statistics."""

    def __init__(self, cores: list[tuple[int, int, int, int]], window: tuple[int, int], n: int):
        self.cores, self.window, self.n = cores, window, n
        self.stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, m: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
        (wh, ww), (xh, xw), n = self.window, x.shape[-2:], self.n
        acc = ChannelMoments()
        for i, (r0, r1, c0, c1) in enumerate(self.cores):
            acc.add(x[i * n : (i + 1) * n, :, r0 * xh // wh : r1 * xh // wh, c0 * xw // ww : c1 * xw // ww])
        mean, var = acc.group_stats(m.num_groups)
        self.stats[m] = (mean, var)
        k = len(self.cores)
        return apply_group_norm(m, x, mean.repeat(k, 1), var.repeat(k, 1), silu)


def _pick(seq: list, k: int) -> list:
    """k items of seq, one from the middle of each of k equal strata (a border tile is
    atypical - zero padding - so the ends are not favoured)."""
    if k >= len(seq):
        return list(seq)
    n = len(seq)
    return [seq[min(n - 1, int((i + 0.5) * n / k))] for i in range(k)]


def lockstep(
    src: torch.Tensor,
    run: Callable[[NormFnLike, torch.Tensor], torch.Tensor],
    tile: int,
    overlap: int,
    align: int,
    max_crops: int | None,
) -> tuple[dict[nn.Module, tuple[torch.Tensor, torch.Tensor]], list | None]:
    """Run tiles side by side as one batch, every group norm pooling its statistics
    over all of their cores (``CropBatchNorm``).

    If there are at most ``max_crops`` tiles (None: no limit) that is all of them:
    the statistics are exact and the outputs final - returned as
    ``[(rows, cols, core_rows, core_cols, output)]`` in ``src`` px. Otherwise an
    evenly spread sub-grid of tiles is run and only its statistics are returned.
    """
    h, w = src.shape[-2:]
    rows, cols = _windows(h, tile, overlap, align), _windows(w, tile, overlap, align)
    complete = max_crops is None or len(rows) * len(cols) <= max_crops
    if not complete:
        kr = max(1, min(len(rows), round(math.sqrt(max_crops * len(rows) / len(cols)))))
        kc = max(1, min(len(cols), max_crops // kr))
        rows, cols = _pick(rows, kr), _pick(cols, kc)
    crops, cores = [], []
    for r in rows:
        for c in cols:
            crops.append(src[:, :, r[0] : r[1], c[0] : c[1]])
            cores.append((r[2] - r[0], r[3] - r[0], c[2] - c[0], c[3] - c[0]))
    window = (rows[0][1] - rows[0][0], cols[0][1] - cols[0][0])
    n = src.shape[0]
    norm = CropBatchNorm(cores, window, n)
    y = run(norm, torch.cat(crops))  # [crops * N, C', th', tw'], crop-major
    del crops
    if not complete:
        return norm.stats, None
    pieces = [(r, c, y[i * n : (i + 1) * n]) for i, (r, c) in enumerate((r, c) for r in rows for c in cols)]
    return norm.stats, pieces


def _check_stats(stats: str, stats_crops: int | None, stats_memory: int | None) -> None:
    if stats not in ("exact", "sample", "proxy", "tile"):
        raise ValueError(f"stats must be 'exact', 'sample', 'proxy' or 'tile', got {stats!r}")
    if stats_crops is not None and stats_crops < 1:
        raise ValueError(f"stats_crops must be >= 1 or None, got {stats_crops}")
    if stats_memory is not None and stats_memory < 1:
        raise ValueError(f"stats_memory must be > 0 bytes or None, got {stats_memory}")


# Memory per tile in the statistics batch, in units of its largest tensor: measured
# 2.0x (SD decoder) and 2.4x (tiny demo VAE) for each tile added to the batch.
_LIVE = 2.5


def _max_crops(stats_crops: int | None, stats_memory: int | None, tile_bytes: int) -> int | None:
    if stats_crops is not None:
        return stats_crops
    if stats_memory is None:
        return None
    return max(1, stats_memory // max(1, tile_bytes))


def _decoder_tile_bytes(vae: AutoencoderKL, tile: int, n: int, element_size: int) -> int:
    """Largest tensor of the tiled (upsampling) levels for one tile, x _LIVE."""
    ch = tuple(reversed(vae.config.block_out_channels))
    sizes = [ch[0] * (2 * tile) ** 2]  # the first upsampler's output
    for i in range(1, len(ch)):
        sizes.append(max(ch[i - 1], ch[i]) * (tile * 2**i) ** 2)
    return int(_LIVE * max(sizes) * n * element_size)


def _encoder_tile_bytes(vae: AutoencoderKL, tile: int, n: int, element_size: int) -> int:
    ch = vae.config.block_out_channels
    sizes = [max(ch[max(i - 1, 0)], ch[i]) * (tile // 2**i) ** 2 for i in range(len(ch) - 1)]
    return int(_LIVE * max(sizes) * n * element_size)


@dataclass(frozen=True)
class _Plan:
    tile: int
    overlap: int
    align: int  # window grid (the downsampling factor when tiling images)
    stats: str
    stats_crops: int | None  # tiles in the statistics batch (None: all)
    proxy_size: int


def _tile_pass(
    plan: _Plan,
    src: torch.Tensor,
    run: Callable[[NormFnLike | None, torch.Tensor], torch.Tensor],
    write: Callable[[tuple[int, int], tuple[int, int], torch.Tensor], None],
    scale_out: Callable[[int], int],
) -> None:
    """Measure the group-norm statistics as ``plan.stats`` says, then run every tile."""
    tiles = functools.partial(_run_tiles, src, plan.tile, plan.overlap, plan.align)
    norm: NormFnLike | None = None  # "tile": each tile's own statistics
    if plan.stats in ("exact", "sample"):
        # All tiles side by side when they fit: exact statistics and final outputs at once.
        everything = _all_tiles_fit(src, plan)
        if plan.stats == "sample" or everything:
            stats, pieces = lockstep(src, run, plan.tile, plan.overlap, plan.align, plan.stats_crops)
            if pieces is not None:
                for (rs, re, rc0, rc1), (cs, ce, cc0, cc1), y in pieces:
                    a, b, c, d = (scale_out(v) for v in (rc0 - rs, rc1 - rs, cc0 - cs, cc1 - cs))
                    write((scale_out(rc0), scale_out(rc1)), (scale_out(cc0), scale_out(cc1)), y[:, :, a:b, c:d])
                return
            norm = ImageNorm(stats)
        else:
            return _progressive(tiles, run, write, scale_out)
    elif plan.stats == "proxy":
        norm = ImageNorm(record=True)
        run(norm, _proxy(src, plan))
        norm.record = False
    tiles(lambda t: run(norm, t), write, scale_out)


def _make_plan(op: str, src: torch.Tensor, tile: int, overlap: int, align: int, stats: str, stats_crops: int | None,
               stats_memory: int | None, tile_bytes: int, proxy_size: int) -> _Plan:
    """The plan for ``src``; warns when "exact" will need the slow pass-per-layer path."""
    plan = _Plan(tile, overlap, align, stats, _max_crops(stats_crops, stats_memory, tile_bytes), proxy_size)
    if plan.stats == "exact" and not _all_tiles_fit(src, plan):
        n = _count_tiles(src, plan)
        warnings.warn(
            f"tiled {op}: the {n} tiles would need ~{n * tile_bytes / 2**30:.1f} GiB side by side, more than "
            f"stats_memory allows ({plan.stats_crops} tiles); exact statistics now take one pass per group-norm "
            "layer (~10x the work for SD-size models). Raise stats_memory for one exact pass, or use "
            "stats='sample' (an estimate) or 'proxy' for speed.",
            RuntimeWarning,
            stacklevel=4,  # the caller of tiled_decode / tiled_encode
        )
    return plan


def _with_fp32_retry(op: str, run: Callable[[torch.dtype], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``run(dtype)``; in half precision a non-finite result is computed again in float32."""
    out = run(dtype)
    if dtype != torch.float32 and not bool(torch.isfinite(out).all()):
        warnings.warn(f"tiled {op} in {dtype} gave inf/nan; repeating it in float32", RuntimeWarning, stacklevel=4)
        out = run(torch.float32)
    return out


def _all_tiles_fit(src: torch.Tensor, plan: _Plan) -> bool:
    return plan.stats_crops is None or plan.stats_crops >= _count_tiles(src, plan)


def _count_tiles(src: torch.Tensor, plan: _Plan) -> int:
    h, w = src.shape[-2:]
    return len(_windows(h, plan.tile, plan.overlap, plan.align)) * len(_windows(w, plan.tile, plan.overlap, plan.align))


def _progressive(tiles, run, write, scale_out) -> None:
    """Exact statistics one tile at a time: a pass per norm layer (see ``ProgressiveNorm``);
    the pass that meets no unknown layer writes the output."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    while True:
        norm = ProgressiveNorm(stats)

        def run_or_stop(t: torch.Tensor) -> torch.Tensor | None:
            try:
                return run(norm, t)
            except _StopTile:
                return None

        tiles(run_or_stop, write, scale_out, on_tile=norm.on_tile)
        if norm.target is None:
            return
        stats[norm.target] = norm.acc.group_stats(norm.target.num_groups)


def _proxy(src: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The input downscaled to ``proxy_size``: strided for latents, area-averaged for images."""
    s = max(1, math.ceil(max(src.shape[-2:]) / plan.proxy_size))
    if s == 1:
        return src
    if plan.align == 1:
        return src[:, :, ::s, ::s]
    small = F.interpolate(src.float(), scale_factor=1 / s, mode="area").to(src.dtype)
    f = plan.align  # whole pixels at every level
    return small[:, :, : max(f, small.shape[-2] // f * f), : max(f, small.shape[-1] // f * f)]


def statistics_sample(
    vae: AutoencoderKL,
    op: Literal["decode", "encode"],
    shape: tuple[int, ...],
    *,
    tile: int,
    overlap: int,
    stats_memory: int | None = 2 << 30,
    stats_crops: int | None = None,
) -> tuple[int, int]:
    """(tiles, tiles in the statistics batch) that ``stats="sample"`` uses for an input
    of ``shape`` (latents for decode, images for encode); equal means exact."""
    f = vae.config.downsample_factor
    n, h, w = shape[0], shape[-2], shape[-1]
    size = torch.empty((), dtype=vae.decoder.conv_in.weight.dtype).element_size()
    if op == "decode":
        align, tile_bytes = 1, _decoder_tile_bytes(vae, tile, n, size)
    else:
        h, w, tile, overlap, align = -(-h // f) * f, -(-w // f) * f, tile // f * f, overlap // f * f, f
        tile_bytes = _encoder_tile_bytes(vae, tile, n, size)
    tiles = len(_windows(h, tile, overlap, align)) * len(_windows(w, tile, overlap, align))
    crops = _max_crops(stats_crops, stats_memory, tile_bytes)
    if crops is None or crops >= tiles:
        return tiles, tiles
    rows, cols = len(_windows(h, tile, overlap, align)), len(_windows(w, tile, overlap, align))
    kr = max(1, min(rows, round(math.sqrt(crops * rows / cols))))
    return tiles, kr * max(1, min(cols, crops // kr))


# --------------------------------------------------------------------------- decode


@torch.no_grad()
def tiled_decode(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 16,
    stats: Stats = "exact",
    stats_memory: int | None = 2 << 30,
    stats_crops: int | None = None,
    proxy_size: int = 64,
) -> torch.Tensor:
    """Decode ``latents`` [N, C, h, w] tile by tile (sizes in latent px); see the module docstring.

    ``stats_memory`` bytes (None: no limit) - or ``stats_crops`` tiles if given - may
    run side by side: when every tile fits, "exact" and "sample" are one exact pass;
    otherwise "exact" takes a pass per norm layer and "sample" measures on that many
    tiles, then runs them all. ``proxy_size``: latent px of the strided subsample
    ``stats="proxy"`` uses. Returns [N, 3, h*f, w*f] like ``vae.decode``.
    """
    _check(tile, overlap, "latent px", 1)
    _check_stats(stats, stats_crops, stats_memory)
    c = vae.config.latent_channels
    if latents.ndim != 4 or latents.shape[1] != c:
        raise ValueError(f"expected latents of shape [N, {c}, h, w], got {tuple(latents.shape)}")
    dec = vae.decoder
    h, w = latents.shape[-2:]
    if (h <= tile and w <= tile) or getattr(dec.up_blocks[0], "upsamplers", None) is None:
        return vae.decode(latents)
    engine = _engine(vae)
    dtype = engine.compute_dtype(vae)
    tile_bytes = _decoder_tile_bytes(vae, tile, latents.shape[0], torch.empty((), dtype=dtype).element_size())
    plan = _make_plan("decode", latents, tile, overlap, 1, stats, stats_crops, stats_memory, tile_bytes, proxy_size)
    out = _with_fp32_retry("decode", lambda dt: _decode_tiles(vae, engine, latents, dt, plan), dtype)
    return out.to(dec.conv_in.weight.dtype)


def _decode_tiles(vae: AutoencoderKL, engine: InferenceEngine, latents: torch.Tensor, dtype, plan: _Plan):
    dec = vae.decoder
    ops = engine.ops(dtype)
    # 1. latent resolution, whole tensor, exact.
    x = ops.decoder_in(vae, latents)
    mid = dec.mid_block
    x = banded_resnet(ops, mid.resnets[0], x)
    if mid.attentions is not None:
        x = banded_attention(ops, mid.attentions[0], x)
    x = banded_resnet(ops, mid.resnets[1], x)
    for r in dec.up_blocks[0].resnets:
        x = banded_resnet(ops, r, x)

    # 2. the upsampling levels, tile by tile.
    def tail(norm: NormFnLike | None, t: torch.Tensor) -> torch.Tensor:
        o = engine.ops(dtype, norm=norm)
        for u in dec.up_blocks[0].upsamplers:
            t = o.upsample(u, t)
        for blk in dec.up_blocks[1:]:
            t = o.level(blk, t)
        return o.decoder_out(vae, t)

    f = vae.config.downsample_factor
    n, _, h, w = x.shape
    out = torch.empty((n, vae.config.out_channels, h * f, w * f), dtype=dtype, device=x.device)

    def write(rows, cols, y):
        out[:, :, rows[0] : rows[1], cols[0] : cols[1]] = y

    _tile_pass(plan, x, tail, write, lambda v: v * f)
    return out


# --------------------------------------------------------------------------- encode


@torch.no_grad()
def tiled_encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    tile: int = 512,
    overlap: int = 128,
    stats: Stats = "exact",
    stats_memory: int | None = 2 << 30,
    stats_crops: int | None = None,
    proxy_size: int = 512,
) -> DiagonalGaussian:
    """Encode ``images`` [N, 3, H, W] tile by tile (sizes in image px); see the module docstring.

    Tiles and their cores are snapped to multiples of the downsampling factor so the
    strided convs see the same pixel grid as untiled. ``stats_memory`` / ``stats_crops`` /
    ``proxy_size`` as in ``tiled_decode`` (the proxy is area-downscaled, in image px).
    """
    f = vae.config.downsample_factor
    _check(tile, overlap, "px", f)
    _check_stats(stats, stats_crops, stats_memory)
    x, _ = vae._check_size(images)  # pads odd sizes like vae.encode
    h, w = x.shape[-2:]
    enc = vae.encoder
    if (h <= tile and w <= tile) or len(enc.down_blocks) < 2:
        return vae.encode(images)
    tile, overlap = tile // f * f, overlap // f * f
    engine = _engine(vae)
    dtype = engine.compute_dtype(vae)
    tile_bytes = _encoder_tile_bytes(vae, tile, x.shape[0], torch.empty((), dtype=dtype).element_size())
    plan = _make_plan("encode", x, tile, overlap, f, stats, stats_crops, stats_memory, tile_bytes, proxy_size)
    moments = _with_fp32_retry("encode", lambda dt: _encode_tiles(vae, engine, x, dt, plan), dtype)
    return DiagonalGaussian(moments.to(enc.conv_in.weight.dtype))


def _encode_tiles(vae: AutoencoderKL, engine: InferenceEngine, x: torch.Tensor, dtype, plan: _Plan) -> torch.Tensor:
    enc = vae.encoder
    f = vae.config.downsample_factor
    x = x.to(dtype)

    # 1. full resolution down to latent resolution, tile by tile.
    def head(norm: NormFnLike | None, t: torch.Tensor) -> torch.Tensor:
        o = engine.ops(dtype, norm=norm)
        t = o.conv(enc.conv_in, o.layout(t))
        for blk in enc.down_blocks[:-1]:
            t = o.level(blk, t)
        return t

    n, (h, w) = x.shape[0], x.shape[-2:]
    width = enc.down_blocks[-2].resnets[-1].conv2.out_channels
    ops = engine.ops(dtype)
    b = torch.empty((n, width, h // f, w // f), dtype=dtype, device=x.device, memory_format=ops.memory_format(width))

    def write(rows, cols, y):
        b[:, :, rows[0] : rows[1], cols[0] : cols[1]] = y

    _tile_pass(plan, x, head, write, lambda v: v // f)

    # 2. latent resolution, whole tensor, exact.
    for r in enc.down_blocks[-1].resnets:
        b = banded_resnet(ops, r, b)
    mid = enc.mid_block
    b = banded_resnet(ops, mid.resnets[0], b)
    if mid.attentions is not None:
        b = banded_attention(ops, mid.attentions[0], b)
    b = banded_resnet(ops, mid.resnets[1], b)
    m = banded_norm_out(ops, enc.conv_norm_out, enc.conv_out, b)
    del b
    if vae.quant_conv is not None:
        m = ops.conv(vae.quant_conv, m)
    return m.contiguous()


__all__ = [
    "tiled_decode",
    "tiled_encode",
    "lockstep",
    "statistics_sample",
    "ImageNorm",
    "CropBatchNorm",
    "ChannelMoments",
    "apply_group_norm",
    "group_stats",
]
