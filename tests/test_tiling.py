"""Tiled encode/decode equal untiled (exact modes), fall back to plain calls, bound their inputs."""

import copy

import pytest
import torch

import latentae.tiling as tiling
from conftest import randomize_, tiny_model_config
from latentae.fast import FastConfig, optimize_for_inference
from latentae.model import build_vae
from latentae.tiling import ChannelMoments, _pick, _windows, group_stats, tiled_decode, tiled_encode

# 4 levels like SD (f=8). Receptive field of the tiled decoder levels: ~4.5 latent px;
# of the tiled encoder levels: ~29 image px. The overlaps below leave margins above both.
SD_LIKE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1)
DEC = dict(tile=12, overlap=10)  # latent px
ENC = dict(tile=96, overlap=64)  # image px


@pytest.fixture(scope="module")
def vae():
    return optimize_for_inference(randomize_(build_vae(tiny_model_config(**SD_LIKE)), 3).eval(), FastConfig())


def latents(n=2, h=21, w=26, c=4, seed=0):
    z = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    z[1:] *= 3  # samples with different statistics: norms must stay per sample
    return z


def images(n=2, h=133, w=197, seed=1):
    x = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    x[1:] *= 0.3
    return x


@pytest.fixture
def small_bands(monkeypatch):
    """Force many row bands in the latent-resolution part, so banding is exercised."""
    monkeypatch.setattr(tiling, "BAND_BYTES", 4096)


# ----------------------------------------------------------------------------- exactness


# exact, one tile at a time (a pass per norm layer) / exact, all tiles side by side / sample = all tiles
EXACT_MODES = [("exact", {"stats_crops": 1}), ("exact", {}), ("sample", {"stats_memory": None})]


@pytest.mark.parametrize("stats, kw", EXACT_MODES)
def test_tiled_decode_equals_untiled(vae, small_bands, stats, kw):
    z = latents()
    with torch.no_grad():
        ref = vae.decode(z)
    out = tiled_decode(vae, z, stats=stats, **DEC, **kw)
    assert out.shape == ref.shape == (2, 3, 21 * 8, 26 * 8)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("stats, kw", EXACT_MODES)
