"""The fast inference path equals the plain modules; training and export are untouched."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize_, tiny_model_config
from latentae.benchmarking import PeakRSS, conv_flops
from latentae.fast import FastConfig, InferenceEngine, VAEOps, optimize_for_inference, subpixel_kernels
from latentae.model import build_vae
from latentae.winograd import winograd_conv3x3, winograd_kernels

# 4 levels like SD (f=8), tiny widths; Winograd forced on from 16 channels so the tests run it.
SD_LIKE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2)
ALL_ON = FastConfig(winograd_min_channels=16)


def pair(cfg, fast=ALL_ON, seed=0):
    """(plain, fast) models with the same weights."""
    plain = randomize_(build_vae(cfg), seed).eval()
    return plain, optimize_for_inference(copy.deepcopy(plain), fast)


def images(n=2, h=32, w=48, seed=1):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_same(fast_vae, plain, x, atol=1e-4):
    with torch.no_grad():
        p, q = plain.encode(x), fast_vae.encode(x)
        torch.testing.assert_close(q.mean, p.mean, atol=atol, rtol=0)
        torch.testing.assert_close(q.logvar, p.logvar, atol=atol, rtol=0)
        torch.testing.assert_close(fast_vae.decode(p.mean), plain.decode(p.mean), atol=atol, rtol=0)
    assert fast_vae.inference is not None


# ----------------------------------------------------------------------------- exact kernels


@pytest.mark.parametrize("h, w", [(5, 7), (8, 8), (1, 3)])
def test_subpixel_kernels_equal_upsample_then_conv(h, w):
    g = torch.Generator().manual_seed(0)
    x, wt, b = torch.randn(2, 6, h, w, generator=g), torch.randn(5, 6, 3, 3, generator=g), torch.randn(5, generator=g)
    ref = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), wt.double(), b.double(), padding=1)
    k, kb = subpixel_kernels(wt, b)
    assert k.shape == (20, 6, 2, 2) and kb.shape == (20,)
    ops = VAEOps(dtype=torch.float32)
    up = torch.nn.Module()
    up.conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    with torch.no_grad():
        up.conv.weight.copy_(wt), up.conv.bias.copy_(b)
        out = ops.upsample(up, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n, ci, co, h, w", [(1, 8, 8, 5, 7), (2, 16, 24, 6, 6), (1, 4, 4, 1, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_winograd_equals_direct_conv(n, ci, co, h, w, with_residual):
    g = torch.Generator().manual_seed(0)
    x, wt = torch.randn(n, ci, h, w, generator=g), torch.randn(co, ci, 3, 3, generator=g)
    b = torch.randn(co, generator=g)
    r = torch.randn(n, co, h, w, generator=g) if with_residual else None
    ref = F.conv2d(x.double(), wt.double(), b.double(), padding=1) + (r.double() if r is not None else 0)
    # band_bytes tiny: many bands, the last one partial
    out = winograd_conv3x3(x, winograd_kernels(wt), b, r, band_bytes=16 * ci * 4 * 3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # Without row padding (the streamed path's halo rows): the rows between the first and last.
    if h > 2:
        core = winograd_conv3x3(x, winograd_kernels(wt), b, r[:, :, 1:-1] if r is not None else None, pad_rows=False)
        torch.testing.assert_close(core.double(), ref[:, :, 1:-1], atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("subpixel", [True, False])
def test_upsample_without_row_padding_is_the_middle_rows(subpixel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 7, 5, generator=g)
    up = torch.nn.Module()
    up.conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    ops = VAEOps(dtype=torch.float32, subpixel_upsample=subpixel)
    with torch.no_grad():
        full, band = ops.upsample(up, x), ops.upsample(up, x, pad_rows=False)
    assert band.shape[2] == 2 * (7 - 2)
    torch.testing.assert_close(band, full[:, :, 2:-2], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- whole model


@pytest.mark.parametrize(
    "kw",
    [
        dict(latent_channels=4, quant=True, **SD_LIKE),
        dict(latent_channels=16, quant=False, **SD_LIKE),
        dict(latent_channels=4, quant=True, attention=False),
    ],
)
def test_fast_equals_plain(kw):
    plain, fast = pair(tiny_model_config(**kw))
    assert_same(fast, plain, images())


@pytest.mark.parametrize(
    "fast_cfg",
    [
        FastConfig(),  # the default: Winograd only from 256 channels, so off here
        FastConfig(channels_last=False, subpixel_upsample=False, winograd_min_channels=None),
        FastConfig(channels_last=False, winograd_min_channels=16),
        FastConfig(channels_last_max_width=16, winograd_min_channels=32),
    ],
)
def test_each_fast_path_setting_equals_plain(fast_cfg):
    plain, fast = pair(tiny_model_config(**SD_LIKE), fast_cfg)
    assert_same(fast, plain, images(n=1))


@pytest.mark.parametrize("h, w", [(33, 47), (5, 3)])
def test_odd_sizes_and_inference_mode(h, w):
    plain, fast = pair(tiny_model_config(**SD_LIKE))
    x = images(n=1, h=h, w=w)
    with torch.inference_mode():
        rec, post = fast(x, sample_posterior=False)
        ref, ref_post = plain(x, sample_posterior=False)
    assert rec.shape == x.shape
    torch.testing.assert_close(rec, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-4, rtol=0)


def test_bad_latents_are_named():
    _, fast = pair(tiny_model_config())
    match = r"expected latents of shape \[N, 4, h, w\], got \(1, 3, 8, 8\)"
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        fast.decode(torch.zeros(1, 3, 8, 8))


def test_config_is_validated():
    with pytest.raises(ValueError, match="compute dtype must be"):
        FastConfig(compute_dtype="fp8")
    with pytest.raises(ValueError, match="winograd_min_channels"):
        FastConfig(winograd_min_channels=0)
    with pytest.raises(TypeError, match="AutoencoderKL"):
        optimize_for_inference(torch.nn.Conv2d(1, 1, 1))


# ----------------------------------------------------------------------------- training, export, caches


def test_training_path_is_the_plain_modules():
    plain, fast = pair(tiny_model_config(**SD_LIKE))

    def boom(*a, **k):
        raise AssertionError("fast path used with gradients on")

    fast.inference.decode = fast.inference.encode = boom
    x = images(n=1)
    rec, post = fast(x, generator=torch.Generator().manual_seed(0))
    ref, _ = plain(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rec, ref)
    (rec.square().mean() + post.kl().mean()).backward()
    assert all(p.grad is not None for p in fast.parameters())


def test_state_dict_unchanged():
    plain, fast = pair(tiny_model_config(**SD_LIKE))
    with torch.no_grad():
        fast.decode(fast.encode(images(n=1)).mean)  # fills the caches
    a, b = plain.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) and b[k].is_contiguous() for k in a)


def test_caches_follow_weight_updates():
    """Sub-pixel, Winograd and fused-qkv weights are derived once; an optimizer step,
    load_state_dict or .to() must invalidate them."""
    plain, fast = pair(tiny_model_config(**SD_LIKE))
    x = images(n=1)
    with torch.no_grad():
        fast.decode(fast.encode(x).mean)
    n_cached = len(fast.inference.cache._entries)
    assert n_cached > 0
    opt = torch.optim.SGD(fast.parameters(), lr=0.5)
    rec, post = fast(x)
    (rec.square().mean() + post.kl().mean()).backward()
    opt.step()
    plain.load_state_dict(fast.state_dict())
    assert_same(fast, plain, x)
    assert len(fast.inference.cache._entries) == n_cached  # replaced, not piled up
    other = randomize_(build_vae(fast.config), seed=5).eval()
    fast.load_state_dict(other.state_dict())
    assert_same(fast, other, x)
    fast.double()  # new parameter tensors
    assert_same(fast, other.double(), x.double(), atol=1e-8)


def test_copies_and_pickles_keep_the_fast_path():
    _, fast = pair(tiny_model_config())
    with torch.no_grad():
        fast.decode(torch.zeros(1, 4, 8, 8))
    fast.inference.upcast[torch.float16] = {"decoder.out"}
    for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert isinstance(twin.inference, InferenceEngine) and twin.inference.config == fast.inference.config
        assert not twin.inference.cache._entries  # caches are not carried over
        assert twin.inference.upcast == {torch.float16: {"decoder.out"}}  # precision decisions are
        assert_same(twin, fast, images(n=1))


def test_load_vae_returns_the_fast_path(tmp_path):
    from latentae.io import load_vae, save_vae_safetensors

    plain = randomize_(build_vae(tiny_model_config())).eval()
    path = save_vae_safetensors(plain, tmp_path / "vae.safetensors")
    loaded = load_vae(path)
    assert isinstance(loaded.inference, InferenceEngine)
    assert_same(loaded, plain, images(n=1))
    assert load_vae(path, fast=False).inference is None


# ----------------------------------------------------------------------------- precision


def test_fp16_overflow_moves_only_the_overflowing_stages_to_fp32_once(overflowing_vae):
    """Like the SD/SDXL decoder in fp16: one up level's residual stream passes 65504; from there
    on (later levels, output) fp16 cannot hold it. The first call finds those stages and
    recomputes them in fp32, later calls run once with them in fp32 and the rest in fp16."""
    half, ref = overflowing_vae
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    calls = []
    real = VAEOps.decoder_out

    def counted(self, vae, x):
        calls.append(self.dtype)
        return real(self, vae, x)

    with torch.no_grad():
        plain_half = copy.deepcopy(half)
        plain_half.inference = None
        assert not torch.isfinite(plain_half.decode(z.half())).all()  # plain fp16 really overflows
        expected = ref.decode(z)
        VAEOps.decoder_out = counted
        try:
            with pytest.warns(RuntimeWarning, match=r"decode in float16 overflowed in decoder.up.1, decoder.up.2, "
                              "decoder.out; for this model these parts now run in float32"):
                out = half.decode(z.half())
            first = list(calls)
            calls.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no second warning, no second recompute
                out2 = half.decode(z.half())
        finally:
            VAEOps.decoder_out = real
    assert first == [torch.float16, torch.float16, torch.float32]  # the pass, the check, the fp32 recompute
    assert calls == [torch.float32]  # later calls: once, output stage in fp32
    assert half.inference.retries == 1
    assert half.inference.upcast == {torch.float16: {"decoder.up.1", "decoder.up.2", "decoder.out"}}
    record = half.inference.precision_record(half)
    assert record["compute_dtype"] == "float16" and record["upcast_to_float32"] == ["decoder.out", "decoder.up.1",
                                                                                     "decoder.up.2"]
    assert out.dtype == torch.float16 and torch.equal(out, out2)
    assert torch.isfinite(expected).all() and expected.abs().max() < 100
    # fp16 in the input convs, mid block and first up level: fp16 rounding, nothing worse
    torch.testing.assert_close(out.float(), expected, atol=5e-3 * expected.abs().max().item(), rtol=0)


def test_a_bad_input_teaches_nothing(overflowing_vae):
    """A NaN in the input is not finite in fp32 either: no stage is moved to fp32 for it."""
    half, _ = overflowing_vae
    z = torch.randn(1, 4, 8, 8).half()
    z[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        out = half.decode(z)
    assert not torch.isfinite(out).all() and half.inference.upcast == {}


def test_bf16_nonfinite_output_is_recomputed_in_fp32(monkeypatch):
    plain, fast = pair(tiny_model_config(), FastConfig(compute_dtype="bfloat16"))
    real = VAEOps.decoder_out

    def poisoned(self, vae, x):
        out = real(self, vae, x)
        return out * float("inf") if self.dtype == torch.bfloat16 else out

    monkeypatch.setattr(VAEOps, "decoder_out", poisoned)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="decode in bfloat16 overflowed in decoder.out"):
        out = fast.decode(z)
        ref = plain.decode(z)
    assert fast.inference.retries == 1 and out.dtype == torch.float32
    assert fast.inference.upcast == {torch.bfloat16: {"decoder.out"}}
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_bf16_compute_is_close_and_the_default_keeps_the_model_dtype():
    plain, fast = pair(tiny_model_config(), FastConfig(compute_dtype="bfloat16"))
    assert fast.inference.compute_dtype(fast) == torch.bfloat16
    assert InferenceEngine().compute_dtype(plain) == torch.float32
    assert InferenceEngine().compute_dtype(copy.deepcopy(plain).half()) == torch.float16
    x = images(n=1)
    with torch.no_grad():
        out, ref = fast.decode(fast.encode(x).mean), plain.decode(plain.encode(x).mean)
    assert out.dtype == torch.float32 and fast.inference.retries == 0
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_compiled_path_equals_plain():
    """torch.compile with the 'eager' backend: checks the graph capture, not inductor."""
    plain, fast = pair(tiny_model_config(), FastConfig(compile_backend="eager"))
    assert_same(fast, plain, images(n=1))


def test_compile_true_runs_inductor_with_equal_outputs():
    """compile=True is real torch.compile (inductor: C++ codegen on CPU). The smallest model
    (one level, no attention) keeps the compile short: ~5 s with a warm inductor cache, ~40 s cold."""
    plain = randomize_(build_vae(tiny_model_config(block_out_channels=(8,), norm_num_groups=4, attention=False)), 0)
    fast = optimize_for_inference(copy.deepcopy(plain.eval()), compile=True)
    assert fast.inference.config.compile_backend == "inductor"
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, ref = fast.decode(z), plain.decode(z)
    assert ("decode", (torch.float32,) * 4, "cpu") in fast.inference._compiled  # it did compile (per device type)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- measuring helpers


def test_conv_flops_counts_the_plain_algorithm():
    vae = build_vae(tiny_model_config(attention=False))  # convs only: exactly proportional to area
    d32, d64 = conv_flops(vae, "decode", 32), conv_flops(vae, "decode", 64)
    assert d32 > 0 and d64 == 4 * d32
    with_attention = build_vae(tiny_model_config())
    assert conv_flops(with_attention, "decode", 64) > d64  # attention's QK^T and AV are counted
    # conv_in alone: 2 * H * W * 9 * 3 * 16 MACs is part of the encode count
    assert conv_flops(vae, "encode", 32) > 2 * 32 * 32 * 9 * 3 * 16


_PEAK_CHILD = """
import json, sys, torch
from latentae.benchmarking import PeakRSS
with PeakRSS(reset=sys.argv[1] == "reset") as m:
    x = torch.ones(100_000_000)  # 400 MB
    del x
