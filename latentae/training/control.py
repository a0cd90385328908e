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

import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from latentae.training.errors import StopNow

if TYPE_CHECKING:
    from accelerate import Accelerator

    from latentae.training.step import StepOutput


class RunControl:
    """This process's requests, to be agreed on at the end of the current step.

    ``request_stop`` / ``request_checkpoint`` only set attributes: safe from a signal
    handler. ``install_signal_handlers(["SIGTERM", "SIGUSR1"])`` makes those signals a
    stop request (preemption: checkpoint at the end of the current step, exit 0). A
    second one while the stop is pending, at least ``FORCE_AFTER_S`` after the first,
    raises StopNow at once (no checkpoint); earlier repeats are taken as the same
    signal delivered twice (a launcher forwarding what the scheduler also sent).
    ``checkpoint_every_minutes`` > 0 asks for a checkpoint when that much wall-clock
    time has passed since the last one (each rank's own clock; the OR of all ranks in
    ``agree`` picks the step).
    """

    FORCE_AFTER_S = 5.0

    def __init__(self, *, checkpoint_every_minutes: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.stop_reason: str | None = None
        self.checkpoint_reason: str | None = None
        self.clock = clock
        self._every_s = checkpoint_every_minutes * 60.0
        self._last_checkpoint = clock()
        self._stop_signal_at: float | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def request_stop(self, reason: str) -> None:
        """Checkpoint at the end of the current step on every rank, then end the run (exit 0)."""
        self.stop_reason = reason

    def request_checkpoint(self, reason: str) -> None:
        """Checkpoint at the end of the current step on every rank, then go on."""
        self.checkpoint_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None

    def local_flags(self) -> list[float]:
        if self._every_s > 0 and self.checkpoint_reason is None and self.clock() - self._last_checkpoint >= self._every_s:
            self.checkpoint_reason = f"train.checkpoint_every_minutes={self._every_s / 60:g}"
        return [float(self.stop_reason is not None), float(self.checkpoint_reason is not None)]

    def checkpoint_done(self) -> None:
        """A checkpoint was written (any reason): the wall-clock interval starts again."""
        self.checkpoint_reason = None
        self._last_checkpoint = self.clock()

    # -- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self, names: Sequence[str]) -> list[str]:
        """Turn the named signals into stop requests; returns the names installed.

        Only the main thread may install handlers: elsewhere (Trainer built in a thread)
        nothing is installed and the signals keep their default action.
        """
        installed = []
        for name in names:
            signum = getattr(signal, name)
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread
                return installed
            installed.append(name)
        return installed

    def restore_signal_handlers(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process stops it when it stops
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._stop_signal_at is None:
            self._stop_signal_at = now
            self.request_stop(f"{name} received")
        elif now - self._stop_signal_at >= self.FORCE_AFTER_S:
            raise StopNow(signum, f"a second {name} while stopping: ended at once, without a checkpoint")


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
