"""Scenarios for latentae.training.ranks.Ranks in real processes (gloo), for tests/test_ranks.py.

    python tests/ranks_harness.py SCENARIO      (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

Prints one JSON line per finding ("result {...}"), so the test reads what each rank saw.
  together   barrier with stop flags, share, problems; then rank 0 fails while rank 1 waits in
             a barrier; then rank 1 fails and exits while rank 0 waits in an all-reduce
  dead       3 ranks: rank 2 is SIGKILLed (cannot report), rank 0 waits in a barrier and
             finds it dead by its heartbeat; rank 1 is busy (a sleep, as if stuck in an NCCL
             collective) and is ended by its watcher with the message
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from latentae.training.errors import PeerFailedError  # noqa: E402
from latentae.training.ranks import Ranks  # noqa: E402

FAST = dict(poll_s=0.1, grace_s=2.0, linger_s=5.0, dead_after_s=1.5)


def say(**kw) -> None:
    print("result " + json.dumps(kw), flush=True)


def together(rank: int, world: int) -> None:
    r = Ranks.start(rank, world, namespace="together", **FAST)
    say(rank=rank, what="stop", value=r.barrier("b", stop=rank == 1))
    say(rank=rank, what="no-stop", value=r.barrier("b", stop=False))
    say(rank=rank, what="share", value=r.share("s", {"path": "/ckpt", "rank": rank}))
    say(rank=rank, what="problems", value=r.problems("p", "stale view" if rank == 1 else None))
    r.close()

    # rank 0 raises (e.g. in validation) while rank 1 waits in a barrier
    r = Ranks.start(rank, world, namespace="fail-in-barrier", **FAST)
    t0 = time.monotonic()
    if rank == 0:
        err = r.fail(ValueError("export failed: disk full"))
        say(rank=rank, what="own", value=str(err), seconds=time.monotonic() - t0)
    else:
        try:
            r.barrier("after validation")
        except PeerFailedError as e:
            say(rank=rank, what="peer", value=str(e), failed=e.rank, seconds=time.monotonic() - t0)
    r.stop_watching()

    # rank 1 raises and its process ends, while rank 0 waits in a collective
    r = Ranks.start(rank, world, namespace="fail-in-collective", **FAST)
    t0 = time.monotonic()
    if rank == 1:
        raise r.fail(RuntimeError("injected failure in the step"))
    try:
        dist.all_reduce(torch.ones(3))
    except Exception as e:
        err = r.fail(e)
        say(rank=rank, what="collective", value=str(err), kind=type(err).__name__, seconds=time.monotonic() - t0)
        sys.exit(1)


def dead(rank: int, world: int) -> None:
    r = Ranks.start(rank, world, namespace="dead", **FAST)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    if rank == 1:
        say(rank=rank, what="busy")
        time.sleep(60)  # never notices by itself: its watcher must end the process
        say(rank=rank, what="woke up")  # must not happen
        return
    try:
        r.barrier("waiting for rank 2")
    except PeerFailedError as e:
        say(rank=rank, what="dead", value=str(e), failed=e.rank, seconds=time.monotonic() - t0)
        r.stop_watching()
        time.sleep(1.0)  # stay alive (hosting the store) until rank 1's watcher has read the report
        sys.exit(1)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    {"together": together, "dead": dead}[sys.argv[1]](dist.get_rank(), dist.get_world_size())
