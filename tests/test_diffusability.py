"""latentae.diffusability: spectrum and equivariance figures on hand-checkable tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from latentae import diffusability as d
from latentae.health import LatentStats
from latentae.metrics import psnr
from latentae.model import DiagonalGaussian


def dct_basis(h: int, w: int, ky: int, kx: int) -> torch.Tensor:
    """The (ky, kx) DCT-II basis image, unit energy: all its power sits in that one coefficient."""
    y = torch.cos(math.pi * ky * (2 * torch.arange(h, dtype=torch.float64) + 1) / (2 * h))
    x = torch.cos(math.pi * kx * (2 * torch.arange(w, dtype=torch.float64) + 1) / (2 * w))
    b = y[:, None] * x[None, :]
    return b / b.norm()


def test_dct_is_orthonormal_and_keeps_energy():
    D = d.dct_matrix(12)
    torch.testing.assert_close(D @ D.T, torch.eye(12, dtype=torch.float64))
    t = torch.randn(2, 3, 12, 7, dtype=torch.float64)
    p = d.dct_power(t)
    # Parseval: the non-DC power is the energy around the channel mean.
    torch.testing.assert_close(p.sum((-2, -1)), (t - t.mean((-2, -1), keepdim=True)).square().sum((-2, -1)))
    assert (p[..., 0, 0] == 0).all()


@pytest.mark.parametrize("h,w,ky,kx", [(32, 32, 0, 8), (32, 32, 0, 16), (32, 32, 20, 0), (24, 40, 6, 10), (16, 16, 15, 15)])
def test_pure_dct_cosine_puts_all_energy_in_its_radial_bin(h, w, ky, kx):
    r = math.sqrt((ky / h) ** 2 + (kx / w) ** 2)  # in units of the Nyquist frequency
    want_bin = math.floor(r * d.BINS_PER_NYQUIST + 1e-9)
    # Four channels with different amplitudes and offsets (DC is removed, amplitudes are pooled).
    z = torch.stack([a * dct_basis(h, w, ky, kx) + off for a, off in [(1, 0), (3, 5), (0.5, -2), (2, 0.1)]])[None]
    freq, power = d.radial_power_spectrum(z)
    assert freq[want_bin] == pytest.approx((want_bin + 0.5) / d.BINS_PER_NYQUIST)
    idx, _ = d.radial_bins(h, w)
    count = (idx == want_bin).sum().item()
    # Normalised to mean power 1 per non-DC coefficient: the one coefficient holds h*w - 1.
    assert power[0, want_bin].item() == pytest.approx((h * w - 1) / count)
    others = torch.cat([power[0, :want_bin], power[0, want_bin + 1 :]])
    assert torch.nan_to_num(others).abs().max() < 1e-12
    share = d.high_frequency_share(z).item()
    assert share == pytest.approx(1.0 if r >= 0.5 else 0.0, abs=1e-12)  # r = 0.5 exactly counts as high


def test_white_noise_share_is_the_area_fraction_for_4_and_16_channels():
    g = torch.Generator().manual_seed(0)
    want = d.area_share_above(32, 32)
    assert d.area_share_above(512, 512) == pytest.approx(1 - math.pi / 16, abs=2e-3)  # quarter disc of radius 1/2
    for c in (4, 16):
        z = torch.randn(64, c, 32, 32, generator=g) * 7 + 3  # scale and offset must not matter
        shares = d.high_frequency_share(z)
        assert shares.mean().item() == pytest.approx(want, abs=0.01)
        _, power = d.radial_power_spectrum(z)
        flat = power.mean(0)
        flat = flat[torch.isfinite(flat)]
        assert (flat - 1).abs().max() < 0.15  # white noise is flat at 1, whatever the channel count


def test_constant_has_zero_share_and_offsets_scales_do_not_matter():
    assert d.high_frequency_share(torch.full((2, 4, 8, 8), 5.3)).tolist() == [0.0, 0.0]
    assert d.high_frequency_share(torch.zeros(1, 3, 5, 7)).item() == 0.0
    _, p = d.radial_power_spectrum(torch.full((1, 2, 8, 8), -1.7))
    assert torch.nan_to_num(p).abs().max() == 0
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    torch.testing.assert_close(d.high_frequency_share(z * 9 - 4), d.high_frequency_share(z))
    # Replicating channels (a "16-channel" copy of a 4-channel latent) changes nothing: comparable curves.
    torch.testing.assert_close(d.high_frequency_share(z.repeat(1, 4, 1, 1)), d.high_frequency_share(z))
    torch.testing.assert_close(d.radial_power_spectrum(z.repeat(1, 4, 1, 1))[1], d.radial_power_spectrum(z)[1], equal_nan=True)


def test_channels_are_pooled_by_energy():
    lo, hi = dct_basis(16, 16, 1, 0), dct_basis(16, 16, 0, 12)  # r = 1/16 and 12/16
    z = torch.stack([3 * lo, 1 * hi])[None]  # energies 9 and 1
    assert d.high_frequency_share(z).item() == pytest.approx(1 / 10)
    torch.testing.assert_close(d.high_frequency_share(z, per_channel=True), torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    assert d.high_frequency_share(z, cutoff=0.05).item() == pytest.approx(1.0)


def test_downsample_is_the_block_mean_and_crops_the_remainder():
    t = torch.arange(30, dtype=torch.float32).view(1, 1, 5, 6)
    got = d.downsample(t, 2)
    want = torch.tensor([[(0 + 1 + 6 + 7) / 4, (2 + 3 + 8 + 9) / 4, (4 + 5 + 10 + 11) / 4],
                         [(12 + 13 + 18 + 19) / 4, (14 + 15 + 20 + 21) / 4, (16 + 17 + 22 + 23) / 4]])
    torch.testing.assert_close(got[0, 0], want)  # row 4 (odd remainder) is cropped, never padded
    assert d.downsample(t, 1) is t
    # Factor 2: the same as the bilinear interpolation of the scale-equivariance paper.
    x = torch.randn(2, 3, 16, 12)
    torch.testing.assert_close(d.downsample(x, 2), F.interpolate(x, scale_factor=0.5, mode="bilinear"))
    # Factor 4: area reads every pixel; bilinear would average only the middle 2 of every 4.
    assert not torch.allclose(d.downsample(x, 4), F.interpolate(x, scale_factor=0.25, mode="bilinear"))
    torch.testing.assert_close(d.resize_area(x, (4, 3)), d.downsample(x, 4))
    with pytest.raises(ValueError, match="smaller than 8"):
        d.downsample(torch.zeros(1, 1, 4, 16), 8)
    with pytest.raises(ValueError, match="positive integer"):
        d.downsample(x, 0)


def test_pairs_stay_aligned_on_padded_and_odd_sizes():
    # A 66 x 44 image through an f4 VAE: reflect-padded to 68 x 44, latent 17 x 11.
    x = torch.randn(1, 3, 66, 44)
    z = torch.randn(1, 4, 17, 11)
    zc, xc = d.covered(z, x, 4)
    assert zc.shape[-2:] == (16, 11) and xc.shape[-2:] == (64, 44)
    zs, xs = d.scale_pair(z, x, 2, 4)
    assert zs.shape[-2:] == (8, 5) and xs.shape[-2:] == (32, 20)  # decode(zs) is 4x zs: the target's size
    torch.testing.assert_close(xs, d.downsample(x[..., :64, :40], 2))
    torch.testing.assert_close(zs, d.downsample(z[..., :16, :10], 2))
    zp, xp = d.resize_pair(z[..., :16, :10], x[..., :64, :40], (8, 5), 4)
    torch.testing.assert_close(zp, zs)
    torch.testing.assert_close(xp, xs)
    zp, xp = d.resize_pair(z, x, (11, 7), 4)  # a non-integer scale (16 x 11 -> 11 x 7): sizes stay aligned
    assert zp.shape[-2:] == (11, 7) and xp.shape[-2:] == (44, 28)
    zr, xr = d.rotation_pair(z, x, 1, 4)
    assert zr.shape[-2:] == (11, 16) and xr.shape[-2:] == (44, 64)
    torch.testing.assert_close(xr, torch.rot90(x[..., :64, :44], 1, (-2, -1)))
    with pytest.raises(ValueError, match="unknown transform"):
        d.transform_pair(z, x, "flip", 4)


def test_identity_codec_is_perfectly_equivariant():
    x = torch.rand(2, 3, 16, 20) * 2 - 1
    for t in ("down2", "down4", "rot90", "rot180", "rot270"):
        assert torch.isinf(d.equivariance_psnr(lambda z: z, x.clone(), x, t, vae_factor=1)).all()


def _block_codec(f: int):
    encode = lambda x: d.downsample(x, f)  # noqa: E731
    decode = lambda z: F.interpolate(z, scale_factor=f, mode="nearest")  # noqa: E731
    return encode, decode


def test_block_codec_scale_equivariance_exact_on_blocky_images_and_hand_checked_otherwise():
    encode, decode = _block_codec(4)
    g = torch.Generator().manual_seed(0)
    # 64 px, constant on 16 px blocks; values k/8 so every block mean is exact in float32.
    levels = torch.randint(-8, 9, (1, 3, 4, 4), generator=g).float() / 8
    blocky = F.interpolate(levels, scale_factor=16, mode="nearest")
    for t in ("down2", "down4"):
        assert torch.isinf(d.equivariance_psnr(decode, encode(blocky), blocky, t, vae_factor=4)).all()
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    got = d.equivariance_psnr(decode, encode(x), x, "down2", vae_factor=4)
    # By hand: decode(down2(z)) = nearest-4x of the 8x8 block means; the target is the 2x2 block means.
    target = F.avg_pool2d(x, 2)
    rec = F.avg_pool2d(x, 8).repeat_interleave(4, -2).repeat_interleave(4, -1)
    want = 10 * torch.log10(4 / (rec - target).square().mean())
    assert got.item() == pytest.approx(want.item(), abs=1e-4) and math.isfinite(got.item())


def test_rotation_equivariance_of_toy_decoders():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 6, 6, generator=g)
    w = torch.randn(3, 4, 1, 1, generator=g) * 0.3
    pointwise = lambda z: F.interpolate(torch.tanh(F.conv2d(z, w)), scale_factor=2, mode="nearest")  # noqa: E731
    x = pointwise(z)  # images this decoder reproduces exactly
    for t in ("rot90", "rot180", "rot270"):
        assert torch.isinf(d.equivariance_psnr(pointwise, z, x, t, vae_factor=2)).all()
    # A decoder that looks one pixel to the right is not rotation-equivariant.
    k = torch.zeros(3, 4, 1, 3)
    k[:, :, 0, 2] = w[:, :, 0, 0]
    shifted = lambda z: F.interpolate(torch.tanh(F.conv2d(z, k, padding=(0, 1))), scale_factor=2, mode="nearest")  # noqa: E731
    x = shifted(z)
    got = d.equivariance_psnr(shifted, z, x, "rot90", vae_factor=2)
    want = psnr(shifted(torch.rot90(z, 1, (-2, -1))).clamp(-1, 1), torch.rot90(x, 1, (-2, -1)))
    assert torch.isfinite(got).all() and got.item() == pytest.approx(want.item(), abs=1e-5)


def test_latent_stats_spectrum_summary_with_images():
    # Latent channel 0 low-frequency, channel 1 high; images: a smooth ramp (at latent size: low frequency).
    h = w = 8
    z = torch.stack([2 * dct_basis(h, w, 1, 0), dct_basis(h, w, 0, 6)])[None].float()
    post = DiagonalGaussian(torch.cat([z, torch.full_like(z, -20.0)], 1))
    x = torch.linspace(-1, 1, 4 * w).view(1, 1, 1, -1).expand(1, 3, 4 * h, 4 * w)
    s = LatentStats(2, downsample_factor=4)
    out = s.update(post, z, images=x)
    assert out["hf_share"].item() == pytest.approx(1 / 5, abs=1e-6)  # energies 4 (low) and 1 (high)
    assert out["hf_share_posterior_mean"].item() == pytest.approx(1 / 5, abs=1e-6)
    ramp_share = d.high_frequency_share(d.downsample(x, 4)).item()
    assert out["hf_share_image"].item() == pytest.approx(ramp_share) and ramp_share < 0.05
    s.update(post, torch.zeros_like(z), images=x)  # a constant latent: share 0
    r = s.result()["spectrum"]
    assert r["images"] == 2 and r["hf_share"] == pytest.approx(0.1, abs=1e-6)
    assert r["hf_share_posterior_mean"] == pytest.approx(0.2, abs=1e-6)  # the posterior mean stayed the cosines
    assert r["hf_share_per_channel"] == pytest.approx([0.0, 0.5], abs=1e-6)
    assert r["hf_share_image"] == pytest.approx(ramp_share)
    assert len(r["freq"]) == len(r["latent"]) == len(r["image"]) and r["cutoff"] == 0.5
    assert r["latent"][0] is None  # the DC bin has no coefficient left
