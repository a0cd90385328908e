"""Exponential moving average of the VAE's weights (what the export uses by default).

    ema <- ema + (1 - decay) * (weights - ema)      every ``every`` optimizer steps

The average lives in a full fp32 copy of the model, so it can be evaluated and
saved with the same code as the model itself. Under mixed precision the trained
weights are fp32 masters too, so nothing is rounded on the way in.

The copy is a *plain* module: whatever was patched onto the source instance (an
autocast-wrapped ``forward`` as Accelerate's mixed precision installs, an
``nn.Module.compile()`` call implementation) is removed, so evaluating the EMA runs
its own eager fp32 forward, never a wrapper (which for ``compile()`` would even call
the *source* model, since a deep copy keeps the compiled function's binding).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.decay, self.every = decay, every
        self.model = plain_copy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step ``step`` (0-based) with the trained (unwrapped) model."""
        if (step + 1) % self.every:
            return
        ema = list(self.model.parameters())
        cur = [p.detach().float() for p in model.parameters()]
        if len(ema) != len(cur):
            raise RuntimeError(f"EMA tracks {len(ema)} parameters, the model has {len(cur)}")
        # lerp is exact for frozen parameters (lerp(a, a, w) == a), so a decoder-only
        # fine-tune keeps the EMA encoder bit-identical to the starting one.
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with instance-level forward patches removed (see the module docstring)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        m.__dict__.pop("forward", None)  # instance attribute shadowing the class's forward
        m.__dict__.pop("_original_forward", None)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return out


__all__ = ["EMA", "plain_copy"]
