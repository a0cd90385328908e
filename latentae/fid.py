"""rFID: Frechet distance between Inception features of originals and reconstructions.

Backbone: torchvision's Inception-v3 (``IMAGENET1K_V1``, the Google port), its 2048-d
average-pool features; images in ``[-1, 1]`` are resized (bilinear, antialiased) to
299x299, which is the input range those weights expect (torchvision's
``transform_input`` maps ImageNet-normalised inputs back to exactly this).
These are *not* the TF-Inception weights of pytorch-fid / clean-fid, so absolute values
are not comparable with published FID numbers; differences between VAEs measured here
on the same images are.

Weights are never downloaded at run time: ``build_inception(pretrained=True)`` needs the
file ``inception_v3_google-0cc3c7bd.pth`` in ``torch.hub.get_dir()/checkpoints/`` and
raises ``MissingWeightsError`` naming it and its URL otherwise. ``pretrained=False`` gives
a seeded random network (the real code path; the numbers are not a metric).

FID on few images is dominated by estimation bias (a 2048x2048 covariance from N images
has rank < N): below ~2048 images it is not meaningful, and even at 5-10k it is only
comparable between runs with the same N. ``fid_note(n)`` says this in words.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentae.perceptual import MissingWeightsError

INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
FEATURE_DIM = 2048
RANDOM_INCEPTION_SEED = 20151202
MIN_IMAGES_FOR_FID = FEATURE_DIM  # below this the covariance is rank-deficient


class RandomInceptionWarning(UserWarning):
    """rFID computed with a random Inception: the values are not a metric."""


def inception_path() -> Path:
    """Where the torchvision Inception-v3 weights must be (torchvision's own download location)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(INCEPTION_URL).path)


def _missing_message() -> str:
    path = inception_path()
    return (
        f"rFID needs the torchvision Inception-v3 weights '{path.name}', which are not on disk, and latentae "
        f"does not download weights at run time.\n"
        f"  expected at: {path}\n"
        f"  download it from: {INCEPTION_URL}\n"
        f"  e.g. on a machine with internet:  curl -L -o {path.name} {INCEPTION_URL}  then copy it to {path.parent}/\n"
        f"  (the directory follows torch.hub.get_dir(): set TORCH_HOME to move it).\n"
        f"Alternatives: skip rFID (--fid off) or, for tests only, a random network (--fid random)."
    )


class InceptionFeatures(nn.Module):
    """Images ``[N, 3, H, W]`` in [-1, 1] -> pool features ``[N, 2048]`` (float32). Frozen, eval."""

    def __init__(self, net: nn.Module, pretrained: bool):
        super().__init__()
        self.net = net
        self.pretrained = pretrained
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # dropout / batch-norm statistics must never move

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [N, 3, H, W], got {tuple(images.shape)}")
        x = images.to(next(self.net.parameters()).dtype)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.net(x).float()  # fc is Identity: the 2048-d pooled features


def build_inception(pretrained: bool = True) -> InceptionFeatures:
    """The rFID feature network (see the module docstring for the weights it needs)."""
    from torchvision.models import inception_v3

    if pretrained:
        path = inception_path()
        if not path.is_file():
            raise MissingWeightsError(_missing_message())
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # truncated download
            raise RuntimeError(
                f"could not read the Inception weights {path}: {type(e).__name__}: {e}. "
                f"Delete the file and download it again from {INCEPTION_URL}"
            ) from e
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        net.load_state_dict(sd)
    else:
        warnings.warn(
            "rFID computed with a RANDOM Inception network: the values are not a metric (tests and demos only)",
            RandomInceptionWarning,
            stacklevel=2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INCEPTION_SEED)
            # Not torchvision's init_weights (truncated normal, std 0.1: slow, and in eval
            # mode, with identity batch norm, it blows activations up to ~1e10): He init
            # keeps the random features O(1).
            net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    net.AuxLogits = None  # only used in training mode; drop its weights
    net.aux_logits = False
    net.fc = nn.Identity()
    return InceptionFeatures(net, pretrained)


class FeatureStats:
    """Streaming mean and covariance of feature vectors (float64 sums; memory D^2, not N*D).

    The raw features are also kept while there are at most ``keep`` of them (8 KiB per
    image at D=2048): small sets then get the exact low-rank Frechet distance, which
    needs no D x D eigendecomposition (see ``fid_from_stats``).
    """

    def __init__(self, dim: int = FEATURE_DIM, keep: int = MIN_IMAGES_FOR_FID):
        self.dim, self.keep = dim, keep
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)
        self._rows: list[np.ndarray] | None = []
        self._sqrt: tuple[int, np.ndarray] | None = None

    def update(self, feats: torch.Tensor | np.ndarray) -> None:
        f = feats.detach().cpu().double().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {f.shape}")
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f
        if self._rows is not None:
            self._rows.append(f.copy())
            if self.n > self.keep:
                self._rows = None

    def features(self) -> np.ndarray | None:
        """All features ``[n, D]`` while ``n <= keep``, else None."""
        return np.concatenate(self._rows) if self._rows else None

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and *sample* covariance (ddof=1, as numpy.cov and pytorch-fid)."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2  # exact symmetry for eigh

    def sqrt_cov(self) -> np.ndarray:
        """C^(1/2), cached: the originals' is shared by every VAE's rFID."""
        if self._sqrt is None or self._sqrt[0] != self.n:
            self._sqrt = (self.n, _sqrt_psd(self.mean_cov()[1]))
        return self._sqrt[1]


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, sqrt_cov1: np.ndarray | None = None
) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) is computed as tr((S C2 S)^(1/2)) with S = C1^(1/2): S C2 S is
    symmetric PSD and similar to C1 C2, so its eigenvalues (clipped at 0 against
    round-off) are those of C1 C2 and symmetric eigendecompositions suffice. This is
    stable for the rank-deficient covariances of small sets, where ``scipy.linalg.sqrtm``
    of the non-symmetric product returns complex noise. ``sqrt_cov1``: C1^(1/2) if known.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    s = _sqrt_psd(cov1) if sqrt_cov1 is None else sqrt_cov1
    eig = np.linalg.eigvalsh(s @ cov2 @ s)
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    return max(d, 0.0)  # round-off can give -1e-12 for identical sets