def test_tiled_encode_equals_untiled(vae, small_bands, stats, kw):
    x = images()  # odd size: padded like vae.encode
    with torch.no_grad():
        ref = vae.encode(x)
    post = tiled_encode(vae, x, stats=stats, **ENC, **kw)
    assert post.mean.shape == ref.mean.shape == (2, 4, 17, 25)
    torch.testing.assert_close(post.mean, ref.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(post.logvar, ref.logvar, atol=1e-4, rtol=0)


def test_plain_model_without_fast_path_and_f4_model(small_bands):
    """No optimize_for_inference (tiling makes its own engine); a 3-level f=4 model."""
    plain = randomize_(build_vae(tiny_model_config(block_out_channels=(16, 32, 32))), 1).eval()
    z = latents(n=1, h=19, w=15)
    with torch.no_grad():
        ref = plain.decode(z)
    out = tiled_decode(plain, z, tile=12, overlap=10, stats="exact", stats_crops=1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    x = images(n=1, h=70, w=90)
    with torch.no_grad():
        ref_post = plain.encode(x)
    post = tiled_encode(plain, x, tile=48, overlap=32, stats="sample", stats_memory=None)
    torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-4, rtol=0)
    assert plain.inference is None


def test_per_tile_statistics_are_not_exact(vae):
    """The comparison mode (diffusers-like per-tile norms) really differs: the tests above have teeth."""
    z = latents(n=1)
    with torch.no_grad():
        ref = vae.decode(z)
    assert (tiled_decode(vae, z, stats="tile", **DEC) - ref).abs().max() > 1e-3


def test_proxy_of_the_whole_tensor_is_exact(vae):
    """stats="proxy" with a proxy as large as the input measures the untiled statistics."""
    z = latents(n=1)
    with torch.no_grad():
        ref = vae.decode(z)
    torch.testing.assert_close(tiled_decode(vae, z, stats="proxy", proxy_size=26, **DEC), ref, atol=1e-4, rtol=0)
    out = tiled_decode(vae, z, stats="proxy", proxy_size=8, **DEC)  # a real (strided) proxy: an estimate
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_sampled_statistics_are_those_of_the_sampled_tiles(vae):
    """A partial sample (2 of 9 tiles) run side by side: each layer's statistics are the
    pooled core statistics of those tiles when each runs alone with those statistics."""
    ops = vae.inference.ops(torch.float32)
    dec = vae.decoder
    src = torch.randn(2, 32, 30, 30, generator=torch.Generator().manual_seed(4))
    src[1] *= 2

    def tail(norm, t):
        o = vae.inference.ops(torch.float32, norm=norm)
        for u in dec.up_blocks[0].upsamplers:
            t = o.upsample(u, t)
        for blk in dec.up_blocks[1:]:
            t = o.level(blk, t)
        return o.decoder_out(vae, t)

    with torch.no_grad():
        stats, pieces = tiling.lockstep(src, tail, 12, 10, 1, max_crops=2)
        assert pieces is None and len(stats) == 13  # 3 levels x 2 resnets x 2 norms + norm_out
        rows, cols = _windows(30, 12, 10), _windows(30, 12, 10)
        picked = [(r, c) for r in _pick(rows, 1) for c in _pick(cols, 2)]
        acc = {}

        def measure(m, x, silu):  # apply the sampled statistics, pool this crop's core
            (wh, ww), (xh, xw) = (12, 12), x.shape[-2:]
            core = x[:, :, r0 * xh // wh : r1 * xh // wh, c0 * xw // ww : c1 * xw // ww]
            acc.setdefault(m, ChannelMoments()).add(core)
            return tiling.apply_group_norm(m, x, *stats[m], silu)

        for r, c in picked:
            r0, r1, c0, c1 = r[2] - r[0], r[3] - r[0], c[2] - c[0], c[3] - c[0]
            tail(measure, src[:, :, r[0] : r[1], c[0] : c[1]])
    for m, (mean, var) in stats.items():
        got_mean, got_var = acc[m].group_stats(m.num_groups)
        torch.testing.assert_close(got_mean, mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_var, var, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(stats[dec.conv_norm_out][1][0], stats[dec.conv_norm_out][1][1])  # per sample


def test_tile_covering_the_input_is_the_plain_call(vae):
    z, x = latents(h=9, w=7), images(h=60, w=50)
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae, z, tile=9, overlap=2), vae.decode(z))
        p, q = tiled_encode(vae, x, tile=64, overlap=16), vae.encode(x)
    assert torch.equal(p.mean, q.mean) and torch.equal(p.logvar, q.logvar)


def test_bf16_model(vae):
    half = copy.deepcopy(vae).to(torch.bfloat16)
    z = latents(n=1)
    out = tiled_decode(half, z.bfloat16(), stats="exact", stats_crops=1, **DEC)
    with torch.no_grad():
        ref = vae.decode(z)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    "size, tile, overlap, align", [(21, 12, 10, 1), (200, 96, 64, 8), (50, 16, 0, 1), (10, 12, 4, 1)]
)
def test_windows_partition_with_margins(size, tile, overlap, align):
    wins = _windows(size, tile, overlap, align)
    assert wins[0][2] == 0 and wins[-1][3] == size
    assert all(wins[i][3] == wins[i + 1][2] for i in range(len(wins) - 1))  # cores partition [0, size)
    assert len({e - s for s, e, _, _ in wins}) == 1  # one window size: tiles batch together
    for s, e, c0, c1 in wins:
        assert s <= c0 < c1 <= e and s % align == 0 and c0 % align == 0
        if s > 0:
            assert c0 - s >= overlap // 2 - align
        if e < size:
            assert e - c1 >= overlap // 2 - align


def test_pick_spreads_evenly():
    assert _pick(list(range(9)), 3) == [1, 4, 7]
    assert _pick(list(range(5)), 1) == [2]
    assert _pick(list(range(8)), 2) == [2, 6]
    assert _pick([1, 2], 5) == [1, 2]


def test_channel_moments_merge_exactly():
    x = torch.randn(2, 8, 10, 12) * 3 + 1
    acc = ChannelMoments()
    acc.add(x[:, :, :3]), acc.add(x[:, :, 3:])
    mean, var = acc.group_stats(4)
    ref_var, ref_mean = torch.var_mean(x.double().view(2, 4, -1), dim=-1, correction=0)
    # fp32 group-norm kernel statistics (like an untiled run's), merged in float64
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(group_stats(x, 4)[1], ref_var, rtol=1e-5, atol=1e-6)


