"""Two CPU processes (gloo DDP) keep identical replicas and match one process with the same global batch.

Launched the way torchrun / ``accelerate launch`` do it: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT in the environment; on a machine without a GPU the
trainer asks Accelerate for CPU, which then picks MULTI_CPU with gloo.

Comparison: the data loader deals each epoch's permutation round-robin, so ranks 0
and 1 with batch 1 see exactly the two images one process with batch 2 sees, step
by step. The posterior mean is used (train.sample_posterior=false: the sampling noise
is per rank by design), the discriminator uses ActNorm (SyncBatchNorm needs a GPU)
and the adversarial term for the VAE starts at step 2: LDM's adaptive weight is a
per-rank gradient ratio, so from then on N processes are *not* the same computation
as one, and only "replicas identical" is checked.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import torch

from test_train_common import TRAIN_PY, make_images, read_weights, run_train, subprocess_env, write_config

OVERRIDES = [
    "discriminator.norm=act",
    "loss.disc_train_start=0",
    "loss.disc_start=2",
    "loss.learn_logvar=true",
    "train.sample_posterior=false",
    "train.max_steps=4",
    "train.grad_accum_steps=2",
    "train.checkpoint_every=2",
    "train.ema_decay=0.0",
    "train.val_every=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = subprocess_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )  # fmt: skip
        procs.append(
            subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
        )
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def _fraction_differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> float:
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    return (diff > atol).float().mean().item()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    data = make_images(tmp_path / "data", 12)
    config = str(write_config(tmp_path, data))
    two = _launch_two(["--config", config, "--output-dir", str(tmp_path / "ddp"), *OVERRIDES, "train.batch_size=1"])
    for r in two:
        assert r.returncode == 0, r.stderr[-3000:]
    one = run_train(["--config", config, "--output-dir", str(tmp_path / "one"), *OVERRIDES, "train.batch_size=2"])
    assert one.returncode == 0, one.stderr[-3000:]

    for step in ("000000002", "000000004"):
        meta = json.loads((tmp_path / "ddp" / "checkpoints" / f"step-{step}" / "trainer.json").read_text())
        assert meta["world_size"] == 2
        prints = meta["rank_fingerprints"]  # sha256 of every parameter, per rank
        assert len(prints) == 2 and prints[0] == prints[1], f"replicas diverged at step {step}"
        assert (tmp_path / "ddp" / "checkpoints" / f"step-{step}" / "rank-1.pt").is_file()

    a = tmp_path / "ddp" / "checkpoints" / "step-000000002"
    b = tmp_path / "one" / "checkpoints" / "step-000000002"
    # Same computation up to float summation order. Adam turns a near-zero gradient's
    # rounding into a full +-lr step, so compare "how many weights differ", which is
    # ~0.05% here but ~98% if the ranks did not average (or saw other data).
    for name in ("vae.safetensors", "discriminator.safetensors"):
        wa, wb = read_weights(a, name), read_weights(b, name)
        assert _fraction_differing(wa, wb, atol=1e-5) < 0.01, name
    la, lb = read_weights(a, "loss.safetensors"), read_weights(b, "loss.safetensors")
    assert torch.allclose(la["logvar"], lb["logvar"], atol=1e-6) and la["logvar"] != 0  # learned, all-reduced
