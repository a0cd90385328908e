"""PatchGAN discriminator: shapes, layout, init, ActNorm data init and its persistence."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from latentae.config import ConfigError, from_dict
from latentae.discriminator import (
    ActNorm,
    DiscriminatorConfig,
    build_discriminator,
    convert_sync_batchnorm,
)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
@pytest.mark.parametrize("norm", ["batch", "act"])
def test_output_shapes(n_layers, norm):
    d = build_discriminator(DiscriminatorConfig(n_layers=n_layers, base_channels=8, norm=norm))
    out = d(torch.randn(2, 3, 48, 64))
    # k4 s2 p1 halves (floor); each of the two k4 s1 p1 convs removes one pixel.
    assert out.shape == (2, 1, 48 // 2**n_layers - 2, 64 // 2**n_layers - 2)


def test_layout_widths_double_and_cap_at_8x():
    d = build_discriminator(DiscriminatorConfig(n_layers=5, base_channels=4))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 32, 32, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 2, 2, 1, 1]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 5  # every conv but the first and the last
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in d.modules()) == 6


def test_init_statistics():
    torch.manual_seed(0)
    d = build_discriminator(DiscriminatorConfig(n_layers=3, base_channels=64))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(w.mean().item()) < 1e-3 and w.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(c.bias is None or torch.all(c.bias == 0) for c in convs)
    bn_w = torch.cat([m.weight for m in d.modules() if isinstance(m, nn.BatchNorm2d)])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.005) and bn_w.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(torch.all(m.bias == 0) for m in d.modules() if isinstance(m, nn.BatchNorm2d))


def test_too_small_input_and_wrong_channels_raise():
    d = build_discriminator(DiscriminatorConfig(n_layers=3, base_channels=8))
    with pytest.raises(ValueError, match="at least 24x24"):
        d(torch.randn(1, 3, 23, 64))
    assert d(torch.randn(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        d(torch.randn(1, 4, 32, 32))


def test_config_validation():
    with pytest.raises(ValueError, match="n_layers"):
        DiscriminatorConfig(n_layers=0)
    with pytest.raises(ConfigError, match="norm"):
        from_dict(DiscriminatorConfig, {"norm": "instance"}, "discriminator")


def test_actnorm_standardises_first_training_batch_only():
    torch.manual_seed(0)
    norm = ActNorm(3)
    x = torch.randn(4, 3, 5, 5) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -1.0, 4.0]).view(
        1, 3, 1, 1
    )
    norm.eval()
    norm(x)
    assert norm.initialized.item() == 0  # eval calls do not initialise
    norm.train()
    y = norm(x)
    assert norm.initialized.item() == 1
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    scale = norm.scale.detach().clone()
    norm(x * 10 + 3)  # a second batch must not re-initialise
    assert torch.equal(norm.scale, scale)
    # The flag is read from the buffer once (a host sync), then remembered; loading a state
    # that says "not initialised" makes the next training batch initialise again.
    fresh = ActNorm(3).state_dict()
    norm.load_state_dict(fresh)
    norm(x * 10 + 3)
    assert norm.initialized.item() == 1 and not torch.equal(norm.scale, scale)


def test_actnorm_init_survives_state_dict_load():
    torch.manual_seed(0)
    cfg = DiscriminatorConfig(n_layers=2, base_channels=8, norm="act")
    d = build_discriminator(cfg).train()
    x = torch.randn(2, 3, 32, 32)
    d(x)  # data-dependent init
    sd = d.state_dict()
    assert any(k.endswith("initialized") for k in sd)
    torch.manual_seed(1)
    resumed = build_discriminator(cfg).train()
    resumed.load_state_dict(sd)
    probe = torch.randn(2, 3, 32, 32) * 5  # different statistics: a re-init would change the params
    torch.testing.assert_close(resumed(probe), d(probe))
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), sd.values()))


def test_convert_sync_batchnorm():
    d = convert_sync_batchnorm(build_discriminator(DiscriminatorConfig(n_layers=2, base_channels=8)))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in d.modules()) == 2
    assert not any(type(m) is nn.BatchNorm2d for m in d.modules())
    act = convert_sync_batchnorm(build_discriminator(DiscriminatorConfig(n_layers=2, base_channels=8, norm="act")))
    assert sum(isinstance(m, ActNorm) for m in act.modules()) == 2


def _actnorm_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        norm = ActNorm(2).train()
        x = torch.full((1, 2, 2, 2), float(rank * 4))  # rank 0: all 0, rank 1: all 4
        x[:, :, 0] += 1.0
        norm(x)
        torch.save({"scale": norm.scale.detach(), "bias": norm.bias.detach()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_actnorm_init_uses_global_statistics_across_ranks(tmp_path):
    # Each rank sees different data; without the all-reduce the ranks would start from
    # different parameters and DDP would never bring them back together.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_actnorm_rank, args=(2, port, str(tmp_path)), nprocs=2)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert torch.equal(r0["scale"], r1["scale"]) and torch.equal(r0["bias"], r1["bias"])
    # Global data per channel: {0,1} on rank 0 and {4,5} on rank 1 -> mean 2.5, std sqrt(4.25).
    torch.testing.assert_close(r0["scale"].flatten(), torch.full((2,), 1 / (4.25**0.5 + 1e-6)))
    torch.testing.assert_close(r0["bias"].flatten(), torch.full((2,), -2.5 / (4.25**0.5 + 1e-6)))