def test_banded_latent_resolution_blocks_equal_plain(vae, small_bands):
    ops = vae.inference.ops(torch.float32)
    x = torch.randn(2, 32, 11, 9)
    mid = vae.decoder.mid_block
    with torch.no_grad():
        ref = ops.attention(mid.attentions[0], ops.resnet(mid.resnets[0], x.clone()))
        out = tiling.banded_attention(ops, mid.attentions[0], tiling.banded_resnet(ops, mid.resnets[0], x.clone()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_statistics_batch_follows_the_memory_budget(vae):
    per_tile = tiling._decoder_tile_bytes(vae, 64, 1, 4)
    assert per_tile == int(2.5 * 32 * (64 * 8) ** 2 * 4)  # the last level at 8x (32 ch in) x 2.5, fp32
    assert tiling._max_crops(None, 3 * per_tile, per_tile) == 3
    assert tiling._max_crops(None, None, per_tile) is None
    assert tiling._max_crops(7, 1, per_tile) == 7


# ----------------------------------------------------------------------------- errors


def test_bad_arguments_are_named(vae):
    z = latents(n=1)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, tile=12\)"):
        tiled_decode(vae, z, tile=12, overlap=12)
    with pytest.raises(ValueError, match="stats must be .exact., .sample., .proxy. or .tile., got .global."):
        tiled_decode(vae, z, stats="global")
    with pytest.raises(ValueError, match=r"expected latents of shape \[N, 4, h, w\]"):
        tiled_decode(vae, torch.zeros(1, 3, 20, 20))
    with pytest.raises(ValueError, match="tile must be >= 8 px, got 4"):
        tiled_encode(vae, images(n=1), tile=4, overlap=0)
    with pytest.raises(ValueError, match="stats_memory must be > 0"):
        tiled_encode(vae, images(n=1), stats_memory=0)


def test_statistics_sample_reports_the_batch(vae):
    tiles, crops = tiling.statistics_sample(vae, "decode", (1, 4, 21, 26), tile=12, overlap=10, stats_memory=None)
    assert tiles == crops == len(_windows(21, 12, 10)) * len(_windows(26, 12, 10))
    assert tiling.statistics_sample(vae, "decode", (1, 4, 21, 26), tile=12, overlap=10, stats_crops=2) == (tiles, 2)
    t, k = tiling.statistics_sample(vae, "encode", (1, 3, 133, 197), tile=96, overlap=64, stats_memory=1)
    assert k == 1 and t > 1


def test_slow_exact_path_warns_and_the_one_pass_path_does_not(vae):
    """When the tiles don't fit the statistics budget, 'exact' says it will take a pass per
    norm layer and how to avoid it; when they fit (and for 'sample') it stays quiet."""
    import warnings

    z = latents(n=1)
    with pytest.warns(RuntimeWarning, match=r"tiled decode: the \d+ tiles would need .* one pass per group-norm"):
        slow = tiled_decode(vae, z, stats="exact", stats_crops=1, **DEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = tiled_decode(vae, z, stats="exact", stats_memory=None, **DEC)  # all tiles: one pass
        tiled_decode(vae, z, stats="sample", stats_crops=1, **DEC)
    torch.testing.assert_close(slow, fast, atol=1e-4, rtol=0)  # both exact
    with pytest.warns(RuntimeWarning, match=r"tiled encode: the \d+ tiles"):
        tiled_encode(vae, images(n=1), stats="exact", stats_crops=1, **ENC)


@pytest.mark.parametrize("op", ["decode", "encode"])
def test_half_precision_nonfinite_result_is_recomputed_in_float32(vae, monkeypatch, op):
    half = copy.deepcopy(vae).to(torch.bfloat16)
    name = f"_{op}_tiles"
    real, dtypes = getattr(tiling, name), []

    def poisoned(model, engine, src, dtype, plan):  # bf16 "overflows"; float32 is the real thing
        dtypes.append(dtype)
        out = real(model, engine, src, dtype, plan)
        return out if dtype == torch.float32 else torch.full_like(out, float("nan"))

    monkeypatch.setattr(tiling, name, poisoned)
    with pytest.warns(RuntimeWarning, match=rf"tiled {op} in torch.bfloat16 gave inf/nan; repeating it in float32"):
        if op == "decode":
            out = tiled_decode(half, latents(n=1).bfloat16(), stats_memory=None, **DEC)
        else:
            out = tiled_encode(half, images(n=1).bfloat16(), stats_memory=None, **ENC).mean
    assert dtypes == [torch.bfloat16, torch.float32]
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
