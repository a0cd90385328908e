"""Sharing the CPU: how the command-line tools set up OpenMP and torch's thread count.

Two facts about a machine that is busy with other work (another job, a data loader, a
colleague's tests):

* OpenMP's default wait is a **spin**: a torch thread that finished its share of a parallel
  region burns its core until the others finish. When one of them was preempted by another
  process, the spinners take exactly the CPU it needs, and two spinning torch jobs on the
  same cores slow each other down many times over (measured on 2 cores: a tiny training
  step from ~0.25 s to ~7 s next to another torch process). ``OMP_WAIT_POLICY=PASSIVE``
  makes waiting threads sleep. libgomp reads it once, when torch loads it, so the entry
  points call ``prefer_passive_waiting()`` **before importing torch**
  (``latentae/__init__.py`` imports nothing heavy for that reason). A value the user set
  is kept (``OMP_WAIT_POLICY=ACTIVE`` for a dedicated machine).
* torch starts one thread per core, and the DataLoader workers that decode images need
  cores too. ``torch_threads`` is the rule the training entry points use (a user's
  ``OMP_NUM_THREADS`` or ``--threads`` wins).

Nothing here runs at import; library code never changes these settings on its own.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import MutableMapping

log = logging.getLogger("latentae")


def prefer_passive_waiting(environ: MutableMapping[str, str] = os.environ) -> bool:
    """``OMP_WAIT_POLICY=PASSIVE`` unless already set. Returns whether it can take effect
    in this process (torch, hence libgomp, not yet loaded); child processes get it anyway."""
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "torch" not in sys.modules


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 quota (``cpu.max``: "quota period"), None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a container's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def local_processes(environ: MutableMapping[str, str] = os.environ) -> int:
    """Processes of this launch on this machine: torchrun and accelerate set LOCAL_WORLD_SIZE."""
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def torch_threads(cpus: int, processes: int, data_workers: int) -> int:
    """The rule: each process gets an equal share of the CPUs, and each of its DataLoader
    workers keeps one core of that share for itself; the model's threads get the rest,
    at least one.

        threads = max(1, cpus // processes - data_workers)

    e.g. 2 cores, 1 process, 1 worker (the demo): 1 thread; 64 cores, 8 GPU processes,
    6 workers each: 2 threads (a GPU process needs few). A worker that sits idle leaves
    its core idle too; that is the price of never making the model's threads (which all
    wait for the slowest one at every parallel region) share a core with a decoder.
    """
    if cpus < 1 or processes < 1 or data_workers < 0:
        raise ValueError(f"torch_threads: cpus={cpus}, processes={processes}, data_workers={data_workers}")
    return max(1, cpus // processes - data_workers)


def configure_threads(data_workers: int, *, threads: int | None = None,
                      environ: MutableMapping[str, str] = os.environ) -> int:
    """Set torch's thread count for a training process; returns it.

    ``threads`` (a ``--threads`` option) wins, then ``OMP_NUM_THREADS`` as set by the user
    or the launcher (torchrun sets 1 per process; accelerate its own share), then the rule.
    """
    import torch

    if threads is None and environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # torch already read it at import
    if threads is None:
        threads = torch_threads(usable_cpus(), local_processes(environ), data_workers)
    torch.set_num_threads(threads)
    return threads


def describe(threads: int, data_workers: int) -> str:
    """One line for the start-up log."""
    return (f"{threads} torch thread(s), {data_workers} data worker(s), {usable_cpus()} usable CPU(s), "
            f"{local_processes()} process(es) on this machine, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


__all__ = [
    "cgroup_cpu_limit",
    "configure_threads",
    "describe",
    "local_processes",
    "prefer_passive_waiting",
    "torch_threads",
    "usable_cpus",
]
