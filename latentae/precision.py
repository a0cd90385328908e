"""Which dtype a VAE computes in: one plain function, so the policy is testable without a GPU.

The policy (``resolve_compute_dtype``):

* a model computes in **its own dtype** (the dtype of its weights) unless a compute
  dtype is asked for: an fp32 model computes in fp32 on CPU *and* on CUDA. Lower
  precision is never picked behind the user's back (bf16 vs fp32 encoder moments
  differ by up to ~1.4% of the largest value, more than fp16 storage rounding);
* ``requested`` ("float32" / "bfloat16" / "float16", or fp32/bf16/fp16) wins when given:
  ``load_vae(path, dtype=torch.bfloat16)`` stores and computes in bf16,
  ``load_vae(path, compute_dtype="bfloat16")`` keeps fp32 weights and computes in bf16;
* bf16 on a CUDA GPU of compute capability < 8.0 (before Ampere: V100, T4, ...) is
  refused with an error that names the capability: those GPUs have no bf16 tensor
  cores, cuDNN has no bf16 convolutions there, and an emulated or failing run is
  worse than a clear choice between float16 and float32.

What actually ran - the compute dtype and the parts that were moved to float32 after
a half-precision overflow (``latentae.fast``) - is ``precision_record(vae)``: the
tools store it next to their results.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
HALF = (torch.float16, torch.bfloat16)
BF16_MIN_CUDA_CAPABILITY = (8, 0)


class PrecisionError(ValueError):
    """A compute dtype that cannot run as asked (unknown name, unsupported by the device)."""


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """"float16" / "fp16" / torch.float16 -> torch.float16; None -> None."""
    if value is None or isinstance(value, torch.dtype):
        if isinstance(value, torch.dtype) and value not in DTYPES.values():
            raise PrecisionError(f"compute dtype must be float32, bfloat16 or float16, got {value}")
        return value
    name = ALIASES.get(str(value).lower(), str(value).lower())
    if name not in DTYPES:
        raise PrecisionError(f"compute dtype must be float32, bfloat16 or float16 (or fp32/bf16/fp16), got {value!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_compute_dtype(
    model_dtype: torch.dtype,
    device_type: str,
    requested: str | torch.dtype | None = None,
    *,
    cuda_capability: tuple[int, int] | None = None,
) -> torch.dtype:
    """The dtype a model of ``model_dtype`` on ``device_type`` computes in (see the module docstring).

    ``cuda_capability``: (major, minor) of the CUDA device, or None when unknown / not CUDA.
    """
    dtype = parse_dtype(requested) or model_dtype
    if (
        dtype == torch.bfloat16
        and device_type == "cuda"
        and cuda_capability is not None
        and tuple(cuda_capability) < BF16_MIN_CUDA_CAPABILITY
    ):
        major, minor = cuda_capability
        raise PrecisionError(
            f"bfloat16 compute needs a CUDA GPU of compute capability >= 8.0 (Ampere or newer); this one is "
            f"{major}.{minor}. Load the VAE with dtype/compute_dtype float16 (faster, may overflow: handled) or float32."
        )
    return dtype


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def precision_record(vae: Any) -> dict[str, Any]:
    """What a call on ``vae`` computes in, for job records and reports (JSON-ready).

    ``{"compute_dtype": "float16", "model_dtype": "float16", "requested": None,
    "upcast_to_float32": ["decoder.up.1", ...], "nonfinite_recomputes": 1, "fast_path": True}``
    ``upcast_to_float32``: the parts that overflowed the compute dtype once and now run in
    float32 for this model; ``nonfinite_recomputes``: calls whose output had to be recomputed.
    """
    engine = getattr(vae, "inference", None)
    if engine is not None and hasattr(engine, "precision_record"):
        return engine.precision_record(vae)
    weight = next(vae.parameters())
    name = dtype_name(weight.dtype)
    return {
        "compute_dtype": name,
        "model_dtype": name,
        "requested": None,
        "upcast_to_float32": [],
        "nonfinite_recomputes": 0,
        "fast_path": False,
    }


__all__ = [
    "DTYPES",
    "HALF",
    "PrecisionError",
    "cuda_capability",
    "dtype_name",
    "parse_dtype",
    "precision_record",
    "resolve_compute_dtype",
]
