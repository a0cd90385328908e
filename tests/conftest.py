import os

import pytest
import torch

from latentae.model import ModelConfig

# Tests run on 2 CPU cores next to each other; keep torch from oversubscribing.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def tiny_model_config(latent_channels: int = 4, quant: bool = True, attention: bool = True, **kw) -> ModelConfig:
    """A 3-level (f=4) VAE small enough for fast CPU tests."""
    base = dict(
        latent_channels=latent_channels,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_attention=attention,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
        sample_size=32,
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_cfg():
    return tiny_model_config


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every 1-d parameter (norm affines, biases) non-trivial values so key mix-ups show,
    keeping the default init scale of the weights so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            if p.ndim > 1:
                p.mul_(1.0 + noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return module
