"""latentae: train, export, encode with and compare Stable-Diffusion-style KL autoencoders.

The names below are imported on first use (PEP 562), not with the package: ``import
latentae`` and the command-line entry points (``latentae ...``, ``python -m latentae.train``)
must not load torch before they have set the OpenMP wait policy (``latentae.runtime``),
and ``latentae --help`` should not pay for torch at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AutoencoderKL": "latentae.model",
    "DiagonalGaussian": "latentae.model",
    "ModelConfig": "latentae.model",
    "build_vae": "latentae.model",
    "Config": "latentae.recipe",
    "load_config": "latentae.recipe",
    "load_vae": "latentae.io",
    "save_diffusers": "latentae.io",
    "save_ldm": "latentae.io",
    "swap_vae": "latentae.pipelines",  # needs diffusers only when called
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below imports lazily
    from latentae.io import load_vae, save_diffusers, save_ldm
    from latentae.model import AutoencoderKL, DiagonalGaussian, ModelConfig, build_vae
    from latentae.pipelines import swap_vae
    from latentae.recipe import Config, load_config


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'latentae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
