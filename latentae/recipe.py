"""The root config: one section per component, each section owned by its module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from latentae.config import apply_overrides, from_dict, read_yaml
from latentae.model import ModelConfig


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply ``section.key=value`` overrides, strictly."""
    raw = apply_overrides(read_yaml(path), overrides)
    return from_dict(Config, raw)
