"""Shared helpers for the training tests (tiny config, synthetic images, subprocess runs),
plus unit tests of the training config, the LR schedule and the EMA."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from latentae.config import ConfigError
from latentae.ema import EMA
from latentae.optim import lr_factor
from latentae.recipe import Config, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train" / "train.py"
CRASH_LAUNCHER = REPO / "tests" / "crash_launcher.py"
CONFIGS = REPO / "configs"


# --------------------------------------------------------------------------- helpers


def make_images(folder: Path, n: int = 12, size: tuple[int, int] = (48, 40), seed: int = 0) -> Path:
    """``n`` smooth random RGB PNGs (low-frequency noise, so a VAE can learn something)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.random((4, 5, 3)) * 255
        img = Image.fromarray(coarse.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
        img.save(folder / f"img{i:02d}.png")
    return folder


def tiny_config_dict(data_path: Path | str) -> dict:
    """A VAE of a few thousand parameters, 32 px crops, GAN from step 2: a step takes ~0.1 s."""
    return {
        "model": {
            "latent_channels": 4,
            "block_out_channels": [8, 16, 16],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 32,
        },
        "loss": {"lpips_net": "alex", "lpips_pretrained": False, "disc_start": 2, "disc_train_start": 1},
        "discriminator": {"n_layers": 1, "base_channels": 8, "norm": "batch"},
        "data": {"path": str(data_path), "resolution": 32, "num_val": 2, "num_workers": 0},
        "train": {
            "batch_size": 2,
            "max_steps": 6,
            "lr": 1.0e-3,
            "checkpoint_every": 2,
            "keep_last": 0,
            "log_every": 1,
            "val_every": 3,
            "num_val_images": 2,
            "ema_decay": 0.9,
            "deterministic": True,
        },
    }


def write_config(tmp_path: Path, data_path: Path | str, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config_dict(data_path), sort_keys=False))
    return path


def tiny_config(tmp_path: Path, overrides: list[str] = (), n_images: int = 12) -> Config:
    data = make_images(tmp_path / "data", n_images)
    return load_config(write_config(tmp_path, data), list(overrides))


