"""Tiled (streamed) encode/decode equal untiled, in about one pass of work, with bounded memory."""

import copy
import errno
import os

import pytest
import torch

import latentae.activations as activations
from conftest import randomize_, tiny_model_config
from latentae.activations import ChannelMoments
from latentae.fast import FastConfig, optimize_for_inference
from latentae.model import build_vae
from latentae.tiling import tiled_decode, tiled_encode, windows

# 4 levels like SD (f=8), tiny widths. These tiles make bands of 2-16 rows: several bands at
# every resolution, halos on both sides, the last band partial.
SD_LIKE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1)
DEC = dict(tile=6)  # latent px
ENC = dict(tile=32)  # image px


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


# all kept in memory / all on disk / the first tensors in memory, the rest on disk
MEMORY = [None, 0, 200_000]


@pytest.mark.parametrize("memory", MEMORY)
def test_tiled_decode_equals_untiled(vae, memory, tmp_path):
    z = latents()
    with torch.no_grad():
        ref = vae.decode(z)
    report = {}
    out = tiled_decode(vae, z, memory=memory, spill_dir=tmp_path, report=report, **DEC)
    assert out.shape == ref.shape == (2, 3, 21 * 8, 26 * 8)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert (report["peak_disk"] > 0) == (memory is not None)
    if memory is not None:  # kept activations within the budget, apart from the result itself
        assert report["peak_in_memory"] <= memory + out.numel() * 4
    assert not list(tmp_path.iterdir())  # spill files are anonymous: nothing left behind


