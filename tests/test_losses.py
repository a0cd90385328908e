"""VAELoss: every term pinned against hand computations on small fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import latentae.losses as losses
from latentae.config import ConfigError, from_dict
from latentae.discriminator import DiscriminatorConfig, build_discriminator
from latentae.losses import (
    DISCRIMINATOR_LOG_KEYS,
    GENERATOR_LOG_KEYS,
    LossConfig,
    VAELoss,
    adaptive_weight,
    frozen,
    hinge_d_loss,
    vanilla_d_loss,
)
from latentae.model import DiagonalGaussian, ModelConfig, build_vae

pytestmark = pytest.mark.filterwarnings("ignore::latentae.perceptual.RandomLPIPSWarning")

# No LPIPS, no GAN: the pure pixel / KL / nll terms.
PLAIN = dict(perceptual_weight=0.0, disc_weight=0.0)


class LinearD(nn.Module):
    """Stub discriminator: logits = c * channel 0 of the input, so every logit is known by hand."""

    def __init__(self, c: float = 1.0):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.c * x[:, :1]


def posterior(mean: torch.Tensor, logvar: torch.Tensor) -> DiagonalGaussian:
    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))


def fixed_batch():
    # x = 0, reconstruction = d: rec terms are functions of d alone.  [2, 3, 1, 2]
    x = torch.zeros(2, 3, 1, 2)
    d = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 2.0, 2.0, -0.5, 1.5, 0.0, -4.0]).view(2, 3, 1, 2)
    # Posterior [2, 1, 1, 2]: per-element KL 0.5 * (mu^2 + var - 1 - logvar).
    mean = torch.tensor([1.0, 0.0, -2.0, 0.0]).view(2, 1, 1, 2)
    logvar = torch.tensor([0.0, math.log(2.0), 0.0, math.log(0.5)]).view(2, 1, 1, 2)
    return x, d, posterior(mean, logvar)


KL_ELEMENTS = [0.5, 0.5 * (2 - 1 - math.log(2.0)), 0.5 * 4, 0.5 * (0.5 - 1 - math.log(0.5))]
D_VALUES = [1.0, -2.0, 0.5, 0.0, 3.0, -1.0, 2.0, 2.0, -0.5, 1.5, 0.0, -4.0]


def gen(loss, x, rec, post, step=0, last_layer=None, discriminator=None):
    return loss.generator_loss(x, rec, post, step=step, last_layer=last_layer, discriminator=discriminator)


# --------------------------------------------------------------------------- rec / KL / nll


@pytest.mark.parametrize("rec_loss", ["l1", "l2"])
@pytest.mark.parametrize("reduction", ["sum_mean", "mean"])
def test_rec_kl_total_by_hand(rec_loss, reduction):
    x, d, post = fixed_batch()
    cfg = LossConfig(rec_loss=rec_loss, rec_weight=2.0, kl_weight=0.1, kl_reduction=reduction,
                     nll_reduction=reduction, **PLAIN)  # fmt: skip
    total, logs = gen(VAELoss(cfg), x, d, post)

    per_pixel = [abs(v) if rec_loss == "l1" else v * v for v in D_VALUES]
    nll = 2.0 * sum(per_pixel) / (2 if reduction == "sum_mean" else 12)  # logvar = 0
    kl = sum(KL_ELEMENTS) / (2 if reduction == "sum_mean" else 4)
    assert logs["rec"].item() == pytest.approx(sum(per_pixel) / 12)  # unweighted per-pixel mean
    assert logs["nll"].item() == pytest.approx(nll)
    assert logs["kl"].item() == pytest.approx(kl)
    assert total.item() == pytest.approx(nll + 0.1 * kl)
    assert logs["total"].item() == pytest.approx(total.item())
    assert logs["g"].item() == 0 and logs["d_weight"].item() == 0 and logs["lpips"].item() == 0


def test_kl_matches_closed_form_from_moments():
    # Independent check of the reduction against the KL formula written out here.
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    ref = 0.5 * (mean**2 + logvar.exp() - 1 - logvar)
    post = posterior(mean, logvar)
    x = torch.zeros(3, 3, 4, 4)
    for red, expected in [("sum_mean", ref.sum() / 3), ("mean", ref.mean())]:
        _, logs = gen(VAELoss(LossConfig(kl_reduction=red, nll_reduction=red, **PLAIN)), x, x, post)
        assert logs["kl"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_nll_with_learned_logvar_by_hand():
    x, d, post = fixed_batch()
    loss = VAELoss(LossConfig(learn_logvar=True, logvar_init=math.log(2.0), kl_weight=0.0, **PLAIN))
    total, logs = gen(loss, x, d, post)
    # nll = sum(|d| / exp(logvar) + logvar) / N  with exp(logvar) = 2, 6 pixels per image.
    expected = (sum(abs(v) for v in D_VALUES) / 2 + 12 * math.log(2.0)) / 2
    assert logs["nll"].item() == pytest.approx(expected)
    assert logs["logvar"].item() == pytest.approx(math.log(2.0))
    total.backward()
    # d nll / d logvar = sum(-|d| * exp(-logvar) + 1) / N
    assert loss.logvar.grad.item() == pytest.approx((-sum(abs(v) for v in D_VALUES) / 2 + 12) / 2)


def test_learned_logvar_is_trained_by_one_optimizer_step():
    x, d, post = fixed_batch()
    loss = VAELoss(LossConfig(learn_logvar=True, **PLAIN))
    assert loss.trainable_parameters() == [loss.logvar]
    opt = torch.optim.SGD(loss.trainable_parameters(), lr=0.1)
    before = loss.logvar.item()
    gen(loss, x, d, post)[0].backward()
    opt.step()
    assert loss.logvar.item() != before
    # The nll pulls logvar towards log(mean |d|) > 0 here, so it must go up.
    assert loss.logvar.item() > before


def test_fixed_logvar_is_not_trainable():
    x, d, post = fixed_batch()
    loss = VAELoss(LossConfig(logvar_init=0.5, **PLAIN))
    assert loss.trainable_parameters() == []
    assert not loss.logvar.requires_grad
    d = d.clone().requires_grad_(True)
    gen(loss, x, d, post)[0].backward()
    assert loss.logvar.grad is None and loss.logvar.item() == 0.5


def test_logs_have_stable_keys_and_are_detached_float32():
    x, d, post = fixed_batch()
    _, logs = gen(VAELoss(LossConfig(**PLAIN)), x, d.requires_grad_(True), post)
    assert tuple(logs) == GENERATOR_LOG_KEYS
    assert all(v.ndim == 0 and v.dtype == torch.float32 and not v.requires_grad for v in logs.values())


# --------------------------------------------------------------------------- GAN terms


LOGITS_REAL = torch.tensor([2.0, 0.5, -1.0])
LOGITS_FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_d_loss_by_hand():
    # relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1, 2.5]
    assert hinge_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))


def test_vanilla_d_loss_by_hand():
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    expected = 0.5 * (sum(sp(-v) for v in LOGITS_REAL.tolist()) / 3 + sum(sp(v) for v in LOGITS_FAKE.tolist()) / 3)
    assert vanilla_d_loss(LOGITS_REAL, LOGITS_FAKE).item() == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_through_module(kind):
    x = LOGITS_REAL.view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    rec = LOGITS_FAKE.view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    loss = VAELoss(LossConfig(perceptual_weight=0.0, disc_loss=kind, disc_start=0, disc_factor=0.5))
    d_loss, logs = loss.discriminator_loss(x, rec, step=0, discriminator=LinearD())
    ref = (hinge_d_loss if kind == "hinge" else vanilla_d_loss)(LOGITS_REAL, LOGITS_FAKE).item()
    assert logs["d_loss"].item() == pytest.approx(ref)
    assert d_loss.item() == pytest.approx(0.5 * ref)
    assert logs["logits_real"].item() == pytest.approx(0.5) and logs["logits_fake"].item() == pytest.approx(-1 / 6)
    assert tuple(logs) == DISCRIMINATOR_LOG_KEYS


def test_g_term_by_hand_with_fixed_weight():
    # last_layer=None: no adaptive weight, d_weight = disc_weight.
    x, d, post = fixed_batch()
    loss = VAELoss(LossConfig(perceptual_weight=0.0, kl_weight=0.0, disc_start=0, disc_weight=0.5, disc_factor=2.0))
    total, logs = gen(loss, x, d, post, discriminator=LinearD(3.0))
    g = -3.0 * (D_VALUES[0] + D_VALUES[1] + D_VALUES[6] + D_VALUES[7]) / 4  # channel 0 of both images
    assert logs["g"].item() == pytest.approx(g)
    assert logs["d_weight"].item() == 0.5 and logs["disc_factor"].item() == 2.0
    assert total.item() == pytest.approx(sum(abs(v) for v in D_VALUES) / 2 + 0.5 * 2.0 * g)


# --------------------------------------------------------------------------- adaptive weight


def adaptive_setup(w, c):
    """The reconstruction IS the last layer: rec = w [1, 1, 1, 2], x = 0, L2, N = 1.

    nll = w1^2 + w2^2        ->  grad 2w,          norm 2|w|
    g   = -c (w1 + w2) / 2   ->  grad (-c/2, -c/2), norm |c| / sqrt(2)
    """
    last = nn.Parameter(torch.tensor(w).view(1, 1, 1, 2))
    x = torch.zeros(1, 1, 1, 2)
    post = posterior(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    return last, x, post, LinearD(c)


def test_adaptive_weight_by_hand():
    last, x, post, D = adaptive_setup([3.0, 4.0], 2.0)
    loss = VAELoss(LossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=0, disc_weight=0.1))
    total, logs = gen(loss, x, last, post, last_layer=last, discriminator=D)
    ratio = 10.0 / (math.sqrt(2.0) + 1e-4)
    assert logs["nll_grad_norm"].item() == pytest.approx(10.0)
    assert logs["g_grad_norm"].item() == pytest.approx(math.sqrt(2.0))
    assert logs["d_weight"].item() == pytest.approx(0.1 * ratio)
    g = -2.0 * 7.0 / 2
    assert logs["g"].item() == pytest.approx(g)
    assert total.item() == pytest.approx(25.0 + 0.1 * ratio * g)
    # The weight is detached: the VAE's gradient is d(nll)/dw + d_weight * d(g)/dw, nothing through the ratio.
    total.backward()
    expected = torch.tensor([6.0, 8.0]) + 0.1 * ratio * torch.tensor([-1.0, -1.0])
    torch.testing.assert_close(last.grad.flatten(), expected)


def test_adaptive_weight_matches_independent_autograd():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3))
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    nll = (a @ w).pow(2).sum()
    g = -(b @ w).tanh().mean()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    weight, nll_norm, g_norm = adaptive_weight(nll, g, w)
    assert weight.item() == pytest.approx((gn / (gg + 1e-4)).item(), rel=1e-5)
    assert (nll_norm.item(), g_norm.item()) == pytest.approx((gn.item(), gg.item()))
    assert not weight.requires_grad
    (nll + g).backward()  # the graph was retained for the real backward


def test_adaptive_weight_clamps_at_both_ends():
    # Upper: a vanishing g gradient would give 10 / 1e-4 = 1e5 -> clamped to 1e4.
    last, x, post, D = adaptive_setup([3.0, 4.0], 1e-9)
    loss = VAELoss(LossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=0, disc_weight=1.0))
    _, logs = gen(loss, x, last, post, last_layer=last, discriminator=D)
    assert logs["d_weight"].item() == pytest.approx(1.0e4)
    # Lower: a zero nll gradient (perfect reconstruction) gives exactly 0.
    last, x, post, D = adaptive_setup([0.0, 0.0], 2.0)
    _, logs = gen(loss, x, last, post, last_layer=last, discriminator=D)
    assert logs["d_weight"].item() == 0.0 and logs["g_grad_norm"].item() == pytest.approx(math.sqrt(2.0))


def test_no_grad_validation_drops_adversarial_term_but_logs_g():
    last, x, post, D = adaptive_setup([3.0, 4.0], 2.0)
    loss = VAELoss(LossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=0))
    with torch.no_grad():
        total, logs = gen(loss, x, last, post, last_layer=last, discriminator=D)
    assert logs["d_weight"].item() == 0.0 and logs["g"].item() == pytest.approx(-7.0)
    assert total.item() == pytest.approx(25.0)


# --------------------------------------------------------------------------- schedule


def test_before_disc_start_no_g_and_no_adaptive_weight(monkeypatch):
    calls = []
    monkeypatch.setattr(losses, "adaptive_weight", lambda *a: calls.append(a) or pytest.fail("computed"))
    last, x, post, D = adaptive_setup([3.0, 4.0], 2.0)
    loss = VAELoss(LossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=10))
    total, logs = gen(loss, x, last, post, step=9, last_layer=last, discriminator=D)
    assert D.calls == 0 and not calls
    assert logs["g"].item() == 0 and logs["d_weight"].item() == 0 and logs["disc_factor"].item() == 0
    assert total.item() == pytest.approx(25.0)
    assert not loss.gan_active(9) and loss.gan_active(10)


def test_at_disc_start_adversarial_term_is_on():
    last, x, post, D = adaptive_setup([3.0, 4.0], 2.0)
    loss = VAELoss(LossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=10))
    total, logs = gen(loss, x, last, post, step=10, last_layer=last, discriminator=D)
    assert D.calls == 1 and logs["disc_factor"].item() == 1.0 and logs["d_weight"].item() > 0
    assert total.item() < 25.0  # g = -7 entered with a positive weight


def test_disc_train_start_schedule():
    loss = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=100, disc_train_start=40))
    assert [loss.disc_active(s) for s in (39, 40, 100)] == [False, True, True]
    assert [loss.gan_active(s) for s in (40, 99, 100)] == [False, False, True]
    default = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=100))
    assert not default.disc_active(99) and default.disc_active(100)
    x = rec = torch.full((1, 3, 1, 2), 0.5)  # hinge: 0.5 * (relu(1 - .5) + relu(1 + .5)) = 1
    d_loss, logs = loss.discriminator_loss(x, rec, step=39, discriminator=LinearD())
    assert d_loss.item() == 0 and logs["disc_factor"].item() == 0 and logs["d_loss"].item() == 1.0
    d_loss, logs = loss.discriminator_loss(x, rec, step=40, discriminator=LinearD())
    assert d_loss.item() == 1.0 and logs["disc_factor"].item() == 1.0


def test_gan_disabled_by_zero_weight():
    loss = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=0, disc_weight=0.0))
    assert not loss.gan_active(10**6) and not loss.disc_active(10**6)


# --------------------------------------------------------------------------- gradient routing


def tiny_vae():
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1, sample_size=32)
    return build_vae(cfg)


def test_generator_step_gives_discriminator_no_gradient_and_restores_flags():
    vae, D = tiny_vae(), build_discriminator(DiscriminatorConfig(n_layers=2, base_channels=8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, post = vae(x)
    loss = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=0))
    total, logs = gen(loss, x, rec, post, last_layer=vae.last_layer, discriminator=D)
    total.backward()
    assert logs["d_weight"].item() > 0
    assert all(p.grad is None for p in D.parameters())
    assert all(p.requires_grad for p in D.parameters())
    assert vae.last_layer.grad is not None and vae.last_layer.grad.abs().sum() > 0


def test_discriminator_step_leaves_vae_gradients_untouched():
    vae, D = tiny_vae(), build_discriminator(DiscriminatorConfig(n_layers=2, base_channels=8))
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    rec, _ = vae(x)
    loss = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=0))
    d_loss, _ = loss.discriminator_loss(x, rec, step=0, discriminator=D)
    d_loss.backward()
    assert all(p.grad is None for p in vae.parameters()) and x.grad is None
    assert all(p.grad is not None for p in D.parameters())
    assert sum(p.grad.abs().sum() for p in D.parameters()) > 0


def test_frozen_restores_flags_after_an_error():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    m[1].weight.requires_grad_(False)
    with pytest.raises(RuntimeError), frozen(m):
        assert not any(p.requires_grad for p in m.parameters())
        raise RuntimeError("boom")
    assert [p.requires_grad for p in m.parameters()] == [True, True, False, True]


def test_full_loss_under_bf16_autocast_with_lpips():
    vae, D = tiny_vae(), build_discriminator(DiscriminatorConfig(n_layers=2, base_channels=8))
    loss = VAELoss(LossConfig(lpips_net="alex", lpips_pretrained=False, disc_start=0, learn_logvar=True))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rec, post = vae(x)
        total, logs = gen(loss, x, rec, post, last_layer=vae.last_layer, discriminator=D)
        d_loss, d_logs = loss.discriminator_loss(x, rec, step=0, discriminator=D)
    assert total.dtype == torch.float32 and d_loss.dtype == torch.float32
    assert all(torch.isfinite(v) for v in {**logs, **d_logs}.values())
    assert logs["lpips"].item() > 0 and logs["d_weight"].item() > 0
    total.backward()
    assert vae.last_layer.grad is not None and torch.isfinite(vae.last_layer.grad).all()
    assert loss.logvar.grad is not None


# --------------------------------------------------------------------------- config, errors, checkpoints


def test_config_errors():
    with pytest.raises(ValueError, match="disc_train_start"):
        LossConfig(disc_start=10, disc_train_start=11)
    with pytest.raises(ValueError, match="kl_weight"):
        LossConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_reduction"):
        LossConfig(kl_reduction="sum")
    with pytest.raises(ConfigError, match="disc_train_start"):
        from_dict(LossConfig, {"disc_start": 5, "disc_train_start": 6}, "loss")
    with pytest.raises(ConfigError, match="did you mean 'kl_weight'"):
        from_dict(LossConfig, {"kl_wieght": 1e-6}, "loss")
    cfg = from_dict(LossConfig, {"kl_weight": "1e-6", "disc_train_start": None}, "loss")
    assert cfg.kl_weight == 1e-6 and cfg.disc_train_start is None


def test_bad_inputs_raise_clear_errors():
    x, d, post = fixed_batch()
    loss = VAELoss(LossConfig(perceptual_weight=0.0, disc_start=0))
    with pytest.raises(ValueError, match="same"):
        gen(loss, x, d[:1], post)
    with pytest.raises(ValueError, match="no discriminator"):
        gen(loss, x, d, post, discriminator=None)


def test_checkpoint_holds_logvar_not_lpips():
    loss = VAELoss(LossConfig(lpips_net="alex", lpips_pretrained=False, learn_logvar=True, logvar_init=0.25))
    sd = loss.state_dict()
    assert list(sd) == ["logvar"]
    fresh = VAELoss(LossConfig(lpips_net="alex", lpips_pretrained=False, learn_logvar=True))
    lp_before = {k: v.clone() for k, v in fresh.perceptual.state_dict().items()}
    # A checkpoint that did carry (other) LPIPS weights must not replace the rebuilt ones.
    polluted = {**sd, **{f"perceptual.{k}": torch.zeros_like(v) for k, v in lp_before.items()}}
    fresh.load_state_dict(polluted, strict=True)
    assert fresh.logvar.item() == 0.25
    assert all(torch.equal(v, fresh.perceptual.state_dict()[k]) for k, v in lp_before.items())
    with pytest.raises(RuntimeError, match="logvar"):
        fresh.load_state_dict({}, strict=True)


def test_last_layer_not_in_graph_is_a_clear_error():
    last, x, post, D = adaptive_setup([3.0, 4.0], 2.0)
    loss = VAELoss(LossConfig(rec_loss="l2", perceptual_weight=0.0, disc_start=0))
    stray = nn.Parameter(torch.ones(3))  # e.g. the last layer of a different (wrapped) copy of the model
    with pytest.raises(ValueError, match="not in the graph"):
        gen(loss, x, last, post, last_layer=stray, discriminator=D)
