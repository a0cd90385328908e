"""Our AutoencoderKL equals diffusers.AutoencoderKL: names, shapes and math."""

import diffusers
import pytest
import torch

from conftest import randomize_, tiny_model_config
from latentae.io import diffusers_config
from latentae.model import DiagonalGaussian, build_vae


def diffusers_twin(cfg):
    d = diffusers_config(cfg)
    return diffusers.AutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")}).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(latent_channels=4, quant=True),
        dict(latent_channels=16, quant=False),
        dict(latent_channels=32, quant=False, attention=False),
        dict(latent_channels=4, quant=True, layers_per_block=2, block_out_channels=(8, 16, 16, 32)),
    ],
)
def test_same_parameters_and_outputs_as_diffusers(kw):
    cfg = tiny_model_config(**kw)
    ours, ref = randomize_(build_vae(cfg)).eval(), diffusers_twin(cfg)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)  # same names, same order
    assert all(a[k].shape == b[k].shape for k in a)
    ref.load_state_dict(a)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        p, pr = ours.encode(x), ref.encode(x).latent_dist
        torch.testing.assert_close(p.mean, pr.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(p.logvar, pr.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(p.mean), ref.decode(pr.mean).sample, atol=1e-5, rtol=0)
    f = cfg.downsample_factor
    assert p.mean.shape == (2, cfg.latent_channels, 32 // f, 48 // f)


def test_forward_returns_reconstruction_and_posterior():
    vae = build_vae(tiny_model_config())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, post = vae(x)
    assert rec.shape == x.shape and isinstance(post, DiagonalGaussian)
    rec.mean().backward()
    assert vae.encoder.conv_in.weight.grad is not None  # one graph: encoder gets gradients through forward


def test_sample_is_seeded_and_mode_is_mean():
    vae = build_vae(tiny_model_config()).eval()
    with torch.no_grad():
        post = vae.encode(torch.rand(1, 3, 32, 32))
    s1 = post.sample(generator=torch.Generator().manual_seed(3))
    s2 = post.sample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and not torch.equal(s1, post.mode())
    assert torch.equal(post.mode(), post.mean)


def test_kl_matches_closed_form():
    mean = torch.tensor([[[[0.5]], [[-1.0]]]])
    logvar = torch.tensor([[[[0.0]], [[2.0]]]])
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    # 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2)
    expected = torch.tensor([0.5 * 0.25, 0.5 * (1.0 + torch.e**2 - 1.0 - 2.0)])
    torch.testing.assert_close(post.kl().flatten(), expected)


@pytest.mark.parametrize("h, w", [(33, 47), (30, 32), (5, 3)])
def test_odd_sizes_are_reflect_padded_and_cropped(h, w):
    vae = build_vae(tiny_model_config()).eval()
    x = torch.rand(1, 3, h, w) * 2 - 1
    with torch.no_grad():
        rec, post = vae(x, sample_posterior=False)
        f = vae.config.downsample_factor
        assert rec.shape == x.shape
        assert post.mean.shape[-2:] == (-(-h // f), -(-w // f))
        if h > 4 and w > 4:  # the padded input the model saw is the reflect-padded image
            padded = torch.nn.functional.pad(x, (0, (-w) % f, 0, (-h) % f), mode="reflect")
            torch.testing.assert_close(vae.encode(padded).mean, post.mean)


def test_odd_sizes_can_be_refused():
    vae = build_vae(tiny_model_config(odd_size="error"))
    with pytest.raises(ValueError, match="33x32 is not a multiple of the downsampling factor 4"):
        vae.encode(torch.zeros(1, 3, 33, 32))


def test_wrong_channels_rejected():
    with pytest.raises(ValueError, match=r"expected images of shape \[N, 3, H, W\], got \(1, 4, 32, 32\)"):
        build_vae(tiny_model_config()).encode(torch.zeros(1, 4, 32, 32))


def test_scale_unscale_roundtrip():
    vae = build_vae(tiny_model_config(scaling_factor=0.5, shift_factor=0.1))
    z = torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.1) * 0.5)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)
