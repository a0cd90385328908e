"""The root config: one section per component, each section owned by its module.

    model:          latentae.model.ModelConfig                 the VAE architecture (+ latent scaling)
    loss:           latentae.losses.LossConfig                 L1/L2 + LPIPS + KL + GAN weights and schedule
    discriminator:  latentae.discriminator.DiscriminatorConfig PatchGAN shape
    data:           latentae.data.DataConfig                   where images come from, crop size
    train:          latentae.training.config.TrainConfig       optimisation, precision, speed, EMA, checkpoints, logging
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from latentae.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
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


# The configs that ship inside the package (``configs/`` in a checkout links here), so an
# installed latentae finds them by name: ``--config tiny-f8c4``.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with the package (``tiny-f8c4``, ``sd-f8c4``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A YAML file: an existing path, else a packaged config by name (``sd-f8c4`` or
    ``sd-f8c4.yaml``). A local file always wins over a packaged name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = str(name_or_path)
    if "/" not in name and os.sep not in name:
        packaged = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config file not found: {p} (packaged configs, usable by name: {', '.join(packaged_configs())})")


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (a path, or a packaged config's name, see ``config_path``) and
    apply ``section.key=value`` overrides, strictly."""
    raw = apply_overrides(read_yaml(config_path(path)), overrides)
    return from_dict(Config, raw)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every field, defaults included); ``load_config`` reads it back."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["CONFIG_DIR", "Config", "config_path", "dump_config", "load_config", "packaged_configs"]
