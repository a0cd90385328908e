"""Winograd F(2x2, 3x3) convolution for CPU fp32: 2.25x fewer multiplies than a direct 3x3 conv.

Lavin & Gray (2015): a 2x2 output tile of a 3x3 conv from a 4x4 input tile with 16
multiplies per (ci, co) pair instead of 36,
    Y = A^T [ (G g G^T) * (B^T d B) ] A      (elementwise * over the 4x4 tile).
The transforms only use 0, +-1 and 0.5, so in fp32 the result agrees with a direct
conv to ~1e-6 relative (the same order as oneDNN's own NHWC-vs-NCHW difference).
Measured on a 2-core Xeon: ~1.4x faster than oneDNN's direct conv at 512 channels,
~1.15x at 256, slower at 128 (``FastConfig.winograd_min_channels``). CPU only:
cuDNN has its own fast algorithms, and half-precision transforms would lose the
accuracy that makes this exact enough. Used by ``latentae.fast.VAEOps.conv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BAND_BYTES = 8 << 20  # 2-16 MiB measured on a 2-core Xeon: 4-8 best quiet, larger under load
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_kernels(weight: torch.Tensor) -> torch.Tensor:
    """[Co, Ci, 3, 3] -> U [16, Ci, Co] = G g G^T per (ci, co), laid out for bmm."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", g, weight.double(), g)  # [4, 4, Ci, Co]
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _transforms(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
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
    pad_rows: bool = True,
) -> torch.Tensor:
    """conv2d(x, w, bias, padding=1) [+ residual] via Winograd F(2x2, 3x3); NHWC output.

    ``pad_rows=False``: padding (0, 1), i.e. ``x`` carries its own halo rows and the
    output has two rows fewer (``latentae.streaming`` reads halos from the image).

    Works on bands of tile rows (~``band_bytes`` of transformed input each) so that
    the 4x larger transformed input stays cache-sized: unbanded, the transforms are
    memory bound and the whole thing is slower than oneDNN's direct conv. Per band:
    one gather of the 4x4 input tiles, the input transform as one [16, 16] matmul,
    the 16 tile-position GEMMs as one bmm, the output transform as one [4, 16]
    matmul, one write (+ residual, + bias). Few large ops: many small ones stall
    on a loaded machine, where every op waits for all of its threads.
    x [N, Ci, H, W] (any memory format), u from ``winograd_kernels``.
    """
    n, ci, h_in, w = x.shape
    top = 1 if pad_rows else 0
    h = h_in if pad_rows else h_in - 2  # output rows
    co = u.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2  # output tiles
    # NHWC, zero-padded to 2*th+2 rows and 2*tw+2 columns: tile (i, j) reads rows 2i..2i+3.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 2 * tw + 1 - w, top, 2 * th + 2 - h_in - top))
    s_n, s_h, s_w, s_c = xp.stride()
    y = torch.empty((n, th, 2, tw, 2, co), dtype=x.dtype, device=x.device)  # NHWC with the 2x2 split out
    res = None
    if residual is not None:
        rp = residual.permute(0, 2, 3, 1)
        if 2 * th != h or 2 * tw != w:
            rp = F.pad(rp, (0, 0, 0, 2 * tw - w, 0, 2 * th - h))
        res = rp.reshape(n, th, 2, tw, 2, co)  # a view when residual is NHWC and even-sized
    k16, a16 = _transforms(x.dtype, x.device)
    band_tiles = (band_bytes or BAND_BYTES) // (16 * ci * x.element_size())
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


__all__ = ["winograd_kernels", "winograd_conv3x3", "BAND_BYTES"]
