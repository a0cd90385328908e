"""The root config: one section per component, each section owned by its module.

    model:          latentae.model.ModelConfig                 the VAE architecture (+ latent scaling)
    loss:           latentae.losses.LossConfig                 L1/L2 + LPIPS + KL + GAN weights and schedule
    discriminator:  latentae.discriminator.DiscriminatorConfig PatchGAN shape
    data:           latentae.data.DataConfig                   where images come from, crop size
    train:          latentae.training.config.TrainConfig       optimisation, precision, speed, EMA, checkpoints, logging
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from latentae.config import apply_overrides, config_path, from_dict, read_yaml, to_dict
from latentae.data import DataConfig
from latentae.discriminator import DiscriminatorConfig
from latentae.losses import LossConfig
from latentae.model import ModelConfig
from latentae.training.config import TrainConfig


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (a path, or a packaged config's name, see ``config_path``) and
    apply ``section.key=value`` overrides, strictly."""
    raw = apply_overrides(read_yaml(config_path(path)), overrides)
    return from_dict(Config, raw)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every field, defaults included); ``load_config`` reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["Config", "dump_config", "load_config"]
