"""train.scale_lr (LDM's learning-rate convention) and ``train.py --dry-run``."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from latentae.recipe import load_config
from latentae.training.config import effective_lrs

from test_train import _cli
from test_train_common import CONFIGS, TRAIN_PY, subprocess_env


def test_scale_lr_is_ldms_arithmetic():
    sd = load_config(CONFIGS / "sd-f8c4.yaml")
    assert sd.train.scale_lr and sd.train.lr == 4.5e-6 and sd.train.batch_size == 12
    one, eight = effective_lrs(sd.train, 1), effective_lrs(sd.train, 8)
    # LDM main.py: lr = accumulate_grad_batches x ngpu x batch_size x base_learning_rate
    assert one.vae == pytest.approx(4.5e-6 * 1 * 12 * 1) == pytest.approx(5.4e-5) and one.factor == 12
    assert eight.vae == pytest.approx(4.5e-6 * 8 * 12 * 1) == pytest.approx(4.32e-4) and eight.factor == 96
    assert eight.disc == eight.vae  # disc_lr unset: the discriminator gets the same rate, as in LDM
    assert "4.32e-04 = 4.50e-06 (train.lr) x 8 processes x 12 batch x 1 accumulation" in eight.explanation

    accum = load_config(CONFIGS / "sd-f8c16.yaml", ["train.grad_accum_steps=3", "train.disc_lr=1e-6"])
    lrs = effective_lrs(accum.train, 2)
    assert lrs.vae == pytest.approx(4.5e-6 * 2 * 12 * 3) and lrs.disc == pytest.approx(1e-6 * 2 * 12 * 3)
    assert "train.disc_lr" in lrs.explanation

    tiny = load_config(CONFIGS / "tiny-f8c4.yaml")
    assert not tiny.train.scale_lr
    plain = effective_lrs(tiny.train, 8)  # the rate as written, whatever the process count
    assert (plain.vae, plain.disc, plain.factor) == (tiny.train.lr, tiny.train.lr, 1)
    with pytest.raises(ValueError, match="processes must be >= 1"):
        effective_lrs(tiny.train, 0)


def test_dry_run_reads_no_data_and_builds_no_model(tmp_path, capsys, monkeypatch):
    import latentae.data
    import latentae.model
    import latentae.training.setup

    def forbidden(*a, **k):
        raise AssertionError("--dry-run must not read data or build models")

    for module, name in ((latentae.training.setup, "set_up"), (latentae.training.setup, "build_train_loader"),
                         (latentae.data, "build_train_loader"), (latentae.model, "build_vae")):  # fmt: skip
        monkeypatch.setattr(module, name, forbidden)
    monkeypatch.setenv("WORLD_SIZE", "8")
    missing = tmp_path / "no-such-folder"
    main = _cli()
    t0 = time.perf_counter()
    assert main(["--config", str(CONFIGS / "sd-f8c4.yaml"), "--dry-run", f"data.path={missing}"]) == 0
    assert time.perf_counter() - t0 < 10.0  # config work only (~0.1 s); the bound leaves room for a busy machine
    text = capsys.readouterr().out
    assert f"path: {missing}" in text and "scale_lr: true" in text  # the resolved config
    assert "with 8 process(es)" in text and "global batch: 96 images" in text  # WORLD_SIZE by default
    assert "VAE 4.32e-04 = 4.50e-06 (train.lr) x 8 processes x 12 batch x 1 accumulation" in text
    assert not missing.exists()

    args = ["--config", str(CONFIGS / "sd-f8c4.yaml"), "--dry-run", "--num-processes", "1", f"data.path={missing}"]
    assert main(args) == 0
    assert "VAE 5.40e-05 = 4.50e-06 (train.lr) x 1 processes x 12 batch" in capsys.readouterr().out

    # Still a full check of the config: bad keys and cross-section problems fail the same way.
    assert main(["--config", str(CONFIGS / "sd-f8c4.yaml"), "--dry-run", "train.scale_lrr=true"]) == 2
    assert "did you mean 'scale_lr'" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "sd-f8c4.yaml"), "--dry-run"]) == 2  # data.path unset
    assert "data.path is empty" in capsys.readouterr().err
    bad = ["--config", str(CONFIGS / "sd-f8c4.yaml"), "--dry-run", "data.path=x", "data.resolution=16"]
    assert main(bad) == 2 and "too small for the discriminator" in capsys.readouterr().err


def test_dry_run_in_a_real_process(tmp_path):
    env = subprocess_env(WORLD_SIZE="2")
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, str(TRAIN_PY), "--config", str(CONFIGS / "sd-f8c16.yaml"), "--output-dir", str(out),
         "--dry-run", f"data.path={tmp_path / 'nothing'}", "train.grad_accum_steps=2"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "VAE 2.16e-04 = 4.50e-06 (train.lr) x 2 processes x 12 batch x 2 accumulation" in r.stdout
    assert not out.exists()  # nothing written
    assert "Traceback" not in r.stderr
    # A real run needs --output-dir; --dry-run does not.
    r = subprocess.run([sys.executable, str(TRAIN_PY), "--config", str(CONFIGS / "sd-f8c16.yaml")],
                       capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--output-dir is required" in r.stderr
