"""The trainer's use of the data layer: every rank's data position goes back in on resume."""

from __future__ import annotations

import logging

import torch
from test_data import make_shards
from test_train import fresh_accelerate_state  # noqa: F401 - autouse: a fresh Accelerate state per run
from test_train_common import tiny_config

from latentae.config import replace
from latentae.training.loop import train


def test_resume_with_another_worker_count_continues_elastically(tmp_path, caplog):
    shards = make_shards(tmp_path / "s", 6, 8)
    cfg = tiny_config(tmp_path, [f"data.path={shards}", "data.num_workers=0", "train.max_steps=4", "train.val_every=0"])
    train(cfg, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-000000004" / "rank-0.pt", weights_only=True)["loader"]
    assert saved["kind"] == "shards" and saved["workers"][0]["buffer"]  # positions (here: the buffer), not a count
    more = replace(cfg, data=replace(cfg.data, num_workers=1), train=replace(cfg.train, max_steps=6))
    with caplog.at_level(logging.WARNING):
        result = train(more, tmp_path / "run", resume="latest")
    assert result.step == 6 and "elastic data resume" in caplog.text