@pytest.mark.parametrize("memory", MEMORY)
def test_tiled_encode_equals_untiled(vae, memory):
    x = images()  # odd size: padded like vae.encode
    with torch.no_grad():
        ref = vae.encode(x)
    post = tiled_encode(vae, x, memory=memory, **ENC)
    assert post.mean.shape == ref.mean.shape == (2, 4, 17, 25)
    torch.testing.assert_close(post.mean, ref.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(post.logvar, ref.logvar, atol=1e-4, rtol=0)


def test_exact_statistics_cost_one_pass(vae):
    """The streamed run does the untiled run's convolutions once - not a pass per norm layer,
    not the overlap of tiles: counted FLOPs equal (Winograd off so both count the same convs),
    but for one extra low-resolution row per band in the sub-pixel upsamplers (here, with
    bands of a few rows, ~5%; at SD size < 1%)."""
    from torch.utils.flop_counter import FlopCounterMode

    plain = optimize_for_inference(copy.deepcopy(vae), FastConfig(winograd_min_channels=None))
    z, x = latents(n=1, h=16, w=20), images(n=1, h=96, w=120)

    def flops(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    dec = flops(lambda: tiled_decode(plain, z, memory=0, **DEC)) / flops(lambda: plain.decode(z))
    enc = flops(lambda: tiled_encode(plain, x, memory=0, **ENC)) / flops(lambda: plain.encode(x))
    assert 1.0 <= dec < 1.08 and 0.999 < enc < 1.001, (dec, enc)
    per_tile = flops(lambda: tiled_decode(plain, z, stats="tile", tile=12, overlap=8)) / flops(lambda: plain.decode(z))
    assert per_tile > 1.5  # overlapping tiles redo their overlap: what streaming avoids


def test_plain_model_without_fast_path_and_f4_model():
    """No optimize_for_inference (tiling makes its own engine); a 3-level f=4 model."""
    plain = randomize_(build_vae(tiny_model_config(block_out_channels=(16, 32, 32))), 1).eval()
    z = latents(n=1, h=19, w=15)
    with torch.no_grad():
        ref = plain.decode(z)
        ref_post = plain.encode(images(n=1, h=70, w=90))
    torch.testing.assert_close(tiled_decode(plain, z, memory=0, **DEC), ref, atol=1e-4, rtol=0)
    post = tiled_encode(plain, images(n=1, h=70, w=90), tile=16)
    torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-4, rtol=0)
    assert plain.inference is None


def test_per_tile_statistics_mode(vae):
    """stats="tile" (diffusers-like, for comparison) runs and really differs: the tests above have teeth."""
    z, x = latents(n=1), images(n=1)
    with torch.no_grad():
        ref, ref_post = vae.decode(z), vae.encode(x)
    out = tiled_decode(vae, z, stats="tile", tile=12, overlap=4)
    post = tiled_encode(vae, x, stats="tile", tile=96, overlap=32)
    assert out.shape == ref.shape and post.mean.shape == ref_post.mean.shape
    assert (out - ref).abs().max() > 1e-3 and (post.mean - ref_post.mean).abs().max() > 1e-3


def test_tile_covering_the_input_is_the_plain_call(vae):
    z, x = latents(h=9, w=7), images(h=60, w=50)
    with torch.no_grad():
        assert torch.equal(tiled_decode(vae, z, tile=9), vae.decode(z))
        p, q = tiled_encode(vae, x, tile=64), vae.encode(x)
    assert torch.equal(p.mean, q.mean) and torch.equal(p.logvar, q.logvar)


def test_bf16_model(vae):
    half = copy.deepcopy(vae).to(torch.bfloat16)
    z = latents(n=1, h=12, w=14)
    out = tiled_decode(half, z.bfloat16(), memory=0, **DEC)
    with torch.no_grad():
        ref, ref_half = vae.decode(z), half.decode(z.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.float() - ref_half.float()).abs().max() < 0.05 * ref.abs().max()


def test_fp16_overflow_is_learned_once_tiled_or_not(overflowing_vae):
    """The streamed decode finds the overflowing stages as the untiled one does, remembers them
    on the model's engine, and afterwards neither path recomputes anything. (The streamed path
    normalises before rounding to fp16, so its output stage does not overflow: it may learn
    fewer stages; an untiled call then learns the rest, once.)"""
    import warnings

    half, ref = overflowing_vae
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.decode(z)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tiled_decode(half, z.half(), memory=0, **DEC)
    messages = [str(w.message) for w in caught]  # one per stage, as each is found
    assert any(m.startswith("tiled decode in float16 overflowed in decoder.up.1;") for m in messages), messages
    assert {"decoder.up.1", "decoder.up.2"} <= half.inference.upcast[torch.float16]
    assert "decoder.mid" not in half.inference.upcast[torch.float16]
    torch.testing.assert_close(out.float(), expected, atol=5e-3 * expected.abs().max().item(), rtol=0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        untiled = half.decode(z.half())  # may learn the output stage
    retries = half.inference.retries
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        again = tiled_decode(half, z.half(), memory=0, **DEC)
        untiled_again = half.decode(z.half())
    assert half.inference.retries == retries  # nothing recomputed any more
    torch.testing.assert_close(again.float(), expected, atol=5e-3 * expected.abs().max().item(), rtol=0)
    torch.testing.assert_close(untiled_again, untiled, atol=0, rtol=0)


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    "size, tile, overlap, align", [(21, 12, 10, 1), (200, 96, 64, 8), (50, 16, 0, 1), (10, 12, 4, 1)]
)
def test_windows_partition_with_margins(size, tile, overlap, align):
    wins = windows(size, tile, overlap, align)
    assert wins[0][2] == 0 and wins[-1][3] == size
    assert all(wins[i][3] == wins[i + 1][2] for i in range(len(wins) - 1))  # cores partition [0, size)
    assert len({e - s for s, e, _, _ in wins}) == 1  # one window size
    for s, e, c0, c1 in wins:
        assert s <= c0 < c1 <= e and s % align == 0 and c0 % align == 0
        if s > 0:
            assert c0 - s >= overlap // 2 - align
        if e < size:
            assert e - c1 >= overlap // 2 - align


def test_channel_moments_merge_exactly():
    x = torch.randn(2, 8, 10, 12) * 3 + 1
    acc = ChannelMoments()
    acc.add(x[:, :, :3]), acc.add(x[:, :, 3:])
    mean, var = acc.group_stats(4)
    ref_var, ref_mean = torch.var_mean(x.double().view(2, 4, -1), dim=-1, correction=0)
    # fp32 group-norm kernel statistics (like an untiled run's), merged in float64
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
    assert acc.finite()
    acc.add(torch.full((2, 8, 1, 12), float("inf")))
    assert not acc.finite()


def test_a_full_disk_is_named_before_the_work(vae, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(activations.os, "posix_fallocate", full)
    with pytest.raises(OSError, match=rf"no room for .* GiB of activations in {tmp_path}.*spill_dir"):
        tiled_decode(vae, latents(n=1), memory=0, spill_dir=tmp_path, **DEC)
    assert not os.listdir(tmp_path)


def test_bad_arguments_are_named(vae):
    z = latents(n=1)
    with pytest.raises(ValueError, match=r"overlap must be in \[0, tile=12\)"):
        tiled_decode(vae, z, stats="tile", tile=12, overlap=12)
    with pytest.raises(ValueError, match="stats must be 'exact' or 'tile', got 'sample'"):
        tiled_decode(vae, z, stats="sample")
    with pytest.raises(ValueError, match=r"expected latents of shape \[N, 4, h, w\]"):
        tiled_decode(vae, torch.zeros(1, 3, 20, 20))
    with pytest.raises(ValueError, match="tile must be >= 8 px, got 4"):
        tiled_encode(vae, images(n=1), tile=4)
    with pytest.raises(ValueError, match="memory must be >= 0"):
        tiled_encode(vae, images(n=1), memory=-1)
