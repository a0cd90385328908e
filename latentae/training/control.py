"""Once per optimizer step, all processes agree on what happened and what happens next.

``agree`` is the step's only collective and only host sync: one all-reduce (sum) of one
small vector holding every logged scalar of the step, the image count and each
process's requests, then one copy to the host. From it every process knows the same
things at the same step: the mean of each loss term and gradient norm (for the log and
the non-finite check), and whether any process asked to checkpoint or to stop.

Requests come from ``RunControl`` (this process's wishes, raised at any moment, e.g.
from a signal handler or a wall-clock check) and take effect only through ``agree``,
so all ranks act on them at the same step: a checkpoint is a collective, and a rank
that stops alone leaves the others hanging in their next collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from latentae.training.step import StepOutput


class RunControl:
    """This process's requests, to be agreed on at the end of the current step.

    Safe to call from a signal handler (it only sets attributes).
    """

    def __init__(self):
        self.stop_reason: str | None = None
        self.checkpoint_reason: str | None = None

    def request_stop(self, reason: str) -> None:
        """Checkpoint at the end of the current step on every rank, then end the run (exit 0)."""
        self.stop_reason = reason

    def request_checkpoint(self, reason: str) -> None:
        """Checkpoint at the end of the current step on every rank, then go on."""
        self.checkpoint_reason = reason

    def local_flags(self) -> list[float]:
        return [float(self.stop_reason is not None), float(self.checkpoint_reason is not None)]

    def checkpoint_done(self) -> None:
        self.checkpoint_reason = None


@dataclass(frozen=True)
class StepReport:
    """What every process knows after optimizer step ``step`` (0-based) was agreed on."""

    step: int
    values: dict[str, float]  # each logged scalar, mean over processes
    images: int  # images trained on in this step, all processes
    lr: float
    disc_lr: float | None
    stop: bool  # some process asked to stop: checkpoint now, then end
    checkpoint: bool  # some process asked for a checkpoint now


def agree(acc: Accelerator, out: StepOutput, control: RunControl, *, step: int) -> StepReport:
    """One all-reduce and one host sync for the whole step (see the module docstring)."""
    keys = sorted(out.values)
    device_part = torch.stack([out.values[k].float().reshape(()) for k in keys]) if keys else None
    host_part = torch.tensor([float(out.images), *control.local_flags()], dtype=torch.float32)
    device = device_part.device if device_part is not None else acc.device
    if device.type == "cuda":
        # A blocking host-to-device copy would wait for the queued step; pinned + non_blocking does not.
        host_part = host_part.pin_memory().to(device, non_blocking=True)
    vector = host_part if device_part is None else torch.cat([device_part, host_part.to(device)])
    world = acc.num_processes
    if world > 1:
        vector = acc.reduce(vector, "sum")
    numbers = vector.tolist()  # the step's one host sync
    values = {k: v / world for k, v in zip(keys, numbers)}
    images, stop, checkpoint = numbers[len(keys):]
    return StepReport(step, values, int(round(images)), out.lr, out.disc_lr, stop > 0, checkpoint > 0)


__all__ = ["RunControl", "StepReport", "agree"]
