"""LPIPS, built offline-safely: a frozen perceptual distance that gradients pass *through*.

LPIPS (Zhang et al. 2018) = a fixed ImageNet backbone (VGG16 or AlexNet) + small
linear heads calibrated on human judgements. It has two weight sources:

* the linear heads ship inside the ``lpips`` pip package (always available);
* the backbone comes from torchvision, which *downloads* it on first use to
  ``torch.hub.get_dir()/checkpoints/<file>`` (``$TORCH_HOME/hub/checkpoints``).

With no internet that download would hang or fail deep inside torchvision, so
``build_lpips(pretrained=True)`` checks for the file first and raises
``MissingWeightsError`` naming the file, where to put it and the URL it comes from.
``build_lpips(pretrained=False)`` builds a *random* backbone (seeded, so identical
across builds and processes) with the shipped linear heads: the code path is the
real one, but the numbers are not a perceptual metric. Use it for tests and demos
only (config: ``loss.lpips_pretrained=false``).

Usage (loss and metrics)::

    lp = build_lpips("vgg")        # frozen, eval; stays eval under .train()
    d = lp(x, y)                   # x, y: [N, 3, H, W] in [-1, 1]  ->  [N] float32
    d.mean().backward()            # gradients reach x / y (not the LPIPS weights)
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from torch import nn

LPIPSNet = Literal["vgg", "alex"]

# Fixed seed of the random (offline) backbone: every build, on every machine and
# rank, gets the same weights, so "random LPIPS" runs are still reproducible.
RANDOM_BACKBONE_SEED = 20180111


# Smallest shorter side (pixels) each backbone accepts, measured: AlexNet's stride-4 11x11
# conv and three 3x3/2 max-pools need 31 px; VGG16's four 2x2 pools before conv5 need 16.
MIN_SIZE = {"alex": 31, "vgg": 16}


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights that must be on disk (we never download at run time) are not."""


class RandomLPIPSWarning(UserWarning):
    """LPIPS was built with a random backbone: its values are not a perceptual metric."""


def _torchvision_weights(net: LPIPSNet):
    from torchvision.models import AlexNet_Weights, VGG16_Weights

    return {"vgg": VGG16_Weights.IMAGENET1K_V1, "alex": AlexNet_Weights.IMAGENET1K_V1}[net]


def backbone_url(net: LPIPSNet) -> str:
    """Where torchvision downloads the ImageNet backbone LPIPS uses for ``net``."""
    _check_net(net)
    return _torchvision_weights(net).url


def backbone_path(net: LPIPSNet) -> Path:
    """The exact file torchvision loads the backbone from (it downloads there if missing)."""
    # Same rule as torch.hub.load_state_dict_from_url: <hub dir>/checkpoints/<url basename>.
    filename = os.path.basename(urlparse(backbone_url(net)).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def linear_heads_path(net: LPIPSNet) -> Path:
    """The calibrated linear heads (v0.1) shipped inside the ``lpips`` package."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"


def _check_net(net: str) -> None:
    if net not in ("vgg", "alex"):
        raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")


def _missing_backbone_message(net: LPIPSNet) -> str:
    path, url = backbone_path(net), backbone_url(net)
    return (
        f"LPIPS ({net}) needs the torchvision ImageNet backbone '{path.name}', which is not on disk, "
        f"and latentae does not download weights at run time.\n"
        f"  expected at: {path}\n"
        f"  download it from: {url}\n"
        f"  e.g. on a machine with internet:  curl -L -o {path.name} {url}  then copy it to {path.parent}/\n"
        f"  (the directory follows torch.hub.get_dir(): set TORCH_HOME to move it).\n"
        f"Offline alternative for tests/demos only: set loss.lpips_pretrained=false (random backbone: "
        f"the perceptual term then trains against random features and LPIPS values mean little)."
    )


class LPIPS(nn.Module):
    """A frozen LPIPS distance: no trainable parameters, always in eval mode.

    Gradients flow through it into its *inputs* (it is not run under no_grad), so
    it works as a training loss. ``train()`` is overridden to keep it in eval
    mode even when a parent module is put in training mode: its dropout layers
    must stay off or the distance would be noisy.
    """

    def __init__(self, net: nn.Module, net_name: LPIPSNet, pretrained: bool):
        super().__init__()
        self.net = net
        self.net_name = net_name
        self.pretrained = pretrained  # False: random backbone, values are not a metric
        # The smallest image side the backbone takes (below it a pooling layer would have an
        # empty output). LPIPS was calibrated on 64 x 64 patches; smaller images still give a
        # distance, from fewer pixels of its deepest layers.
        self.min_size = MIN_SIZE[net_name]
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: [N, 3, H, W] in [-1, 1] -> per-image distance [N], float32."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two images batches of the same shape [N, 3, H, W], got {tuple(a.shape)} "
                f"and {tuple(b.shape)}"
            )
        # The backbone may run in bf16 under autocast (that is where the time goes);
        # the result is cast up so the loss reductions happen in float32.
        return self.net(a, b).float().reshape(a.shape[0])


def build_lpips(net: LPIPSNet = "vgg", pretrained: bool = True) -> LPIPS:
    """Build a frozen LPIPS distance, offline-safely (see the module docstring).

    ``pretrained=True`` needs the torchvision backbone file on disk (``backbone_path(net)``)
    and raises ``MissingWeightsError`` before anything tries to download it.
    ``pretrained=False`` builds a deterministic random backbone (warns, once per process).
    """
    _check_net(net)
    import lpips

    heads = linear_heads_path(net)
    if not heads.is_file():
        raise MissingWeightsError(
            f"LPIPS linear heads not found at {heads}: they ship inside the 'lpips' package; "
            f"reinstall it (pip install --force-reinstall lpips)"
        )
    if pretrained:
        path = backbone_path(net)
        if not path.is_file():
            raise MissingWeightsError(_missing_backbone_message(net))
        try:
            module = _construct(lpips, net, random_backbone=False)
        except Exception as e:  # a truncated / corrupt download fails deep in torch.load
            raise RuntimeError(
                f"could not load the LPIPS ({net}) backbone from {path}: {type(e).__name__}: {e}. "
                f"The file may be truncated or corrupt: delete it and download it again from {backbone_url(net)}"
            ) from e
    else:
        warnings.warn(
            f"LPIPS ({net}) built with a RANDOM backbone (lpips_pretrained=false): the perceptual term "
            f"is not meaningful; use it for tests and demos only",
            RandomLPIPSWarning,
            stacklevel=1,  # one fixed location: Python's default filter then shows it once per process
        )
        # A fixed seed without touching the caller's RNG streams.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_BACKBONE_SEED)
            module = _construct(lpips, net, random_backbone=True)
    return LPIPS(module, net, pretrained)


def _construct(lpips, net: LPIPSNet, random_backbone: bool) -> nn.Module:
    # lpips calls torchvision's deprecated ``pretrained=`` interface: silence those
    # warnings (they are about lpips' code, not the user's) and any stray prints.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=random_backbone, verbose=False)


__all__ = [
    "LPIPS",
    "MIN_SIZE",
    "MissingWeightsError",
    "RandomLPIPSWarning",
    "backbone_path",
    "backbone_url",
    "build_lpips",
    "linear_heads_path",
]
