"""Training on a cluster, with real processes (gloo on CPU): a preemption signal to one rank,
rank 0 resolving the checkpoint and the data for everyone (a node with a stale view fails
clearly), elastic resume 2 -> 1 -> 2 processes, and one rank failing alone (in the step; in
rank 0's export) ending every rank promptly with its message.

Faults are injected by tests/crash_launcher.py (--only-rank R: in that rank only)."""

from __future__ import annotations

import json
import re

import torch

from test_train_common import CRASH_LAUNCHER, launch_ranks, make_images, run_train, write_config

# Tiny: 12 images (2 held out), batch 2, GAN from step 2, a BatchNorm discriminator (its
# buffers are per rank on CPU), EMA on, validation only at the end.
COMMON = ["train.checkpoint_every=2", "train.val_every=0", "train.num_val_images=1"]


def _train(*inject: str) -> list[str]:
    return [str(CRASH_LAUNCHER), *inject, "--"]


def _manifest(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:09d}" / "trainer.json").read_text())


def _checkpoints(run) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())


def _injected_at(text: str) -> float:
    return float(re.search(r"injected: .* at ([0-9.]+)", text).group(1))


def test_preempt_one_rank_stale_node_and_elastic_resume_2_to_1_to_2(tmp_path):
    data = make_images(tmp_path / "data", 12)
    run = tmp_path / "run"
    args = ["--config", str(write_config(tmp_path, data)), "--output-dir", str(run), *COMMON]

    # 1) torchrun, 2 ranks; SIGUSR1 reaches rank 1 only, during step 3: both finish step 3,
    #    write one checkpoint of it and exit 0.
    (launcher,) = launch_ranks(2, [*_train("--only-rank=1", "--signal-in-step=3:SIGUSR1"), *args, "train.max_steps=6"],
                               tmp=tmp_path / "l1", torchrun=True)  # fmt: skip
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    assert "stopped at step 3 (SIGUSR1 received)" in launcher.stdout
    assert "stopped at step 3 (a stop request on another rank)" in launcher.stdout
    assert _checkpoints(run) == [2, 3] and not (run / "export").exists()
    meta = _manifest(run, 3)
    assert meta["world_size"] == 2 and len(set(meta["rank_fingerprints"])) == 1
    # The file list (all 12 images; 2 are held out for validation) was made once, by rank 0, in the run folder.
    assert (run / "data" / "files.bin").is_file()
    assert len(re.findall(r"file list: 12 images of .* \(listed", launcher.stderr)) == 1

    # 2) a node with a stale copy of the run folder (rank 1 reads step 2's manifest for step 3's,
    #    and a file list without its last file): every rank fails at start-up, naming what differs.
    stale = launch_ranks(2, [*_train("--only-rank=1", "--stale-checkpoint-view=2", "--stale-file-list"), *args,
                             "--resume", "latest"], tmp=tmp_path / "l2")  # fmt: skip
    for r in stale:
        assert r.returncode == 2, r.stderr[-3000:]
        msg = r.stderr.splitlines()[-1]
        assert msg.startswith("error: the ranks do not see the same run folder and data"), msg
        assert "rank 1 sees another" in msg and "step-000000003/trainer.json than rank 0" in msg
        assert "rank 1 sees other data than rank 0: the file list" in msg
    assert _checkpoints(run) == [2, 3]

    # 3) requeued on 1 process: elastic resume from 2 ranks' checkpoint, trains to the end.
    one = run_train([*args, "--resume", "latest", "train.max_steps=4"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert "elastic resume:" in one.stderr and "written by 2 processes, this run has 1" in one.stderr
    assert "elastic data resume" in one.stderr  # the data layer continues the epoch from both ranks' positions
    assert "(reused)" in one.stderr and "(listed" not in one.stderr  # the stored file list, not a new walk
    assert _manifest(run, 4)["world_size"] == 1 and (run / "export").is_dir()

    # 4) requeued on 2 processes again (elastic 1 -> 2), trains to the end; then rank 0's
    #    export raises: rank 1, waiting for it, ends promptly with rank 0's message.
    two = launch_ranks(2, [*_train("--only-rank=0", "--raise-in=export"), *args, "--resume", "latest",
                           "train.max_steps=6"], tmp=tmp_path / "l4")  # fmt: skip
    r0, r1 = two
    assert "written by 1 processes, this run has 2" in r0.stderr
    meta = _manifest(run, 6)
    assert meta["world_size"] == 2 and len(set(meta["rank_fingerprints"])) == 1  # trained to the end, in sync
    a = torch.load(run / "checkpoints" / "step-000000006" / "rank-1.pt", weights_only=True)
    assert a["loader"]["world_size"] == 2 and a["loader"]["epoch"] >= 1
    assert r0.returncode == 1 and "RuntimeError: injected failure in export" in r0.stderr
    assert r1.returncode == 1, r1.stderr[-3000:]
    assert r1.stderr.splitlines()[-1].startswith("error: rank 0 failed: RuntimeError: injected failure in export")
    failed_at = _injected_at(r0.stderr)
    assert max(r0.ended, r1.ended) - failed_at < 30, (r0.ended - failed_at, r1.ended - failed_at)


def test_one_rank_failing_in_the_step_ends_both_with_its_message(tmp_path):
    data = make_images(tmp_path / "data", 12)
    args = ["--config", str(write_config(tmp_path, data)), "--output-dir", str(tmp_path / "run"), *COMMON]
    r0, r1 = launch_ranks(2, [*_train("--only-rank=1", "--raise-in-step=2"), *args, "train.max_steps=4"],
                          tmp=tmp_path / "l")  # fmt: skip
    assert r1.returncode == 1 and "RuntimeError: injected failure in step 2 on rank 1" in r1.stderr  # its traceback
    assert r0.returncode == 1, r0.stderr[-3000:]
    last = r0.stderr.splitlines()[-1]
    assert last.startswith("error: rank 1 failed: RuntimeError: injected failure in step 2 on rank 1"), last
    assert "Traceback" not in r0.stderr  # not a collective's error: the message of the rank that failed
    failed_at = _injected_at(r1.stderr)
    assert max(r0.ended, r1.ended) - failed_at < 30, (r0.ended - failed_at, r1.ended - failed_at)
    assert not (tmp_path / "run" / "checkpoints").exists() or _checkpoints(tmp_path / "run") == []
