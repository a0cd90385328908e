"""LPIPS: offline-safe construction, frozen/eval behaviour, gradients into the VAE."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import torch
from torch import nn

from latentae.losses import LossConfig, VAELoss
from latentae.model import ModelConfig, build_vae
from latentae.perceptual import (
    LPIPS,
    MissingWeightsError,
    RandomLPIPSWarning,
    backbone_path,
    backbone_url,
    build_lpips,
)

pytestmark = pytest.mark.filterwarnings("ignore::latentae.perceptual.RandomLPIPSWarning")


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub dir; any download attempt fails the test (loading an existing file still works)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_download(*args, **kwargs):
        pytest.fail(f"tried to download {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_pretrained_missing_backbone_raises_clear_error(empty_hub, net):
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    url = (VGG16_Weights if net == "vgg" else AlexNet_Weights).IMAGENET1K_V1.url
    filename = os.path.basename(urlparse(url).path)
    with pytest.raises(MissingWeightsError) as info:
        build_lpips(net, pretrained=True)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert filename in msg and url in msg
    assert str(empty_hub / "checkpoints" / filename) in msg  # the exact place to put it
    assert "lpips_pretrained=false" in msg
    assert backbone_path(net) == empty_hub / "checkpoints" / filename and backbone_url(net) == url


def test_vae_loss_with_pretrained_lpips_and_no_weights_fails_at_build(empty_hub):
    with pytest.raises(MissingWeightsError, match="vgg16"):
        VAELoss(LossConfig(lpips_net="vgg", lpips_pretrained=True))
    # No LPIPS requested: nothing to load, nothing to fail.
    assert VAELoss(LossConfig(perceptual_weight=0.0)).perceptual is None


def test_corrupt_backbone_file_names_the_file(empty_hub):
    path = empty_hub / "checkpoints" / os.path.basename(urlparse(backbone_url("alex")).path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="corrupt") as info:
        build_lpips("alex", pretrained=True)
    assert str(path) in str(info.value)


def test_random_backbone_warns():
    with pytest.warns(RandomLPIPSWarning, match="not meaningful"):
        lp = build_lpips("alex", pretrained=False)
    assert isinstance(lp, LPIPS) and not lp.pretrained and lp.net_name == "alex"


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_random_backbone_is_deterministic_and_leaves_global_rng_alone(net):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_lpips(net, pretrained=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(7)  # a different global seed must not matter
    b = build_lpips(net, pretrained=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 10
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The calibrated linear heads are the shipped ones even with a random backbone.
    shipped = torch.load(__import__("latentae.perceptual").perceptual.linear_heads_path(net), map_location="cpu")
    assert torch.equal(sa["net.lin0.model.1.weight"], shipped["lin0.model.1.weight"])


def test_frozen_and_stays_eval_inside_a_training_parent():
    lp = build_lpips("alex", pretrained=False)
    parent = nn.ModuleDict({"lpips": lp, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in lp.modules())
    assert not any(p.requires_grad for p in lp.parameters())
    lp.train(True)
    assert not any(m.training for m in lp.modules())


def test_distance_properties_and_shape_errors():
    lp = build_lpips("alex", pretrained=False)
    torch.manual_seed(0)
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    d = lp(x, y)
    assert d.shape == (3,) and d.dtype == torch.float32
    assert (d > 0).all()
    assert torch.allclose(lp(x, x), torch.zeros(3), atol=1e-6)
    # Dropout stays off: repeated calls agree exactly.
    assert torch.equal(d, lp(x, y))
    with pytest.raises(ValueError, match="same shape"):
        lp(x, y[:2])
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        lp(x[:, :1], y[:, :1])


def test_gradient_reaches_vae_through_perceptual_term_alone():
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1, sample_size=32))
    loss = VAELoss(
        LossConfig(rec_weight=0.0, kl_weight=0.0, perceptual_weight=1.0, lpips_net="alex", lpips_pretrained=False,
                   disc_weight=0.0)  # fmt: skip
    )
    vae.train()
    loss.train()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, post = vae(x)
    total, logs = loss.generator_loss(x, rec, post, step=0, last_layer=vae.last_layer, discriminator=None)
    assert logs["lpips"].item() > 0
    # nll = sum over pixels of the broadcast per-image LPIPS / N  (rec_weight 0, logvar 0)
    assert logs["nll"].item() == pytest.approx(3 * 32 * 32 * logs["lpips"].item(), rel=1e-5)
    total.backward()
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None for g in grads)
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.last_layer.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.perceptual.parameters())
    assert not loss.perceptual.training
