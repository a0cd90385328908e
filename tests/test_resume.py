"""Killed with SIGKILL (mid-step and mid-checkpoint-write), stopped by SIGTERM (preemption)
and resumed: bit-identical to an uninterrupted run.

The faults are injected from the test side (tests/crash_launcher.py monkeypatches the real
trainer, then runs the real entry point), so they land at exact, reproducible moments:
    kill_in_checkpoint=N      halfway through writing checkpoint step N
    kill_after_step=N         right after optimizer step N, before its checkpoint
    --signal-in-step=N        SIGTERM to itself during optimizer step N
"""

from __future__ import annotations

import json
import signal

import torch

from test_train_common import assert_same_tensors, make_images, read_weights, run_train, write_config

FILES = ("vae.safetensors", "vae_ema.safetensors", "discriminator.safetensors", "loss.safetensors")


def test_sigkill_anywhere_and_sigterm_then_resume_latest_is_bit_identical(tmp_path):
    data = make_images(tmp_path / "data", 12)
    config = write_config(tmp_path, data)
    # 7 steps, checkpoints every 2 (+ the final one), the GAN from step 2, EMA on,
    # learned logvar, 2 accumulated micro-batches: every piece of state matters.
    common = ["--config", str(config), "loss.learn_logvar=true", "train.grad_accum_steps=2", "train.max_steps=7"]

    ref = run_train([*common, "--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = str(tmp_path / "run")
    # 1) killed while writing checkpoint 4: step-2 is complete, .tmp-step-4 half-written.
    r = run_train([*common, "--output-dir", out], kill_in_checkpoint=4)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ckdir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == [".tmp-step-000000004", "step-000000002"]
    # 2) resumed from step 2, killed right after step 5 (checkpoint 4 complete, 5 not written).
    r = run_train([*common, "--output-dir", out, "--resume", "latest"], kill_after_step=5)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert "removed a half-written checkpoint" in r.stderr and "resumed from" in r.stderr and "(step 2)" in r.stderr
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-000000002", "step-000000004"]
    # 3) resumed from step 4, preempted: SIGTERM during step 6 -> step 6 finishes, is checkpointed, exit 0.
    r = run_train([*common, "--output-dir", out, "--resume", "latest"], inject=["--signal-in-step=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 4)" in r.stderr and "stopped at step 6 (SIGTERM received)" in r.stdout
    assert sorted(p.name for p in ckdir.iterdir()) == ["step-000000002", "step-000000004", "step-000000006"]
    assert not (tmp_path / "run" / "export").exists()
    # 4) the requeued job: resumed from step 6 to the end.
    r = run_train([*common, "--output-dir", out, "--resume", "latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 6)" in r.stderr

    for step in ("000000004", "000000006", "000000007"):
        a, b = tmp_path / "ref" / "checkpoints" / f"step-{step}", ckdir / f"step-{step}"
        for name in FILES:
            assert_same_tensors(read_weights(a, name), read_weights(b, name), f"step {step} {name}")
        opt_a = torch.load(a / "optimizer.pt", weights_only=True)
        opt_b = torch.load(b / "optimizer.pt", weights_only=True)
        for which in ("vae", "disc"):
            for i, state in opt_a[which]["state"].items():
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(state[key], opt_b[which]["state"][i][key]), (step, which, i, key)
        rank_a = torch.load(a / "rank-0.pt", weights_only=True)
        rank_b = torch.load(b / "rank-0.pt", weights_only=True)
        assert rank_a["loader"] == rank_b["loader"] and torch.equal(rank_a["rng"]["torch"], rank_b["rng"]["torch"])
    # Sanity: the run did train (the comparison is not between two untouched models).
    first = read_weights(tmp_path / "ref" / "checkpoints" / "step-000000002")
    last = read_weights(ckdir / "step-000000007")
    assert not torch.equal(first["decoder.conv_out.weight"], last["decoder.conv_out.weight"])
    assert json.loads((ckdir / "step-000000007" / "trainer.json").read_text())["step"] == 7