def subprocess_env(threads: int = 1, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The repo root on the path: the scripts import latentae even where the package
    # is not installed (or installed as a stale editable copy).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # Same thread count in every run: bit-identical comparisons depend on it.
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    env.update(extra)
    return env


def run_train(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    kill_after_step: int | None = None,
    kill_in_checkpoint: int | None = None,
    inject: list[str] = (),
):
    """train/train.py in a subprocess; with a kill_* argument or ``inject`` (crash_launcher
    options, e.g. ["--signal-in-step=3"]), through tests/crash_launcher.py, which injects
    that fault at that moment (see there)."""
    cmd = [sys.executable, str(TRAIN_PY), *args]
    kills = [f"--kill-after-step={kill_after_step}"] if kill_after_step is not None else []
    kills += [f"--kill-in-checkpoint={kill_in_checkpoint}"] if kill_in_checkpoint is not None else []
    kills += list(inject)
    if kills:
        cmd = [sys.executable, str(CRASH_LAUNCHER), *kills, "--", *args]
    return subprocess.run(
        cmd,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@dataclass
class RankRun:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    ended: float  # time.time() when the process was seen to have ended


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(n: int, argv: list[str], *, tmp: Path, timeout: float = 120, torchrun: bool = False) -> list[RankRun]:
    """``python argv...`` as ``n`` ranks of one process group (gloo on CPU).

    By default launched as torchrun does it for a single node (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT; rank 0 hosts the store), one RankRun per rank. With
    ``torchrun=True`` through ``python -m torch.distributed.run --standalone`` (the launcher
    hosts the store and forwards its signals): one RankRun for the launcher, its workers'
    output in it. Output goes to files (no pipe can fill up); each process's end is timed.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    if torchrun:
        cmds = [([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *argv],
                 subprocess_env())]  # fmt: skip
    else:
        port = str(free_port())
        cmds = [([sys.executable, *argv], subprocess_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n),
                  LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(n)]  # fmt: skip
    procs, files = [], []
    for r, (cmd, env) in enumerate(cmds):
        out, err = open(tmp / f"rank{r}.out", "w+"), open(tmp / f"rank{r}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=REPO))
    ended: list[float | None] = [None] * len(procs)
    deadline = time.time() + timeout
    try:
        while None in ended and time.time() < deadline:
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.time()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    runs = []
    for r, (p, (out, err)) in enumerate(zip(procs, files)):
        out.seek(0), err.seek(0)
        runs.append(RankRun(r, p.returncode, out.read(), err.read(), ended[r] or float("inf")))
        out.close(), err.close()
    assert None not in ended, f"ranks still running after {timeout} s: " + " | ".join(x.stderr[-1500:] for x in runs)
    return runs


def read_weights(ckpt: Path, name: str = "vae.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / name))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: '{k}' differs (max {(a[k].float() - b[k].float()).abs().max()})"


# --------------------------------------------------------------------------- config


def test_shipped_configs_carry_the_ldm_recipe():
    for name in ("sd-f8c4", "sd-f8c16"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        # LDM's base_learning_rate, scaled by processes x batch x accumulation as LDM's main.py does.
        assert cfg.train.lr == 4.5e-6 and cfg.train.scale_lr and cfg.train.batch_size == 12
        assert cfg.train.betas == (0.5, 0.9) and cfg.train.optimizer == "adam"
        assert cfg.loss.kl_weight == 1e-6 and cfg.loss.kl_reduction == "sum_mean" == cfg.loss.nll_reduction
        assert cfg.loss.disc_start == 50001 and cfg.loss.disc_weight == 0.5 and cfg.loss.perceptual_weight == 1.0
        assert cfg.data.resolution == 256 and cfg.loss.lpips_pretrained
    for name in ("tiny-f8c4", "tiny-f8c16"):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.loss.lpips_pretrained, "the offline switch belongs on the command line, not in the file"
        assert cfg.data.resolution <= 128 and cfg.train.batch_size <= 8 and cfg.train.lr >= 1e-4
        assert not cfg.train.scale_lr  # the rate as written
        assert cfg.data.resolution >= cfg.discriminator.min_size


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "tiny-f8c4.yaml", ["data.path=/x", "train.max_steps=7", "train.betas=[0.9, 0.99]"])
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.grad_accum_steps=0", "train.grad_accum_steps must be >= 1"),
        ("train.betas=[0.5]", "train.betas must be two numbers"),
        ("train.mixed_precision=fp8", "did you mean"),
        ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
        ("train.lr=-1", "train.lr must be a positive number"),
        ("train.max_stepz=3", "did you mean 'max_steps'"),
    ],
)
def test_bad_train_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny-f8c4.yaml", [override])
    assert fragment in str(e.value)


# --------------------------------------------------------------------------- schedule


def test_lr_schedule():
    f = lambda s, kind="cosine", warm=10, floor=0.1: lr_factor(  # noqa: E731
        s, warmup_steps=warm, total_steps=110, schedule=kind, min_ratio=floor
    )
    assert [f(s) for s in range(3)] == [0.1, 0.2, 0.3]  # linear warm-up, never 0
    assert f(10) == 1.0 and f(9) == 1.0
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert f(50, "constant") == 1.0 and f(5, "constant") == pytest.approx(0.6)
    assert f(0, "cosine", warm=0, floor=0.0) == 1.0


# --------------------------------------------------------------------------- EMA


def test_ema_math_interval_and_frozen_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)  # "frozen" part: must stay bit-identical in the EMA
    ema = EMA(model, decay=0.75, every=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model, step=0)  # (0 + 1) % 2 != 0: no update
    assert torch.equal(ema.model[1].weight, start["1.weight"])
    ema.update(model, step=1)
    expected = start["1.weight"] + 0.25 * (model[1].weight - start["1.weight"])
    assert torch.allclose(ema.model[1].weight, expected, atol=1e-7)
    assert torch.equal(ema.model[0].weight, start["0.weight"])
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)
    assert math.isclose(0.75, ema.decay)
