"""The inference paths on the accelerator: on a CUDA machine these run on the GPU
(``tools/gpu_check.py`` runs this file), elsewhere on the CPU, so the same code is checked here.
Tiny models: seconds on either."""

import copy
import warnings

import pytest
import torch

from conftest import randomize_, tiny_model_config
from latentae.fast import FastConfig, optimize_for_inference
from latentae.model import build_vae
from latentae.precision import HALF, PrecisionError, cuda_capability, resolve_compute_dtype
from latentae.tiling import tiled_decode, tiled_encode

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SD_LIKE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 on Ampere+ convolutions defaults to TF32 (10-bit mantissa): compare real fp32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def pair(cfg=None, fast=FastConfig(), seed=0):
    plain = randomize_(build_vae(cfg or tiny_model_config(**SD_LIKE)), seed).eval().to(DEVICE)
    return plain, optimize_for_inference(copy.deepcopy(plain), fast)


def test_fast_path_equals_plain():
    plain, fast = pair()
    x = torch.rand(2, 3, 64, 80, device=DEVICE) * 2 - 1
    with torch.no_grad():
        p, q = plain.encode(x), fast.encode(x)
        torch.testing.assert_close(q.mean, p.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(fast.decode(p.mean), plain.decode(p.mean), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_half_compute_is_close_and_recorded(dtype):
    cap = cuda_capability(DEVICE)
    try:
        expected = resolve_compute_dtype(torch.float32, DEVICE.type, dtype, cuda_capability=cap)
    except PrecisionError:  # bf16 on a pre-Ampere GPU: the fast path must refuse it too
        _, fast = pair(fast=FastConfig(compute_dtype=str(dtype).removeprefix("torch.")))
        with pytest.raises(PrecisionError):
            fast.inference.compute_dtype(fast)
        return
    plain, fast = pair(fast=FastConfig(compute_dtype=str(dtype).removeprefix("torch.")))
    z = torch.randn(1, 4, 12, 10, device=DEVICE)
    with torch.no_grad():
        out, ref = fast.decode(z), plain.decode(z)
    assert expected == dtype and fast.inference.precision_record(fast)["compute_dtype"] == str(dtype)[6:]
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_fp16_overflow_is_remembered(overflowing_vae):
    half, ref = overflowing_vae
    half, ref = half.to(DEVICE), ref.to(DEVICE)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        expected = ref.decode(z)
        with pytest.warns(RuntimeWarning, match="overflowed in decoder.up.1"):
            out = half.decode(z.half())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out2 = half.decode(z.half())
    assert half.inference.retries == 1 and torch.equal(out, out2)
    assert {"decoder.up.1", "decoder.up.2"} <= half.inference.upcast[torch.float16]
    torch.testing.assert_close(out.float(), expected, atol=5e-3 * expected.abs().max().item(), rtol=0)


def test_streamed_encode_decode_with_spill(tmp_path):
    """Exact tiling on the device; memory=0 sends every kept activation through the disk."""
    _, fast = pair()
    z = torch.randn(1, 4, 14, 18, device=DEVICE)
    x = torch.rand(1, 3, 112, 144, device=DEVICE) * 2 - 1
    with torch.no_grad():
        ref, ref_post = fast.decode(z), fast.encode(x)
    report = {}
    out = tiled_decode(fast, z, tile=6, memory=0, spill_dir=tmp_path, report=report)
    post = tiled_encode(fast, x, tile=32, memory=0, spill_dir=tmp_path)
    assert out.device.type == DEVICE.type and report["peak_disk"] > 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(post.mean, ref_post.mean, atol=1e-4, rtol=0)


def test_compiled_graph_capture():
    """torch.compile's graph capture of the staged forward on the device ('eager' backend: no codegen)."""
    plain, fast = pair(fast=FastConfig(compile_backend="eager"))
    z = torch.randn(1, 4, 8, 8, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast.decode(z), plain.decode(z), atol=1e-4, rtol=0)
