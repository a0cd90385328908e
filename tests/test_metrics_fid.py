"""rFID: the Frechet distance against a direct formula, streaming statistics, the Inception loading path."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from latentae.fid import (
    FeatureStats,
    RandomInceptionWarning,
    build_inception,
    fid_from_stats,
    fid_note,
    frechet_distance,
    frechet_distance_lowrank,
    inception_path,
)
from latentae.perceptual import MissingWeightsError


def _direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root."""
    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(covmean)))


def test_frechet_distance_matches_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    y = 0.5 + rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8))
    got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    want = _direct_fid(x, y)
    assert want > 1.0
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_distance_closed_forms():
    # 1-D Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == pytest.approx(
        9.0 + 1.0
    )
    # Identical statistics: 0 (not -1e-12).
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 6))
    mu, cov = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, cov, mu[:3], cov[:3, :3])


def test_frechet_distance_rank_deficient_covariances_stay_real():
    # Fewer samples than dimensions: the case of rFID on a handful of images.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(5, 32)) + 0.1
    got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(got) and got > 0
    assert got == pytest.approx(_direct_fid(x, y), rel=1e-5)
    # The exact low-rank path (what rFID on < 2048 images uses) gives the same value.
    assert frechet_distance_lowrank(x, y) == pytest.approx(got, rel=1e-6)
    sx, sy = FeatureStats(32), FeatureStats(32)
    sx.update(x)
    sy.update(y)
    assert fid_from_stats(sx, sy) == pytest.approx(got, rel=1e-6)
    # Past `keep` the raw features are dropped and the covariance path is used: same value.
    big_x, big_y = FeatureStats(32, keep=3), FeatureStats(32, keep=3)
    big_x.update(x)
    big_y.update(y)
    assert big_x.features() is None and fid_from_stats(big_x, big_y) == pytest.approx(got, rel=1e-6)


def test_feature_stats_streaming_equals_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(37, 5)) * 3 + 10  # a large mean tests the one-pass covariance's cancellation
    s = FeatureStats(dim=5)
    for chunk in (x[:10], x[10:11], x[11:]):
        s.update(torch.from_numpy(chunk))
    mu, cov = s.mean_cov()
    assert s.n == 37
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    other = FeatureStats(dim=5)
    other.update(x)
    assert fid_from_stats(s, other) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match=r"expected features \[N, 5\]"):
        s.update(np.zeros((2, 4)))
    short = FeatureStats(dim=5)
    short.update(x[:3])
    with pytest.raises(ValueError, match="same images"):
        fid_from_stats(s, short)


def test_fid_note_warns_on_small_sets():
    assert "NOT meaningful" in fid_note(50)
    assert "biased" in fid_note(5000)


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_missing_inception_weights_name_the_file(hub_dir):
    with pytest.raises(MissingWeightsError) as e:
        build_inception(pretrained=True)
    msg = str(e.value)
    assert "inception_v3_google-0cc3c7bd.pth" in msg and str(hub_dir / "checkpoints") in msg
    assert "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth" in msg


def test_inception_real_loading_path_and_random_option(hub_dir):
    with pytest.warns(RandomInceptionWarning):
        rand = build_inception(pretrained=False)
    assert not rand.pretrained
    x = torch.rand(1, 3, 64, 48) * 2 - 1
    f = rand(x)
    assert f.shape == (1, 2048) and torch.isfinite(f).all()
    assert 1e-3 < f.abs().mean() < 10  # O(1): usable statistics, not 1e10 blow-ups
    # Deterministic across builds (same seeded weights).
    with pytest.warns(RandomInceptionWarning):
        again = build_inception(pretrained=False).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in rand.state_dict().items())
    # The pretrained path reads torchvision's file format (with the AuxLogits keys) from the hub dir.
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    ref = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = inception_path()
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    net = build_inception(pretrained=True)
    assert net.pretrained
    ref.eval().fc = torch.nn.Identity()
    x299 = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", antialias=True)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x299), atol=1e-5)
    # A truncated download is a clear error, not a pickle traceback.
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="download it again"):
        build_inception(pretrained=True)
