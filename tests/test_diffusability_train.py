"""Training for diffusability: the scale-equivariance term, EQ-VAE steps and latent noise.

Each term by hand on small tensors; the training forward against decodes built by hand;
the per-step draws (deterministic, with the configured frequencies); and in the trainer:
decoder-only and full fine-tuning, a resume that is bit-identical, and two gloo
processes whose replicas stay identical with every regulariser on.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from latentae.config import ConfigError
from latentae.losses import GENERATOR_LOG_KEYS, LossConfig, ScalePair, VAELoss
from latentae.model import DiagonalGaussian, build_vae
from latentae.recipe import load_config
from latentae.training.errors import StartupError
from latentae.training.forward import (
    FORWARD_LOG_KEYS,
    ForwardPlan,
    TrainingForward,
    add_latent_noise,
    draw_latent_noise,
    draw_plan,
)
from latentae.training.loop import Trainer, train
from latentae.training.plan import check_config
from test_ddp import _launch_two
from test_train import _scalar_tags, fresh_accelerate_state  # noqa: F401  (autouse: fresh Accelerate state, 1 thread)
from test_train_common import CONFIGS, assert_same_tensors, make_images, read_weights, tiny_config, write_config

pytestmark = pytest.mark.filterwarnings("ignore::latentae.perceptual.RandomLPIPSWarning")

ALL_ON = [
    "loss.scale_equivariance_weight=0.5", "loss.eq_vae_prob=0.5", "loss.eq_vae_low_res_prob=0.5",
    "loss.latent_noise=0.5", "loss.latent_noise_prob=0.5",
]  # fmt: skip


class MaxAbsLPIPS(nn.Module):
    """Stand-in perceptual distance: per image max |a - b|; takes images >= 2 px only."""

    min_size = 2

    def forward(self, a, b):
        return (a - b).abs().flatten(1).max(1).values


# --------------------------------------------------------------------------- the loss term


def _pairs():
    # A: factor 2, 1x2 px (below the stand-in's 2 px: pixel loss only), errors d; target 0.
    d = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, -1.0]).view(1, 3, 1, 2)
    a = ScalePair(d, torch.zeros(1, 3, 1, 2), 2)
    # B: factor 4, 2x2 px (LPIPS applies), every pixel off by 0.5.
    b = ScalePair(torch.full((1, 3, 2, 2), 1.5), torch.ones(1, 3, 2, 2), 4)
    return a, b


@pytest.mark.parametrize("reduction, expected_se", [("sum_mean", 159.0), ("mean", 1.375)])
def test_scale_equivariance_term_by_hand(reduction, expected_se):
    loss = VAELoss(LossConfig(perceptual_weight=2.0, lpips_net="alex", lpips_pretrained=False, disc_weight=0.0,
                              kl_weight=0.0, nll_reduction=reduction, kl_reduction=reduction,
                              scale_equivariance_weight=0.25))  # fmt: skip
    loss.perceptual = MaxAbsLPIPS()
    a, b = _pairs()
    # A: mean |d| = (1 + 2 + 0.5 + 0 + 3 + 1) / 6 = 1.25, no LPIPS (1 px < 2 px).
    # B: mean |d| = 0.5; LPIPS = 0.5; e = 0.5 + 2 * 0.5 = 1.5.
    # sum_mean: times the elements of the image each came from: A 3*2*4 = 24, B 3*8*8 = 192.
    #           se = (1.25 * 24 + 1.5 * 192) / 2 = (30 + 288) / 2 = 159.   mean: (1.25 + 1.5) / 2 = 1.375.
    se, se_rec, se_lpips = loss.scale_equivariance([a, b])
    assert se.item() == pytest.approx(expected_se)
    assert se_rec.item() == pytest.approx((1.25 + 0.5) / 2) and se_lpips.item() == pytest.approx(0.5)
    # Through generator_loss: a perfect main reconstruction (1x2 px: too small for LPIPS too)
    # and a zero-KL posterior leave total = weight * se.
    x = torch.zeros(1, 3, 1, 2)
    post = DiagonalGaussian(torch.zeros(1, 2, 1, 1))
    total, logs = loss.generator_loss(x, x.clone(), post, step=0, last_layer=None, discriminator=None, scaled=[a, b])
    assert total.item() == pytest.approx(0.25 * expected_se)
    assert tuple(logs) == GENERATOR_LOG_KEYS and logs["se"].item() == pytest.approx(expected_se)
    assert logs["lpips"].item() == 0.0  # the main pair was below the backbone's minimum
    # Without pairs the term is off and logged as 0; with weight 0 it is logged, not added.
    total, logs = loss.generator_loss(x, x.clone(), post, step=0, last_layer=None, discriminator=None)
    assert total.item() == 0.0 and logs["se"].item() == logs["se_rec"].item() == 0.0
    loss.config = LossConfig(perceptual_weight=2.0, disc_weight=0.0, kl_weight=0.0, nll_reduction=reduction)
    total, logs = loss.generator_loss(x, x.clone(), post, step=0, last_layer=None, discriminator=None, scaled=[a, b])
    assert total.item() == 0.0 and logs["se"].item() == pytest.approx(expected_se)


def test_lpips_backbones_take_their_minimum_size_and_no_less():
    from latentae.perceptual import build_lpips

    lp = build_lpips("alex", pretrained=False)
    assert lp.min_size == 31
    ok = torch.zeros(1, 3, 31, 40)
    assert lp(ok, ok).shape == (1,)
    with pytest.raises(RuntimeError):
        lp(ok[..., :30, :], ok[..., :30, :])


# --------------------------------------------------------------------------- latent noise


def test_latent_noise_by_hand():
    # Elements 1, 3, -1, 1: mean 1, deviations 0, 2, -2, 0 -> std = sqrt(8 / 4) = sqrt(2).
    z = torch.tensor([1.0, 3.0, -1.0, 1.0]).view(2, 1, 1, 2)
    sigma = torch.tensor([0.5, 0.0])
    eps = torch.tensor([1.0, -1.0, 2.0, 2.0]).view(2, 1, 1, 2)
    s = 0.5 * math.sqrt(2.0)
    expected = torch.tensor([1.0 + s, 3.0 - s, -1.0, 1.0]).view(2, 1, 1, 2)
    torch.testing.assert_close(add_latent_noise(z, sigma, eps), expected)
    # The gradient reaches z unchanged (the level is detached).
    zg = z.clone().requires_grad_(True)
    add_latent_noise(zg, sigma, eps).sum().backward()
    assert torch.equal(zg.grad, torch.ones_like(z))


def test_latent_noise_draws_follow_probability_and_strength():
    z = torch.zeros(4000, 2, 1, 1)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    sigma, eps = draw_latent_noise(z, 0.25, 0.8, g())
    picked = sigma > 0
    assert abs(picked.float().mean().item() - 0.25) < 0.03  # binomial sd 0.007
    assert sigma.max().item() < 0.8 and abs(sigma[picked].mean().item() - 0.4) < 0.03  # U[0, 0.8)
    assert eps.shape == z.shape
    again, _ = draw_latent_noise(z, 0.25, 0.8, g())
    assert torch.equal(sigma, again)
    assert (draw_latent_noise(z, 0.0, 0.8, g())[0] == 0).all()


# --------------------------------------------------------------------------- the per-step plan


def _plans(cfg: LossConfig, n: int = 3000, size=(256, 256)):
    return [draw_plan(cfg, seed=s, image_size=size, vae_factor=8) for s in range(n)]


def test_plan_draws_are_deterministic_with_the_configured_frequencies():
    cfg = LossConfig(eq_vae_prob=0.5, eq_vae_low_res_prob=0.25, scale_equivariance_weight=1.0,
                     scale_equivariance_sampling="one")  # fmt: skip
    plans = _plans(cfg)
    assert plans[7] == draw_plan(cfg, seed=7, image_size=(256, 256), vae_factor=8)
    eq = [p for p in plans if p.eq_size is not None]
    low = [p for p in plans if p.low_res_size is not None]
    assert abs(len(eq) / len(plans) - 0.5) < 0.04 and abs(len(low) / len(plans) - 0.125) < 0.03
    assert not any(p.eq_size and p.low_res_size for p in plans)  # low-res steps are plain steps
    # Scales s in [0.25, 1) of a 32 x 32 latent; rotations 90/180/270 about equally often.
    sizes = [p.eq_size[0] for p in eq]
    assert min(sizes) == 8 and max(sizes) == 32 and all(p.eq_size[0] == p.eq_size[1] for p in eq)
    for k in (1, 2, 3):
        assert abs(sum(p.eq_rotation == k for p in eq) / len(eq) - 1 / 3) < 0.05
    # One scale-equivariance factor per micro-batch, 2 and 4 about equally often.
    assert all(len(p.se_factors) == 1 for p in plans)
    assert abs(sum(p.se_factors == (2,) for p in plans) / len(plans) - 0.5) < 0.04
    # "all": both, except where a low-res latent is too small for 4x (8 px latent at 64 px).
    both = _plans(LossConfig(scale_equivariance_weight=1.0, eq_vae_low_res_prob=1.0), 200, size=(64, 64))
    assert {p.se_factors for p in both} == {(2, 4), (2,)}
    assert all(p.se_factors == (2,) for p in both if min(p.low_res_size) < 4)
    # Switching latent noise or the SE term on does not move the EQ-VAE draws.
    other = _plans(LossConfig(eq_vae_prob=0.5, eq_vae_low_res_prob=0.25, latent_noise=0.3))
    assert [(p.eq_size, p.eq_rotation, p.low_res_size) for p in other] == [
        (p.eq_size, p.eq_rotation, p.low_res_size) for p in plans
    ]
    assert all(p.noise_strength == 0.3 and p.noise_prob == 0.5 for p in other)
    assert _plans(LossConfig(), 5) == [ForwardPlan()] * 5  # everything off: the plain step
    assert all(p.eq_rotation == 0 for p in _plans(LossConfig(eq_vae_prob=1.0, eq_vae_rotation=False), 50))


# --------------------------------------------------------------------------- the training forward


def test_training_forward_matches_decodes_built_by_hand(tiny_cfg):
    torch.manual_seed(0)
    vae = build_vae(tiny_cfg())  # factor 4
    fwd = TrainingForward(vae)
    x = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1  # latent 4 x 3
    plan = ForwardPlan(eq_size=(2, 2), eq_rotation=1, se_factors=(2,), noise_prob=1.0, noise_strength=0.3)
    out = fwd(x, plan, torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        post = vae.encode(x)
        z = post.sample(g)  # drawn first: the posterior noise does not depend on the regularisers
        zt = torch.rot90(F.adaptive_avg_pool2d(z, (2, 2)), 1, (-2, -1))
        target = torch.rot90(F.adaptive_avg_pool2d(x, (8, 8)), 1, (-2, -1))
        picked = torch.rand(2, generator=g) < 1.0
        sigma = 0.3 * torch.rand(2, generator=g) * picked
        eps = torch.randn(zt.shape, generator=g)
        rec = vae.decode(zt + sigma.view(2, 1, 1, 1) * zt.std(correction=0) * eps)
        # 2x: the latent cropped to 4 x 2, block means; the image under it, 16 x 8.
        small = vae.decode(F.avg_pool2d(z[..., :4, :2], 2))
        small_target = F.avg_pool2d(x[..., :16, :8], 2)
    torch.testing.assert_close(out.target, target)
    torch.testing.assert_close(out.reconstruction, rec, rtol=1e-5, atol=1e-5)
    (pair,) = out.scaled
    assert pair.factor == 2 and pair.target.shape == (2, 3, 8, 4)
    torch.testing.assert_close(pair.target, small_target)
    torch.testing.assert_close(pair.reconstruction, small, rtol=1e-5, atol=1e-5)
    assert set(out.logs) == set(FORWARD_LOG_KEYS) and out.logs["eq"].item() == 1.0
    assert out.logs["latent_noise"].item() == pytest.approx(sigma.mean().item())
    # One backward reaches the encoder and the decoder through every decode.
    (out.reconstruction.sum() + pair.reconstruction.sum()).backward()
    assert vae.encoder.conv_in.weight.grad is not None and vae.decoder.conv_in.weight.grad is not None

    # The plain plan is the model's own forward, bit for bit.
    vae.zero_grad()
    plain = fwd(x, ForwardPlan(), torch.Generator().manual_seed(9))
    rec, post = vae(x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(plain.reconstruction, rec) and torch.equal(plain.target, x) and plain.scaled == ()
    assert torch.equal(plain.posterior.mean, post.mean) and plain.logs["latent_noise"].item() == 0.0

    # Low-resolution step: the image is area-resized before encoding, and is the target.
    low = fwd(x, ForwardPlan(low_res_size=(2, 2)))
    torch.testing.assert_close(low.target, F.adaptive_avg_pool2d(x, (8, 8)))
    assert low.reconstruction.shape == (2, 3, 8, 8) and low.logs["eq_low_res"].item() == 1.0


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("loss.eq_vae_prob=1.5", "eq_vae_prob is a probability"),
        ("loss.scale_equivariance_scales=[1]", "integers >= 2"),
        ("loss.eq_vae_scales=[0.0, 1.0]", "0 < low <= high <= 1"),
        ("loss.latent_noise=-1", "latent_noise must be a finite number >= 0"),
        ("loss.scale_equivariance_sampling=some", "did you mean"),
    ],
)
def test_bad_regulariser_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "tiny-f8c4.yaml", [override])
    assert fragment in str(e.value)


def test_shipped_finetune_configs_carry_the_published_settings():
    se = load_config(CONFIGS / "finetune-se-f8c4.yaml")
    assert se.loss.scale_equivariance_weight > 0 and se.loss.scale_equivariance_scales == (2, 4)
    assert se.train.max_steps == 10_000 and se.train.finetune == "full" and se.train.init_from
    eq = load_config(CONFIGS / "finetune-eqvae-f8c4.yaml")
    assert (eq.loss.eq_vae_prob, eq.loss.eq_vae_low_res_prob, eq.loss.eq_vae_scales) == (0.5, 0.25, (0.25, 1.0))
    assert eq.loss.eq_vae_rotation and eq.loss.scale_equivariance_weight == 0
    assert (eq.train.lr, eq.train.scale_lr, eq.train.batch_size, eq.train.grad_accum_steps) == (4.5e-6, True, 10, 2)
    for cfg in (se, eq):  # the architecture of the SD 1.x VAE they fine-tune
        assert cfg.model == load_config(CONFIGS / "sd-f8c4.yaml").model
        assert cfg.loss.kl_weight == 1e-6 and cfg.data.resolution == 256
        check_config(load_config(CONFIGS / "finetune-se-f8c4.yaml", ["data.path=/x"]))
    with pytest.raises(StartupError, match=r"scale_equivariance_scales \[4\] exceed the latent size"):
        check_config(load_config(CONFIGS / "tiny-f8c4.yaml", ["data.path=/x", "data.resolution=16",
                                                              "loss.scale_equivariance_weight=1"]))  # fmt: skip


# --------------------------------------------------------------------------- in the trainer


@pytest.mark.parametrize("finetune", ["decoder", "full"])
def test_regularisers_train_and_log_in_decoder_only_and_full_finetuning(tmp_path, finetune):
    cfg = tiny_config(tmp_path, [*ALL_ON, f"train.finetune={finetune}", "train.grad_accum_steps=2"])
    t = Trainer(cfg, tmp_path / "run")
    vae = t.parts.vae_raw
    start = {k: v.clone() for k, v in vae.state_dict().items()}
    t.batches = iter(t.parts.loader)
    reports = [t.one_step() for _ in range(3)]
    t.acc.end_training()
    for key in ("se", "se_rec", *FORWARD_LOG_KEYS):
        assert key in reports[0].values
    assert all(r.values["se"] > 0 for r in reports)
    assert sum(r.values["eq"] for r in reports) > 0 and sum(r.values["latent_noise"] for r in reports) > 0
    now = vae.state_dict()
    encoder_side = [k for k in now if k.startswith(("encoder.", "quant_conv."))]
    changed = [k for k in encoder_side if not torch.equal(now[k], start[k])]
    if finetune == "decoder":
        assert changed == []  # the latents a diffusion model was trained on stay the same
    else:
        assert changed
    assert not torch.equal(now["decoder.conv_out.weight"], start["decoder.conv_out.weight"])


def test_resume_with_regularisers_on_is_bit_identical(tmp_path):
    overrides = [*ALL_ON, "loss.learn_logvar=true", "train.grad_accum_steps=2", "train.max_steps=4",
                 "train.val_every=0", "loss.disc_start=1", "loss.disc_train_start=0"]  # fmt: skip
    cfg = tiny_config(tmp_path, overrides)
    train(cfg, tmp_path / "ref")
    # The same run, stopped after step 2: continue it from its checkpoint.
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-000000002", tmp_path / "run" / "checkpoints" / "step-000000002")
    result = train(cfg, tmp_path / "run", resume="latest")
    assert result.step == 4
    a, b = tmp_path / "ref" / "checkpoints" / "step-000000004", tmp_path / "run" / "checkpoints" / "step-000000004"
    for name in ("vae.safetensors", "vae_ema.safetensors", "discriminator.safetensors", "loss.safetensors"):
        assert_same_tensors(read_weights(a, name), read_weights(b, name), name)
    opt_a, opt_b = (torch.load(p / "optimizer.pt", weights_only=True) for p in (a, b))
    for i, state in opt_a["vae"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], opt_b["vae"]["state"][i]["exp_avg_sq"]), i


def test_two_processes_stay_identical_with_every_regulariser_on(tmp_path):
    data = make_images(tmp_path / "data", 8)
    config = str(write_config(tmp_path, data))
    args = ["--config", config, "--output-dir", str(tmp_path / "ddp"), *ALL_ON, "discriminator.norm=act",
            "loss.disc_train_start=0", "loss.disc_start=1", "train.max_steps=3", "train.grad_accum_steps=2",
            "train.batch_size=1", "train.checkpoint_every=3", "train.ema_decay=0.0", "train.val_every=0",
            "train.num_val_images=0", "train.log_every=1"]  # fmt: skip
    for r in _launch_two(args):
        assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "checkpoints" / "step-000000003" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["rank_fingerprints"][0] == meta["rank_fingerprints"][1]
    # The regularisers did run (means over both processes, logged by rank 0).
    _, _, events = _scalar_tags(tmp_path / "ddp" / "logs" / "train")
    for tag in ("loss/se", "loss/eq", "loss/latent_noise"):
        assert sum(e.value for e in events.Scalars(tag)) > 0, tag


# --------------------------------------------------------------------------- the evidence script


def test_evidence_script_finetunes_arms_and_compares_on_held_out_images(tmp_path, capsys):
    import importlib.util

    from test_train_common import REPO

    spec = importlib.util.spec_from_file_location("diffusability_finetune", REPO / "tools" / "diffusability_finetune.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data = make_images(tmp_path / "photos", 10, size=(64, 48))
    out = tmp_path / "out"
    tiny = ["data.resolution=32", "train.batch_size=2", "data.num_workers=0"]
    rc = tool.main(["--out", str(out), "--data", str(data), "--start-steps", "2", "--steps", "2", "--holdout", "3",
                    "--eval-size", "32", "--arms", "base,se", *tiny])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    held = {line.split(": ", 1)[1] for line in printed.splitlines() if "held-out images:" in line}
    held = set(next(iter(held)).split(", "))
    assert len(held) == 3 and not held & {p.name for p in (out / "train-images").iterdir()}
    assert len(list((out / "train-images").iterdir())) == 7
    for row in ("base ", "se ", "start ", "se - base"):
        assert any(line.startswith(row) for line in printed.splitlines()), row
    summary = json.loads((out / "compare" / "metrics.json").read_text())
    assert [v["name"] for v in summary["vaes"]] == ["base", "se", "start"] and summary["images_used"] == 3
    se_cfg = load_config(out / "se" / "config.yaml")
    assert se_cfg.loss.scale_equivariance_weight == 0.5 and se_cfg.train.init_from == str(out / "start" / "export")
    assert load_config(out / "base" / "config.yaml").loss.scale_equivariance_weight == 0
