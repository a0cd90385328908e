"""tools/demo.py: the README's main job, shortened to a few steps."""

from __future__ import annotations

import importlib.util

import torch

from latentae.io import load_vae
from test_train import fresh_accelerate_state  # noqa: F401  (autouse fixture: fresh Accelerate state, 1 thread)
from test_train_common import REPO


def test_demo_trains_exports_and_says_where(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("latentae_demo", REPO / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "demo"
    args = ["--output-dir", str(out), "--steps", "2", "train.batch_size=2", "data.num_workers=0", "train.val_every=0"]
    assert demo.main(args) == 0
    text = capsys.readouterr().out
    assert "RANDOM AlexNet backbone" in text and "demo finished" in text and str(out / "run" / "export") in text
    assert len(list((out / "data").glob("*.png"))) >= 15  # scikit-image's bundled photos, no download
    assert (out / "run" / "samples" / "val_ema-step-000000002.png").is_file()
    vae = load_vae(out / "run" / "export", fast=False)
    assert vae.config.latent_channels == 16 and torch.isfinite(vae.decoder.conv_out.weight).all()
