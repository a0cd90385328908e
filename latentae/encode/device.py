"""Decisions that depend on the device, as plain functions (tested without a GPU).

* Decoding workers (:func:`default_num_workers`): on a GPU the model needs the CPU only to
  launch kernels, so the workers get this process's share of the cores (the cores it may
  run on, divided by the processes on this machine) minus 2 -- one for the loop that feeds
  the GPU, one for the shard writer thread -- at least 2 and at most 16 (past ~16 a
  process decodes faster than one GPU encodes at SD sizes, and each worker holds
  prefetched batches in memory). On the CPU the model's threads already use every core;
  2 workers running as SCHED_IDLE (:func:`worker_priority`) take only what the model
  leaves idle.
* Shard writing (:func:`use_writer_thread`): a thread on a GPU, so that the device does
  not wait for tar writes; inline on the CPU, where a thread would only take cores from
  the model.
* Host memory (:func:`pin_memory`): pinned on CUDA, so host-to-device copies of the
  batches and device-to-host copies of the latents run asynchronously.
* Out of memory (:func:`is_out_of_memory`): a batch that does not fit is retried in
  halves; any other error from the model stops the job.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def default_num_workers(device_type: str, cpus: int, local_procs: int) -> int:
    """Decoding workers per process when ``num_workers`` is not given (see the module docstring)."""
    if device_type == "cpu":
        return 2
    return max(2, min(16, cpus // max(1, local_procs) - 2))


def worker_priority(setting: str, device_type: str) -> str:
    """The effective decoding-worker priority: 'auto' resolved for this device."""
    if setting != "auto":
        return setting
    return "idle" if device_type == "cpu" else "normal"


def use_writer_thread(setting: str, device_type: str) -> bool:
    if setting != "auto":
        return setting == "thread"
    return device_type != "cpu"


def pin_memory(device_type: str) -> bool:
    return device_type == "cuda"


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "_ALLOC_FAILED")


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure (CUDA, CPU allocator, cuBLAS/cuDNN workspaces), which a
    smaller batch can avoid -- as opposed to a device fault."""
    types = (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None), MemoryError)
    if isinstance(e, tuple(t for t in types if t is not None)):
        return True
    return isinstance(e, RuntimeError) and any(w.lower() in str(e).lower() for w in _OOM_WORDS)


def set_priority(priority: str, _worker_id: int = 0) -> None:
    """Runs in each decoding worker (worker_init_fn); lowers only that process."""
    try:
        if priority == "idle" and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # needs no privilege
        elif priority in ("idle", "low") and hasattr(os, "nice"):
            os.nice(19 if priority == "idle" else 10)  # no SCHED_IDLE here (macOS): the nearest thing
    except OSError as e:  # a sandbox may refuse; speed only, not correctness
        log.warning("could not lower the decoding worker's priority (%s): %s", priority, e)