def frechet_distance_lowrank(x: np.ndarray, y: np.ndarray) -> float:
    """The same distance from the feature matrices ``x [n, D]``, ``y [m, D]``, exact, in O(n m D).

    With centred A = x - mean, B = y - mean: C1 = A'A/(n-1), C2 = B'B/(m-1), and the
    non-zero eigenvalues of C1 C2 are the squared singular values of
    M = A B' / sqrt((n-1)(m-1)), so tr((C1 C2)^(1/2)) = sum of singular values of M.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"expected feature matrices [n>=2, D] and [m>=2, D], got {x.shape} and {y.shape}")
    a, b = x - x.mean(0), y - y.mean(0)
    k1, k2 = len(x) - 1, len(y) - 1
    tr_sqrt = np.linalg.svd(a @ b.T / np.sqrt(k1 * k2), compute_uv=False).sum()
    d = float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() / k1 + (b * b).sum() / k2 - 2.0 * tr_sqrt)
    return max(d, 0.0)


def fid_from_stats(orig: FeatureStats, recon: FeatureStats) -> float:
    """rFID between the originals' and the reconstructions' features (same images)."""
    if orig.n != recon.n:
        raise ValueError(f"rFID compares the same images: got {orig.n} originals and {recon.n} reconstructions")
    x, y = orig.features(), recon.features()
    if x is not None and y is not None and x.shape[0] < x.shape[1]:
        return frechet_distance_lowrank(x, y)  # few images: exact without D x D eigendecompositions
    return frechet_distance(*orig.mean_cov(), *recon.mean_cov(), sqrt_cov1=orig.sqrt_cov())


def fid_note(n: int) -> str:
    """A plain-words caveat for reporting rFID over ``n`` images."""
    if n < MIN_IMAGES_FOR_FID:
        return (
            f"rFID over {n} images is NOT meaningful: the {FEATURE_DIM}-d feature covariance needs more than "
            f"{MIN_IMAGES_FOR_FID} images even to be full rank, so the value is dominated by estimation bias. "
            f"Use >= 10k images for stable numbers; compare only runs with the same images."
        )
    if n < 10_000:
        return f"rFID over {n} images is biased upwards; compare only runs over the same {n} images."
    return f"rFID over {n} images."


__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "RandomInceptionWarning",
    "build_inception",
    "fid_from_stats",
    "fid_note",
    "frechet_distance",
    "frechet_distance_lowrank",
    "inception_path",
]
