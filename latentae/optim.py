"""Optimisers and the learning-rate schedule.

The schedule is a pure function of the optimizer step (linear warm-up, then
constant or cosine), applied by writing ``param_group["lr"]`` before each step.
Being stateless, it needs nothing in a checkpoint beyond the step itself and a
resumed run gets bit-identical learning rates; it also never drifts when an fp16
step is skipped (torch's LR schedulers count calls, not steps).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal

import torch
from torch import nn


def build_optimizer(
    params: Iterable[nn.Parameter],
    *,
    kind: Literal["adam", "adamw"],
    lr: float,
    betas: tuple[float, ...],
    weight_decay: float,
    impl: Literal["fused", "foreach", "for_loop"] = "foreach",
) -> torch.optim.Optimizer:
    """Adam (L2 penalty folded into the gradient) or AdamW (decoupled decay).

    ``impl``: "fused" (one kernel over all tensors; needs the parameters on their device
    already), "foreach" (a few batched kernels) or "for_loop" (one tensor at a time).
    All three compute the same update up to float rounding (tested); each is
    deterministic for a fixed parameter list, so resume stays bit-identical.
    ``latentae.training.policy.optimizer_impl`` picks fused on CUDA and CPU, foreach elsewhere.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the optimizer got no trainable parameters")
    if impl not in ("fused", "foreach", "for_loop"):
        raise ValueError(f"optimizer impl must be fused, foreach or for_loop, got {impl!r}")
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    flags = {"fused": impl == "fused", "foreach": impl == "foreach"}
    return cls(params, lr=lr, betas=(betas[0], betas[1]), weight_decay=weight_decay, **flags)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based).

    Warm-up: linear from 1/warmup to 1 over ``warmup_steps`` steps (never 0: a zero
    first step would waste a batch). Then "constant" stays 1; "cosine" decays from 1
    to ``min_ratio`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["build_optimizer", "lr_factor", "set_lr"]
