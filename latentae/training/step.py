"""One optimizer step of the VAE (and the discriminator), with no host sync inside.

    for each of grad_accum_steps micro-batches:        (DDP gradient sync only on the last)
        plan = draw_plan(...)                          regularisers' choices, seeded by (seed, step, rank, micro)
        out = vae(x, plan, noise)                      the *prepared* TrainingForward: DDP sees every decode
        loss = VAELoss.generator_loss(out.target, out.reconstruction, out.posterior, D, scaled=out.scaled)
        backward(scale(loss / grad_accum_steps))       (D frozen inside, unwrapped)
    unscale, clip, Adam/AdamW step (VAE + learned logvar), scale update, EMA update
    if the discriminator trains at this step:
        for each micro-batch: backward(scale(VAELoss.discriminator_loss(target, rec.detach(), D) / accum))
        unscale, clip, step, scale update

Every logged number stays a device tensor; the loop reads them all at once, after the
step, in ``control.agree`` (one collective, one host sync), and that is also where a
non-finite loss or gradient stops the run, before anything of this step is saved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from latentae.data import hash_seed
from latentae.optim import lr_factor, set_lr
from latentae.training.forward import draw_plan

if TYPE_CHECKING:
    from latentae.recipe import Config
    from latentae.training.setup import Parts


@dataclass
class StepOutput:
    values: dict[str, Tensor]  # device scalars: loss terms (mean over micro-batches), grad norms, amp scales
    images: int  # images this process trained on
    lr: float  # the VAE's learning rate at this step (schedule applied)
    disc_lr: float | None  # the discriminator's, when it trained
    skipped: list[tuple[str, str]] = field(default_factory=list)  # bad samples the loader skipped


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_norm: float) -> Tensor:
    """Unscale (fp16), clip, step, update the loss scale; returns the gradient norm (a device tensor).

    The norm is of the unscaled gradients, before clipping (max_norm <= 0: measured, not
    clipped). With fp16 an inf/NaN gradient makes the scaler skip this optimizer's step
    and halve *its* scale; other optimizers and scalers are untouched. Without fp16 the
    step is taken whatever the norm; the loop stops the run after the step when it is
    not finite (nothing is saved from that state).
    """
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)  # batched, stays on the device
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    return norm.detach()


def train_step(parts: Parts, cfg: Config, step: int, batches: Iterator[dict]) -> StepOutput:
    """Optimizer step number ``step`` (0-based): VAE, then the discriminator when it trains."""
    acc, tc, device = parts.acc, cfg.train, parts.device
    accum, rank = tc.grad_accum_steps, acc.process_index
    autocast = torch.autocast(device.type, dtype=parts.autocast_dtype, enabled=parts.autocast_dtype is not None)
    factor = lr_factor(step, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps,
                       schedule=tc.lr_schedule, min_ratio=tc.min_lr_ratio)  # fmt: skip
    set_lr(parts.vae_opt, parts.lrs.vae * factor)
    values: dict[str, Tensor] = {}
    kept: list[tuple[Tensor, Tensor]] = []  # (targets, detached reconstructions) for the discriminator
    skipped: list[tuple[str, str]] = []
    n_images = 0
    noise = parts.noise
    parts.vae_opt.zero_grad(set_to_none=True)
    for micro in range(accum):
        # The DataLoader draws its worker base seed from the global torch RNG when it
        # starts; fork_rng keeps that out of the training RNG stream, so a resumed run
        # (whose loader starts at a different moment) has the very same RNG states.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        skipped += batch["skipped"]
        x = batch["image"].to(device, non_blocking=True)  # [B, 3, R, R] in [-1, 1]
        if tc.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n_images += len(x)
        # Every random choice of the step is a function of (seed, step, rank, micro-batch):
        # a resumed run redraws exactly what the uninterrupted one drew.
        plan = draw_plan(cfg.loss, seed=hash_seed(tc.seed, "regularizers", step, rank, micro), image_size=x.shape[-2:],
                         vae_factor=parts.vae_raw.config.downsample_factor, sample_posterior=tc.sample_posterior)  # fmt: skip
        noise.manual_seed(hash_seed(tc.seed, "posterior", step, rank, micro))
        sync = acc.no_sync(parts.vae) if micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast:
                out = parts.vae_forward(x, plan, noise)
                loss, logs = parts.loss.generator_loss(
                    out.target, out.reconstruction, out.posterior, step=step, last_layer=parts.vae_raw.last_layer,
                    discriminator=parts.disc_judge, scaled=out.scaled,
                )  # fmt: skip
            parts.vae_scaler.scale(loss / accum).backward()
        logs.update(out.logs)
        # In an EQ-VAE step the discriminator judges the transformed pair, as the paper's code does.
        kept.append((out.target, out.reconstruction.detach()))
        _accumulate(values, logs, accum)
    extra = parts.loss.trainable_parameters()
    if extra and acc.num_processes > 1:
        # The loss module is not DDP-wrapped: average the learned logvar's gradient by hand.
        for p in extra:
            p.grad = acc.reduce(p.grad, "mean")
    values["grad_norm"] = optimizer_step(parts.vae_opt, parts.vae_scaler, tc.clip_grad_norm)
    if parts.vae_scaler.is_enabled():
        values["amp/scale"] = parts.vae_scaler._get_scale_async().detach().float()

    disc_lr = None
    if parts.disc is not None and parts.loss.disc_active(step):
        disc_lr = parts.lrs.disc * factor
        set_lr(parts.disc_opt, disc_lr)
        parts.disc_opt.zero_grad(set_to_none=True)
        for micro, (x, rec) in enumerate(kept):
            sync = acc.no_sync(parts.disc) if micro < accum - 1 else contextlib.nullcontext()
            with sync:
                with autocast:
                    d_loss, dlogs = parts.loss.discriminator_loss(x, rec, step=step, discriminator=parts.disc_forward)
                parts.disc_scaler.scale(d_loss / accum).backward()
            _accumulate(values, dlogs, accum, prefix="disc/")
        values["disc/grad_norm"] = optimizer_step(parts.disc_opt, parts.disc_scaler, tc.clip_grad_norm)
        if parts.disc_scaler.is_enabled():
            values["amp/disc_scale"] = parts.disc_scaler._get_scale_async().detach().float()
    if parts.ema is not None:
        parts.ema.update(parts.vae_raw, step)
    return StepOutput(values, n_images, parts.lrs.vae * factor, disc_lr, skipped)


# Which logged values must be finite, and what to call them in the error.
def _accumulate(values: dict[str, Tensor], logs: dict[str, Tensor], accum: int, prefix: str = "") -> None:
    """Add a micro-batch's logs (each / ``accum``) into the step's ``values`` under ``prefix``."""
    for k, v in logs.items():
        k = prefix + k
        values[k] = values[k] + v / accum if k in values else v / accum


GRADIENT_NORMS = {"grad_norm": "VAE", "disc/grad_norm": "discriminator"}


def nonfinite_problem(values: dict[str, float], step: int, *, fp16: bool) -> str | None:
    """The first non-finite loss term (then gradient norm) of an agreed step, described; None if all finite.

    With fp16 a non-finite gradient norm is the loss scaler's business (it skipped the
    step and lowered the scale), not an error; a non-finite loss always is.
    """
    for what, prefix in (("loss", ""), ("discriminator loss", "disc/")):
        terms = [k for k in values if k.startswith(prefix) and (prefix or "/" not in k) and k not in GRADIENT_NORMS]
        bad = [k[len(prefix):] for k in terms if not math.isfinite(values[k])]
        if bad:
            shown = ", ".join(f"{k[len(prefix):]}={values[k]:.4g}" for k in sorted(terms))
            return f"non-finite {what} at step {step}: {', '.join(repr(k) for k in bad)} (mean over processes: {shown})"
    if not fp16:
        for key, name in GRADIENT_NORMS.items():
            if key in values and not math.isfinite(values[key]):
                return f"non-finite {name} gradient norm at step {step} ({values[key]}) although the loss was finite"
    return None


__all__ = ["GRADIENT_NORMS", "StepOutput", "nonfinite_problem", "optimizer_step", "train_step"]
