"""swap_vae: real diffusers pipelines built offline from tiny random components (no hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randomize_, tiny_model_config
from latentae.io import save_diffusers
from latentae.model import build_vae
from latentae.pipelines import VAEMismatchError, expected_latent_channels, needs_shift_factor, swap_vae

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # pixels; tiny VAEs downsample by 4 -> 8x8 latents


# ------------------------------------------------------------------ tiny components


def _clip_tokenizer():
    # A character-level BPE vocabulary: no files, no hub (transformers builds it in memory).
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "\u2581abcdefghijklmnopqrstuvwxyz"]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text(with_projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=60, max_position_embeddings=77, projection_dim=32,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(cfg).eval()


def _t5_text():
    torch.manual_seed(1)
    cfg = transformers.T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return transformers.T5EncoderModel(cfg).eval()


def _diffusers_vae(latent_channels: int, **kw):
    """The VAE the pipeline is built with (to be replaced); f=4 like the tiny latentae VAEs."""
    torch.manual_seed(2)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8,
        latent_channels=latent_channels, sample_size=SIZE, **kw,
    )


def sd_pipeline(unet_in: int = 4):
    torch.manual_seed(3)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=SIZE // 4, in_channels=unet_in, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=16,
    )
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cls = diffusers.StableDiffusionInpaintPipeline if unet_in == 9 else diffusers.StableDiffusionPipeline
    return cls(vae=_diffusers_vae(4), text_encoder=_clip_text(), tokenizer=_clip_tokenizer(), unet=unet,
               scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def flux_pipeline():
    torch.manual_seed(4)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_diffusers_vae(16, shift_factor=0.1, scaling_factor=1.2),
        text_encoder=_clip_text(), tokenizer=_clip_tokenizer(), text_encoder_2=_t5_text(), tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def sd3_pipeline():
    torch.manual_seed(5)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=SIZE // 4, patch_size=1, in_channels=16, out_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
    )
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_diffusers_vae(16, shift_factor=0.1, scaling_factor=1.2),
        text_encoder=_clip_text(True, 6), tokenizer=_clip_tokenizer(), text_encoder_2=_clip_text(True, 7),
        tokenizer_2=_clip_tokenizer(), text_encoder_3=_t5_text(), tokenizer_3=_t5_tokenizer(),
    )


def _export_tool():
    spec = importlib.util.spec_from_file_location("latentae_export_tool", ROOT / "tools" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ours(latent_channels: int, seed: int, **kw):
    torch.manual_seed(seed)
    quant = latent_channels == 4
    return randomize_(build_vae(tiny_model_config(latent_channels, quant=quant, **kw)), seed).eval()


def _assert_same_decoder(pipe, ours):
    z = torch.randn(1, ours.config.latent_channels, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = pipe.vae.decode(z).sample
        mine = ours.decode(z)
    assert torch.allclose(theirs, mine, atol=1e-5), (theirs - mine).abs().max()


# ------------------------------------------------------------------ tests


def test_sd_pipeline_runs_with_swapped_vae(tmp_path):
    pipe = sd_pipeline()
    ours = _ours(4, seed=10, scaling_factor=0.25)
    save_diffusers(ours, tmp_path / "vae")
    dvae = swap_vae(pipe, tmp_path / "vae")  # a path, as a user would pass it
    assert pipe.vae is dvae and isinstance(dvae, diffusers.AutoencoderKL)
    assert pipe.vae.config.scaling_factor == 0.25
    assert {k: v.shape for k, v in dvae.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    _assert_same_decoder(pipe, ours)
    out = pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()
    # The pipeline really used our VAE: decoding its latents with our model gives its image.
    latents = pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        mine = (ours.decode(latents / 0.25) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(mine - out).max() < 1e-4


def test_sd_rejects_16_channel_vae_and_checks_inpainting_unet():
    pipe = sd_pipeline()
    with pytest.raises(VAEMismatchError, match=r"latent_channels=16.*reads 4"):
        swap_vae(pipe, _ours(16, seed=11, scaling_factor=0.3))
    assert isinstance(pipe.vae, diffusers.AutoencoderKL) and pipe.vae.config.latent_channels == 4  # untouched
    inpaint = sd_pipeline(unet_in=9)
    c, how = expected_latent_channels(inpaint)
    assert c == 4 and "9 = 4 latents + 4 masked-image latents + 1 mask" in how
    swap_vae(inpaint, _ours(4, seed=12, scaling_factor=0.3))  # a 4-channel VAE fits the 9-channel UNet
    with pytest.raises(VAEMismatchError, match="inpainting UNet"):
        swap_vae(inpaint, _ours(16, seed=13, scaling_factor=0.3))


def test_sd_rejects_other_downsampling_factor():
    pipe = sd_pipeline()
    f8 = build_vae(tiny_model_config(4, block_out_channels=(16, 32, 32, 32), scaling_factor=0.3))
    with pytest.raises(VAEMismatchError, match="downsamples by 8.*vae_scale_factor=4"):
        swap_vae(pipe, f8)


def test_uncalibrated_scaling_factor_warns():
    pipe = sd_pipeline()
    with pytest.warns(UserWarning, match="scaling_factor is 1.0"):
        swap_vae(pipe, _ours(4, seed=14))


def test_flux_pipeline_with_exported_16_channel_vae(tmp_path):
    pipe = flux_pipeline()
    c, how = expected_latent_channels(pipe)
    assert c == 16 and "64 = 16 latent channels x 4" in how
    assert needs_shift_factor(pipe)
    ours = _ours(16, seed=20)
    src = tmp_path / "ours"
    save_diffusers(ours, src)
    # Exported without a shift factor: the FLUX pipeline must refuse it.
    with pytest.raises(VAEMismatchError, match="shift_factor=None"):
        swap_vae(pipe, src)
    # The lead's export tool sets the factors (in process: same code as the CLI).
    rc = _export_tool().main([str(src), "--out", str(tmp_path / "flux-vae"), "--format", "diffusers",
                              "--scaling-factor", "0.9", "--shift-factor", "0.05"])
    assert rc in (0, None)
    swap_vae(pipe, tmp_path / "flux-vae")
    assert pipe.vae.config.shift_factor == 0.05 and pipe.vae.config.scaling_factor == 0.9
    _assert_same_decoder(pipe, ours)
    out = pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", max_sequence_length=16,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()
    # A 4-channel VAE cannot drive a FLUX transformer.
    with pytest.raises(VAEMismatchError, match=r"latent_channels=4.*reads 16.*x 4"):
        swap_vae(pipe, _ours(4, seed=21, scaling_factor=0.3, shift_factor=0.0))


def test_sd3_pipeline_with_16_channel_vae():
    pipe = sd3_pipeline()
    assert expected_latent_channels(pipe)[0] == 16 and needs_shift_factor(pipe)
    with pytest.raises(VAEMismatchError, match="shift_factor=None"):
        swap_vae(pipe, _ours(16, seed=30, scaling_factor=1.5))
    ours = _ours(16, seed=31, scaling_factor=1.5, shift_factor=0.06)
    swap_vae(pipe, ours)
    _assert_same_decoder(pipe, ours)
    out = pipe("a cat", num_inference_steps=2, height=SIZE, width=SIZE, output_type="np", max_sequence_length=16,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, SIZE, SIZE, 3) and np.isfinite(out).all()
    with pytest.raises(VAEMismatchError, match=r"latent_channels=4.*reads 16"):
        swap_vae(pipe, _ours(4, seed=32, scaling_factor=0.3, shift_factor=0.0))


def test_swap_vae_rejects_unknown_types():
    with pytest.raises(TypeError, match="vae must be a path"):
        swap_vae(sd_pipeline(), object())
