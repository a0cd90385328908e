"""latentae: train, export, encode with and compare Stable-Diffusion-style KL autoencoders."""

__version__ = "0.1.0"

from latentae.model import AutoencoderKL, DiagonalGaussian, ModelConfig, build_vae  # noqa: E402
from latentae.recipe import Config, load_config  # noqa: E402
from latentae.io import load_vae, save_diffusers, save_ldm  # noqa: E402

__all__ = [
    "AutoencoderKL",
    "Config",
    "DiagonalGaussian",
    "ModelConfig",
    "build_vae",
    "load_config",
    "load_vae",
    "save_diffusers",
    "save_ldm",
]
