"""Fast inference for ``AutoencoderKL``: same weights, same results, less work.

``optimize_for_inference(vae)`` attaches an :class:`InferenceEngine` to the model.
From then on ``vae.encode`` / ``vae.decode`` (and ``vae(images)``) take the fast
path whenever autograd is off (``torch.no_grad()`` / ``torch.inference_mode()``);
with gradients on, the plain modules run unchanged, so a model returned by
``load_vae`` can still be trained. ``state_dict()`` is untouched: the engine owns
no parameters, only caches derived from them, keyed on each parameter's storage
and version counter so that an optimizer step or ``load_state_dict`` invalidates
them.

What the fast path does differently (every item is exact up to float rounding,
checked against the plain modules in ``tests/test_fast.py``):

* channels-last activations, on CPU (``use_channels_last``): oneDNN's convolutions run
  10-25 % faster in NHWC at 128/256 channels, and the attention tokens become a free
  view. (oneDNN's NHWC fp32 kernels round ~5x more than its NCHW ones - still ~2e-6
  relative per conv; ``channels_last_max_width`` keeps wide tensors NCHW if that
  matters.) Not on CUDA by default: on an H200 (SD-size f8c4, 1024 px) NHWC made
  the fast path 0.73-0.79x of diffusers' speed in fp32/bf16/fp16, NCHW 1.00-1.04x.
* 3x3 convs with >= 256 channels in and out: Winograd F(2x2, 3x3) on CPU fp32
  (``latentae.winograd``), with the bias and the residual add folded in;
* nearest-2x upsample + 3x3 conv computed as four 2x2 convs at the *low*
  resolution, interleaved (sub-pixel): 2.25x fewer MACs in the three upsampler
  convs, the largest convs of the decoder;
* in-place SiLU and residual adds: no fresh buffer per elementwise op (on CPU a
  fresh buffer costs page faults as well as bandwidth);
* fused q/k/v projection and the residual add folded into the output projection.

Precision (``latentae.precision``): a model computes in its own dtype unless a
``compute_dtype`` is asked for. In fp16/bf16 the forward runs as *stages* - the
encoder's conv_in, each down level, mid block, output; the decoder's input convs,
mid block, each up level, output - and when an output is not finite, the call is
recomputed stage by stage: a stage whose half-precision output is not finite
while its float32 output is, is recomputed in float32 *and remembered*
(``InferenceEngine.upcast``), so from then on that stage runs in float32 and the
rest in half precision: later calls run once. (The SD-1.x/SDXL decoder overflows
fp16 in its up levels and output, as diffusers' ``force_upcast`` and the SDXL
fp16-fix experience show; the stages that overflow are found by running, not by
a list.) Stage granularity: coarse enough that the float32 parts stay large
blocks, fine enough that the low-resolution part (mid block, attention) keeps
half precision. ``precision_record(vae)`` says what ran.

torch.compile (``compile_backend``, ``load_vae(..., compile=True)``) is off by
default: on CPU the first call compiles for minutes, which a one-shot
encode/decode never earns back. Compiled code is keyed on the per-stage dtypes,
so an upcast decision recompiles once.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

import torch

from latentae.model import AutoencoderKL, DiagonalGaussian
from latentae.ops import VAEOps, _Cache, subpixel_kernels
from latentae.precision import HALF, cuda_capability, dtype_name, parse_dtype, resolve_compute_dtype


def use_channels_last(requested: bool | None, device_type: str) -> bool:
    """NHWC activations? ``requested`` when given, else on CPU only (see the module docstring)."""
    return requested if requested is not None else device_type == "cpu"


@dataclass(frozen=True)
class FastConfig:
    # NHWC activations (exact). None: on CPU only, see use_channels_last; True/False: everywhere.
    channels_last: bool | None = None
    # Only tensors at most this wide go NHWC (None: all); see the module docstring.
    channels_last_max_width: int | None = None
    # Nearest-2x upsample + 3x3 conv as four 2x2 convs + pixel interleave (exact).
    subpixel_upsample: bool = True
    # 3x3 convs at least this wide (in and out) use Winograd F(2x2,3x3) on CPU fp32:
    # 2.25x fewer MACs, ~1.4x faster at 512 channels, ~1.15x at 256, slower at 128.
    # None: off.
    winograd_min_channels: int | None = 256
    # None: the model's own dtype (the default; never lower behind the user's back).
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # In half precision, recompute stages whose output has inf/nan in float32 (and remember them).
    retry_fp32_on_nonfinite: bool = True
    # torch.compile backend for the whole encode/decode ("inductor"), or None for
    # eager. On CPU the first call compiles for minutes: only for long-running jobs.
    compile_backend: str | None = None

    def __post_init__(self):
        if self.channels_last_max_width is not None and self.channels_last_max_width < 1:
            raise ValueError(f"channels_last_max_width must be >= 1 or None, got {self.channels_last_max_width}")
        if self.winograd_min_channels is not None and self.winograd_min_channels < 1:
            raise ValueError(f"winograd_min_channels must be >= 1 or None, got {self.winograd_min_channels}")
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype", dtype_name(parse_dtype(self.compute_dtype)))


# --------------------------------------------------------------------------- stages
# The unit of the precision decision. A stage is fn(ops, vae, x) -> x; the names are
# also what precision_record() reports and what latentae.streaming runs.

Stage = tuple[str, Callable[[VAEOps, AutoencoderKL, torch.Tensor], torch.Tensor]]


def _up(i: int, o: VAEOps, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return o.level(vae.decoder.up_blocks[i], x)


def _down(i: int, o: VAEOps, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    return o.level(vae.encoder.down_blocks[i], x)


def decoder_stages(vae: AutoencoderKL) -> list[Stage]:
    stages: list[Stage] = [
        ("decoder.in", lambda o, m, z: o.decoder_in(m, z)),
        ("decoder.mid", lambda o, m, x: o.mid(m.decoder.mid_block, x)),
    ]
    stages += [(f"decoder.up.{i}", functools.partial(_up, i)) for i in range(len(vae.decoder.up_blocks))]
    return stages + [("decoder.out", lambda o, m, x: o.decoder_out(m, x))]


def encoder_stages(vae: AutoencoderKL) -> list[Stage]:
    stages: list[Stage] = [("encoder.in", lambda o, m, x: o.conv(m.encoder.conv_in, x))]
    stages += [(f"encoder.down.{i}", functools.partial(_down, i)) for i in range(len(vae.encoder.down_blocks))]
    return stages + [
        ("encoder.mid", lambda o, m, x: o.mid(m.encoder.mid_block, x)),
        ("encoder.out", lambda o, m, x: o.encoder_out(m, x)),
    ]


def _model_dtype(vae: AutoencoderKL) -> torch.dtype:
    return vae.decoder.conv_in.weight.dtype


def _model_device(vae: AutoencoderKL) -> torch.device:
    return vae.decoder.conv_in.weight.device


def _finite(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all())


class InferenceEngine:
    """The fast encode/decode for one model (see the module docstring)."""

    def __init__(self, config: FastConfig = FastConfig()):
        self.config = config
        self.cache = _Cache()
        self._compiled: dict[tuple, Callable] = {}
        # Per half dtype: the stages that overflowed it once and now run in float32.
        self.upcast: dict[torch.dtype, set[str]] = {}
        self.retries = 0  # calls whose output was not finite and were recomputed stage by stage

    # Copies and pickles carry the settings and the precision decisions, not the caches.
    def __getstate__(self):
        return {"config": self.config, "upcast": {dtype_name(k): sorted(v) for k, v in self.upcast.items()}}

    def __setstate__(self, state):
        self.__init__(state["config"])
        self.upcast = {parse_dtype(k): set(v) for k, v in state.get("upcast", {}).items()}

    # -- precision -----------------------------------------------------------
    def compute_dtype(self, vae: AutoencoderKL) -> torch.dtype:
        """The dtype a call on ``vae`` computes in (``latentae.precision.resolve_compute_dtype``);
        stages listed in ``upcast`` run in float32 instead."""
        device = _model_device(vae)
        return resolve_compute_dtype(
            _model_dtype(vae), device.type, self.config.compute_dtype, cuda_capability=cuda_capability(device)
        )

    def stage_dtype(self, dtype: torch.dtype, stage: str) -> torch.dtype:
        return torch.float32 if stage in self.upcast.get(dtype, ()) else dtype

    def mark_upcast(self, dtype: torch.dtype, stages: list[str], what: str) -> None:
        """Remember that ``stages`` overflow ``dtype``: they run in float32 from now on."""
        if not stages:
            return
        self.upcast.setdefault(dtype, set()).update(stages)
        warnings.warn(
            f"{what} in {dtype_name(dtype)} overflowed in {', '.join(stages)}; for this model these parts now run "
            f"in float32, the rest in {dtype_name(dtype)} (float32 parts: {', '.join(sorted(self.upcast[dtype]))})",
            RuntimeWarning,
            stacklevel=6,  # the caller of vae.decode / vae.encode
        )

    def precision_record(self, vae: AutoencoderKL) -> dict[str, Any]:
        """JSON-ready: what a call on ``vae`` computes in (see ``latentae.precision.precision_record``)."""
        dtype = self.compute_dtype(vae)
        return {
            "compute_dtype": dtype_name(dtype),
            "model_dtype": dtype_name(_model_dtype(vae)),
            "requested": self.config.compute_dtype,
            "upcast_to_float32": sorted(self.upcast.get(dtype, ())),
            "nonfinite_recomputes": self.retries,
            "fast_path": True,
        }

    # -- running -------------------------------------------------------------
    def ops(self, dtype: torch.dtype, device_type: str, cached: bool = True) -> VAEOps:
        c = self.config
        return VAEOps(
            dtype=dtype,
            channels_last=use_channels_last(c.channels_last, device_type),
            channels_last_max_width=c.channels_last_max_width,
            subpixel_upsample=c.subpixel_upsample,
            winograd_min_channels=c.winograd_min_channels,
            cache=self.cache if cached else None,
        )

    def _forward(self, what: str, vae: AutoencoderKL, x: torch.Tensor, stages: list[Stage], dtypes: tuple):
        """One pass, each stage in its dtype (eager, or compiled per dtype plan)."""
        backend = self.config.compile_backend
        if backend is None:
            return self._runner(stages, dtypes, x.device.type, cached=True)(vae, x)
        key = (what, dtypes, x.device.type)
        if key not in self._compiled:  # compiled code derives its weights inline: no cache
            forward = self._runner(stages, dtypes, x.device.type, cached=False)
            self._compiled[key] = torch.compile(forward, backend=backend, dynamic=False)
        return self._compiled[key](vae, x)

    def _runner(self, stages: list[Stage], dtypes: tuple, device_type: str, cached: bool) -> Callable:
        """``forward(vae, x)``: the stages in turn, each in its dtype (the ops built here, outside any compile)."""
        ops = {dt: self.ops(dt, device_type, cached) for dt in set(dtypes)}

        def forward(vae_: AutoencoderKL, x_: torch.Tensor) -> torch.Tensor:
            for (_, fn), dt in zip(stages, dtypes):
                x_ = fn(ops[dt], vae_, ops[dt].layout(x_))
            return x_

        return forward

    def _recover(self, what: str, vae: AutoencoderKL, x: torch.Tensor, stages: list[Stage], dtype: torch.dtype):
        """Stage by stage, checking each output: a stage that overflows ``dtype`` (non-finite in
        half precision, finite in float32) is recomputed from its input in float32 and remembered.
        A stage that is not finite in float32 either has a bad input: stop, return it as it is."""
        new = []
        for name, fn in stages:
            dt = self.stage_dtype(dtype, name)
            o = self.ops(dt, x.device.type)
            y = fn(o, vae, o.layout(x))
            if not _finite(y):
                if dt == torch.float32:
                    return y
                o32 = self.ops(torch.float32, x.device.type)
                y = fn(o32, vae, o32.layout(x))
                if not _finite(y):
                    return y
                new.append(name)
            x = y
        self.mark_upcast(dtype, new, what)
        return x

    def _call(self, what: str, vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(vae)
        stages = decoder_stages(vae) if what == "decode" else encoder_stages(vae)
        dtypes = tuple(self.stage_dtype(dtype, name) for name, _ in stages)
        out = self._forward(what, vae, x, stages, dtypes)
        if self.config.retry_fp32_on_nonfinite and any(d in HALF for d in dtypes) and not _finite(out):
            self.retries += 1
            out = self._recover(what, vae, x, stages, dtype)
        return out.to(_model_dtype(vae)).contiguous()

    def decode(self, vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
        c = vae.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"expected latents of shape [N, {c}, h, w], got {tuple(latents.shape)}")
        return self._call("decode", vae, latents)

    def moments(self, vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
        """The encoder's output [N, 2C, h, w] (mean and logvar), images padded like ``vae.encode``."""
        x, _ = vae._check_size(images)
        return self._call("encode", vae, x)

    def encode(self, vae: AutoencoderKL, images: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(vae, images))


def optimize_for_inference(
    vae: AutoencoderKL,
    config: FastConfig = FastConfig(),
    *,
    compute_dtype: str | torch.dtype | None = None,
    compile: bool | None = None,
) -> AutoencoderKL:
    """Make ``vae.encode``/``vae.decode`` take the fast path under ``torch.no_grad()``.

    ``compute_dtype`` (float32 / bfloat16 / float16) and ``compile`` (torch.compile with
    inductor) override ``config``. Returns the same model (not a copy); parameters
    and ``state_dict()`` are unchanged. Undo with ``vae.inference = None``.
    """
    if not isinstance(vae, AutoencoderKL):
        raise TypeError(f"optimize_for_inference expects a latentae AutoencoderKL, got {type(vae).__name__}")
    if compute_dtype is not None:
        config = replace(config, compute_dtype=compute_dtype)  # FastConfig normalises and checks it
    if compile is not None:
        config = replace(config, compile_backend="inductor" if compile else None)
    vae.inference = InferenceEngine(config)
    return vae


__all__ = [
    "FastConfig",
    "InferenceEngine",
    "VAEOps",
    "Stage",
    "decoder_stages",
    "encoder_stages",
    "optimize_for_inference",
    "subpixel_kernels",
    "use_channels_last",
]
