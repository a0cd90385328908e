"""Validation grids (latentae.validation): input | reconstruction | error map, big enough to judge."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from latentae.report import heatmap
from latentae.validation import ERROR_VMAX, GRID_TILE, comparison_grid, error_map, save_png


def _pair(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    r = (x + 0.1 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)
    return x, r


def test_grid_is_input_recon_error_enlarged_to_256_px_by_nearest_neighbour(tmp_path):
    x, r = _pair(n=3, size=64)
    grid = comparison_grid(x, r)
    assert GRID_TILE == 256 and grid.shape == (3, 3 * 256, 3 * 256)  # 64 px shown 4x
    assert grid.min() >= 0 and grid.max() <= 1
    # Row 1, middle tile = the reconstruction of image 1, each pixel a 4x4 block of the same value.
    tile = grid[:, 256:512, 256:512]
    assert torch.allclose(tile[:, ::4, ::4], (r[1] + 1) / 2)
    assert torch.equal(tile[:, 1::4, 2::4], tile[:, ::4, ::4])
    # The first tile is the input, the third the error map of that row.
    assert torch.allclose(grid[:, 256:512:4, 0:256:4], (x[1] + 1) / 2)
    assert torch.allclose(grid[:, 256:512:4, 512::4], (error_map(x, r)[1] + 1) / 2)
    # Large images are not enlarged (or shrunk); rows are capped.
    big = comparison_grid(*_pair(n=10, size=300), max_rows=2)
    assert big.shape == (3, 2 * 300, 3 * 300)
    # A non-multiple: 48 px -> the smallest factor reaching 256 px (6x = 288).
    assert comparison_grid(*_pair(n=1, size=48)).shape == (3, 288, 3 * 288)
    assert Image.open(save_png(grid, tmp_path / "g.png")).size == (768, 768)


def test_error_map_uses_a_fixed_scale_black_for_exact_yellow_at_vmax():
    x = torch.zeros(2, 3, 8, 8)
    r = x.clone()
    r[1, :, :4] = 2 * ERROR_VMAX  # |error| / 2 = ERROR_VMAX of the pixel range: saturated
    r[1, :, 4:6] = ERROR_VMAX  # half way
    m = ((error_map(x, r) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    black, top = heatmap(np.zeros((1, 1)), 1.0)[0, 0], heatmap(np.ones((1, 1)), 1.0)[0, 0]
    assert (m[0] == black).all() and (m[1, :4] == top).all() and (m[1, 6:] == black).all()
    mid = heatmap(np.full((1, 1), 0.5), 1.0)[0, 0]
    assert (np.abs(m[1, 4:6].astype(int) - mid.astype(int)) <= 1).all()
    # The same error gives the same colour whatever else is in the picture (no per-image rescaling).
    r2 = r.clone()
    r2[0] = 1.0
    assert torch.equal(error_map(x, r2)[1], error_map(x, r)[1])
