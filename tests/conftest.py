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


@pytest.fixture
def overflowing_vae():
    """(fp16 model with the fast path, fp32 plain reference on the same fp16-rounded weights).

    Like the SD/SDXL VAE's decoder in fp16: the second up level's first residual branch is
    scaled so the residual stream passes fp16's largest value (65504) there, with weights
    that still fit fp16. The group norms make that harmless in fp32; from that level on
    (the later levels and the output) fp16 overflows."""
    import copy

    from latentae.fast import optimize_for_inference
    from latentae.model import build_vae

    plain = randomize_(build_vae(tiny_model_config()), 0).eval()
    with torch.no_grad():
        conv = plain.decoder.up_blocks[1].resnets[0].conv2
        conv.weight.mul_(3e4 / conv.weight.abs().max())  # the weights themselves still fit fp16
    half = optimize_for_inference(copy.deepcopy(plain).half())
    ref = copy.deepcopy(half).float()  # fp32 math on the same fp16-rounded weights
    ref.inference = None
    return half, ref
