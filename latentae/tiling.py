"""Tiled encode / decode: memory bounded, results equal to untiled.

``tiled_decode(vae, latents, tile=64)`` and ``tiled_encode(vae, images, tile=512)``
(tile in latent px / image px) have two statistics modes, ``stats=``:

* ``"exact"`` (default): ``latentae.streaming`` - the network layer by layer over the
  whole image in bands of rows (each half the size of one ``tile`` x ``tile`` tile's
  largest activation), every group norm with the statistics of the whole tensor,
  every 3x3 conv with its true neighbours. Equal to the untiled call up to float rounding (no seams, no tone
  shifts), for ~1.0-1.1x its work. Memory: the activations kept between layers up
  to ``memory`` bytes (beyond that they go to disk under ``spill_dir``, see
  ``latentae.activations``) + one band + the output.
* ``"tile"``: overlapping ``tile`` x ``tile`` tiles, each encoded/decoded on its own
  (its own group-norm statistics and attention), keeping the tile cores - what
  diffusers' ``enable_tiling`` computes, without its blending. Kept for two
  reasons: it needs no kept activations at all (no disk, any size, each tile
  independent), and it is the baseline that shows what exact statistics buy
  (``tools/bench_tiling.py``). ``overlap`` is used by this mode only.

Removed modes and why: ``"sample"`` (statistics of a subset of tiles run side by side)
and ``"proxy"`` (statistics of a downscaled copy) were estimates that were cheaper
than the old exact path (a pass per group-norm layer, ~10x the work); exact now
costs about one pass, so an estimate buys nothing.

Both fall back to the plain call when one tile covers the input. Precision: the
engine's compute dtype and per-stage float32 decisions apply (``latentae.fast``).
Measured numbers: ``tools/bench_tiling.py`` and the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from latentae.fast import FastConfig, InferenceEngine
from latentae.model import AutoencoderKL, DiagonalGaussian
from latentae.streaming import stream

Stats = Literal["exact", "tile"]
# Bytes of activations kept in memory by stats="exact". With the bands' working set (~2 tiles),
# the model and its derived kernels, an SD-size 4096 x 4096 decode then stays within 4 GiB.
DEFAULT_MEMORY = 3 << 29  # 1.5 GiB


def _engine(vae: AutoencoderKL) -> InferenceEngine:
    """The model's engine (its caches and precision decisions), or a fresh one for a plain model."""
    return vae.inference if isinstance(vae.inference, InferenceEngine) else InferenceEngine(FastConfig())


def _check(tile: int, overlap: int, unit: str, minimum: int, stats: str, memory: int | None) -> None:
    if tile < minimum:
        raise ValueError(f"tile must be >= {minimum} {unit}, got {tile}")
    if stats not in ("exact", "tile"):
        raise ValueError(f"stats must be 'exact' or 'tile', got {stats!r}")
    if stats == "tile" and not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}) {unit}, got {overlap}")
    if memory is not None and memory < 0:
        raise ValueError(f"memory must be >= 0 bytes or None, got {memory}")


