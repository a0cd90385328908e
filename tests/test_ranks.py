"""latentae.training.ranks in real processes (gloo): barriers that carry stop requests,
rank 0's answers, every rank's problems, and failures reaching every rank -- from a
barrier, from a broken collective, from a killed rank (heartbeat), and a rank stuck
where it cannot notice (ended by its watcher). Scenarios: tests/ranks_harness.py."""

from __future__ import annotations

import json

from test_train_common import REPO, launch_ranks

HARNESS = str(REPO / "tests" / "ranks_harness.py")


def _results(run) -> dict[str, dict]:
    found = [json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("result ")]
    return {r["what"]: r for r in found}


def test_barriers_shared_values_problems_and_failures_between_two_ranks(tmp_path):
    r0, r1 = launch_ranks(2, [HARNESS, "together"], tmp=tmp_path, timeout=90)
    a, b = _results(r0), _results(r1)
    # a stop passed by rank 1 alone comes out of the barrier on both; the next barrier has none
    assert a["stop"]["value"] is True and b["stop"]["value"] is True
    assert a["no-stop"]["value"] is False and b["no-stop"]["value"] is False
    assert a["share"]["value"] == b["share"]["value"] == {"path": "/ckpt", "rank": 0}
    assert a["problems"]["value"] == b["problems"]["value"] == [[1, "stale view"]]
    # rank 0 failed while rank 1 waited in a barrier: rank 1 ends with rank 0's message, promptly
    assert a["own"]["value"] == "export failed: disk full"
    assert b["peer"]["failed"] == 0 and "rank 0 failed: ValueError: export failed: disk full" in b["peer"]["value"]
    assert b["peer"]["seconds"] < 10
    # rank 1 failed and ended while rank 0 waited in an all-reduce: rank 0 ends with rank 1's message
    assert r1.returncode == 1 and "injected failure in the step" in r1.stderr
    assert a["collective"]["kind"] == "PeerFailedError" and r0.returncode == 1
    assert a["collective"]["value"].startswith("rank 1 failed: RuntimeError: injected failure in the step")
    assert a["collective"]["seconds"] < 10


def test_a_killed_rank_is_found_by_its_heartbeat_and_a_stuck_rank_is_ended(tmp_path):
    r0, r1, r2 = launch_ranks(3, [HARNESS, "dead"], tmp=tmp_path, timeout=90)
    assert r2.returncode == -9  # SIGKILL: it could not report anything
    dead = _results(r0)["dead"]
    assert dead["failed"] == 2 and "stopped responding: no heartbeat" in dead["value"]
    assert dead["seconds"] < 10  # dead_after_s=1.5 in the harness
    # rank 1 slept through it (as if stuck in an NCCL collective): its watcher ended it
    assert "woke up" not in r1.stdout and r1.returncode == 1
    assert "error: rank 2 failed: stopped responding" in r1.stderr and "ending it" in r1.stderr
