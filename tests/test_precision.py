"""The precision policy: a model computes in its own dtype unless asked; bf16 only where it runs; what ran is recorded."""

import pytest
import torch

import latentae.fast as fast
from conftest import randomize_, tiny_model_config
from latentae.fast import FastConfig, InferenceEngine, optimize_for_inference
from latentae.model import build_vae
from latentae.precision import PrecisionError, parse_dtype, precision_record, resolve_compute_dtype

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "model, device, requested, capability, expected",
    [
        (F32, "cuda", None, (9, 0), F32),  # the old "auto" computed bf16 here: never lower than the model unasked
        (F32, "cpu", None, None, F32),
        (F16, "cuda", None, (7, 5), F16),  # an fp16 model computes in fp16
        (BF16, "cpu", None, None, BF16),
        (F32, "cuda", "bfloat16", (8, 0), BF16),  # asked for: computed
        (F32, "cuda", "bf16", (9, 0), BF16),
        (F32, "cuda", "fp16", (7, 0), F16),
        (F16, "cuda", "float32", (7, 0), F32),  # an fp16 model computing in fp32 when asked
        (F32, "cpu", torch.float16, None, F16),
        (F32, "cuda", "bfloat16", None, BF16),  # capability unknown: not refused
    ],
)
def test_policy(model, device, requested, capability, expected):
    assert resolve_compute_dtype(model, device, requested, cuda_capability=capability) == expected


@pytest.mark.parametrize("model, requested", [(F32, "bfloat16"), (BF16, None)])
def test_bf16_is_refused_on_gpus_without_it(model, requested):
    with pytest.raises(PrecisionError, match=r"compute capability >= 8.0 .* this one is 7.5.*float16"):
        resolve_compute_dtype(model, "cuda", requested, cuda_capability=(7, 5))
    assert resolve_compute_dtype(model, "cpu", requested) == BF16  # the CPU has bf16 kernels


@pytest.mark.parametrize("bad", ["auto", "fp8", torch.int8])
def test_unknown_dtypes_are_named(bad):
    with pytest.raises(PrecisionError, match="float32, bfloat16 or float16"):
        parse_dtype(bad)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        FastConfig(compute_dtype=bad)


def test_engine_on_a_cuda_device_without_a_gpu(monkeypatch):
    """The engine asks the policy with the model's device and the GPU's capability."""
    vae = build_vae(tiny_model_config()).eval()
    seen = []
    monkeypatch.setattr(fast, "_model_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(fast, "cuda_capability", lambda d: seen.append(d) or (7, 5))
    assert InferenceEngine().compute_dtype(vae) == F32
    assert InferenceEngine(FastConfig(compute_dtype="float16")).compute_dtype(vae) == F16
    with pytest.raises(PrecisionError, match="7.5"):
        InferenceEngine(FastConfig(compute_dtype="bfloat16")).compute_dtype(vae)
    assert seen and all(d == torch.device("cuda", 0) for d in seen)
    monkeypatch.setattr(fast, "cuda_capability", lambda d: (9, 0))
    record = InferenceEngine(FastConfig(compute_dtype="bf16")).precision_record(vae)
    assert record["compute_dtype"] == "bfloat16" and record["model_dtype"] == "float32"
    assert record["requested"] == "bfloat16"


def test_load_vae_stores_and_computes_as_asked(tmp_path):
    from latentae.io import load_vae, save_vae_safetensors

    path = save_vae_safetensors(randomize_(build_vae(tiny_model_config())).eval(), tmp_path / "vae.safetensors")
    default = load_vae(path)
    assert precision_record(default)["compute_dtype"] == "float32"
    stored = load_vae(path, dtype=torch.bfloat16)
    assert stored.decoder.conv_in.weight.dtype == BF16 and precision_record(stored)["compute_dtype"] == "bfloat16"
    mixed = load_vae(path, compute_dtype="bfloat16")
    assert mixed.decoder.conv_in.weight.dtype == F32
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = default.decode(z), mixed.decode(z), stored.decode(z.bfloat16())
    assert b.dtype == F32 and c.dtype == BF16  # outputs come back in the weights' dtype
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()  # bf16 compute: really bf16, and close
    assert precision_record(mixed) == {
        "compute_dtype": "bfloat16", "model_dtype": "float32", "requested": "bfloat16",
        "upcast_to_float32": [], "nonfinite_recomputes": 0, "fast_path": True,
    }
    with pytest.raises(ValueError, match="need the fast inference path"):
        load_vae(path, fast=False, compute_dtype="float16")
    plain = load_vae(path, fast=False)
    assert precision_record(plain)["compute_dtype"] == "float32" and not precision_record(plain)["fast_path"]


def test_optimize_for_inference_overrides_the_config():
    vae = optimize_for_inference(build_vae(tiny_model_config()), FastConfig(channels_last=False), compute_dtype="fp16",
                                 compile=True)
    assert vae.inference.config == FastConfig(channels_last=False, compute_dtype="float16", compile_backend="inductor")


def test_compare_records_the_dtype_that_ran(tmp_path):
    """compare --dtype bfloat16 computes in bf16 and says so in metrics.json (per VAE)."""
    import json

    from PIL import Image

    from latentae.compare import CompareConfig, run_compare
    from latentae.io import save_vae_safetensors

    path = save_vae_safetensors(randomize_(build_vae(tiny_model_config())).eval(), tmp_path / "vae.safetensors")
    img = Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy())
    cfg = CompareConfig(lpips="off", fid="off", dtype="bfloat16", max_report_images=0)
    summary = run_compare([("a", str(path))], [("x", img)], tmp_path / "out", cfg)
    stored = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for s in (summary, stored):
        assert s["vaes"][0]["precision"]["compute_dtype"] == "bfloat16"
        assert s["vaes"][0]["precision"]["upcast_to_float32"] == []