def windows(size: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int, int, int]]:
    """1-D tiling of [0, size): (start, end, core_start, core_end), cores partition [0, size).

    Windows are ``tile`` long at stride ``tile - overlap`` (the last one flush with the
    end); neighbouring cores meet halfway through their overlap; everything is
    snapped to multiples of ``align``.
    """
    if size <= tile:
        return [(0, size, 0, size)]
    stride = max(align, (tile - overlap) // align * align)
    starts = sorted(set(list(range(0, size - tile, stride)) + [(size - tile) // align * align]))
    ends = [min(size, s + tile) for s in starts]
    cuts = [0] + [((ends[i] + starts[i + 1]) // 2) // align * align for i in range(len(starts) - 1)] + [size]
    return [(s, e, cuts[i], cuts[i + 1]) for i, (s, e) in enumerate(zip(starts, ends))]


def _per_tile(run, src: torch.Tensor, tile: int, overlap: int, align: int, scale: float, out_channels: int):
    """stats="tile": ``run`` on every window of ``src``; the cores, scaled by ``scale``, form the output."""
    n, _, h, w = src.shape
    out = None
    for rs, re, rc0, rc1 in windows(h, tile, overlap, align):
        for cs, ce, cc0, cc1 in windows(w, tile, overlap, align):
            y = run(src[:, :, rs:re, cs:ce])
            if out is None:
                out = torch.empty((n, out_channels, int(h * scale), int(w * scale)), dtype=y.dtype, device=y.device)
            a, b, c, d = (int(v * scale) for v in (rc0 - rs, rc1 - rs, cc0 - cs, cc1 - cs))
            out[:, :, int(rc0 * scale) : int(rc1 * scale), int(cc0 * scale) : int(cc1 * scale)] = y[:, :, a:b, c:d]
    return out


@torch.no_grad()
def tiled_decode(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 16,
    stats: Stats = "exact",
    memory: int | None = DEFAULT_MEMORY,
    spill_dir: str | Path | None = None,
    report: dict | None = None,
) -> torch.Tensor:
    """Decode ``latents`` [N, C, h, w] with bounded memory (sizes in latent px); see the module docstring.

    ``memory``: bytes of activations kept in memory between layers (None: no limit);
    the rest go to disk under ``spill_dir``. ``report`` (a dict, optional) receives
    the peak bytes kept in memory and on disk. Returns [N, 3, h*f, w*f] like ``vae.decode``.
    """
    _check(tile, overlap, "latent px", 1, stats, memory)
    c = vae.config.latent_channels
    if latents.ndim != 4 or latents.shape[1] != c:
        raise ValueError(f"expected latents of shape [N, {c}, h, w], got {tuple(latents.shape)}")
    h, w = latents.shape[-2:]
    if h <= tile and w <= tile:
        return vae.decode(latents)
    engine = _engine(vae)
    if stats == "tile":
        f = vae.config.downsample_factor
        out = _per_tile(lambda t: engine.decode(vae, t), latents, tile, overlap, 1, f, vae.config.out_channels)
    else:
        out = stream("decode", vae, engine, latents, tile=tile, memory=memory, spill_dir=spill_dir, report=report)
    return out.to(vae.decoder.conv_in.weight.dtype)


@torch.no_grad()
def tiled_encode(
    vae: AutoencoderKL,
    images: torch.Tensor,
    *,
    tile: int = 512,
    overlap: int = 128,
    stats: Stats = "exact",
    memory: int | None = DEFAULT_MEMORY,
    spill_dir: str | Path | None = None,
    report: dict | None = None,
) -> DiagonalGaussian:
    """Encode ``images`` [N, 3, H, W] with bounded memory (sizes in image px); see the module docstring.

    Sizes that are not a multiple of the downsampling factor are padded like ``vae.encode``;
    with ``stats="tile"`` tiles and cores are snapped to multiples of it, so the strided
    convs see the same pixel grid as untiled. ``memory`` / ``spill_dir`` / ``report`` as
    in ``tiled_decode``.
    """
    f = vae.config.downsample_factor
    _check(tile, overlap, "px", f, stats, memory)
    x, _ = vae._check_size(images)
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return vae.encode(images)
    engine = _engine(vae)
    if stats == "tile":
        tile, overlap = tile // f * f, overlap // f * f
        moments = _per_tile(lambda t: engine.moments(vae, t), x, tile, overlap, f, 1 / f, 2 * vae.config.latent_channels)
    else:
        moments = stream("encode", vae, engine, x, tile=max(1, tile // f), memory=memory, spill_dir=spill_dir,
                         report=report)
    return DiagonalGaussian(moments.to(vae.encoder.conv_in.weight.dtype))


__all__ = ["tiled_decode", "tiled_encode", "windows", "DEFAULT_MEMORY"]