with PeakRSS(reset=sys.argv[1] == "reset") as quiet:
    y = torch.ones(1000)
print(json.dumps({"peak": m.peak_bytes, "quiet": quiet.peak_bytes, "exact": m.exact}))
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc only")
@pytest.mark.parametrize("mode", ["reset", "fallback"])
def test_peak_rss_sees_torch_allocations(mode):
    # A fresh process, as the benchmarks use it: the fallbacks (ru_maxrss, polling)
    # cannot see a peak below the process's earlier ones.
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak"] > 360e6, r  # the 400 MB tensor was seen
    assert r["quiet"] < 100e6, r  # and the freed memory is not counted against the next block
    if mode == "fallback":
        assert r["exact"] is False


def test_channels_last_is_a_cpu_default_and_a_choice_elsewhere():
    """The layout decision is a plain function of the request and the device type: NHWC on
    CPU (oneDNN), NCHW on CUDA (measured slower there), an explicit choice wins everywhere."""
    from latentae.fast import InferenceEngine, use_channels_last

    assert use_channels_last(None, "cpu") and not use_channels_last(None, "cuda")
    assert use_channels_last(True, "cuda") and not use_channels_last(False, "cpu")
    auto, forced = InferenceEngine(FastConfig()), InferenceEngine(FastConfig(channels_last=True))
    assert auto.ops(torch.float32, "cpu").channels_last and not auto.ops(torch.float32, "cuda").channels_last
    assert forced.ops(torch.bfloat16, "cuda").channels_last
