"""FID (Heusel et al. 2017): the Frechet distance between Gaussians fitted to Inception-v3 pool3 features.

``frechet_distance`` follows pytorch-fid's ``calculate_frechet_distance``:
    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
with ``scipy.linalg.sqrtm``; only when the root is not finite is eps = 1e-6 added to both diagonals and the root taken
again (pytorch-fid's test: ``np.isfinite(covmean).all()``).  A singular product whose root is finite, the usual case
with fewer images than 2048 dimensions, gets no offset: SciPy then warns (LinAlgWarning, silenced here) and returns
an error estimate with ``disp=False`` (still in SciPy 1.17, deprecated), but pytorch-fid never tests either, and an
offset there would shift FID by a few tenths.  A complex root must have a negligible imaginary diagonal
(|imag| < 1e-3), and its real part is used.

The network is the TensorFlow FID Inception-v3 as pytorch-fid ports it (``pt_inception-2015-12-05-6726825d.pth``).
We build it from torchvision's ``Inception3`` modules, so the state dict keys are the real ones, with pytorch-fid's
four patches (TF's pooling: average pools that exclude the padding in Mixed_5*, 6b-e and 7b, a max pool in 7c's
pool branch).  Input as pytorch-fid: RGB in [0, 1], bilinear resize to 299 (no antialias), scaled to [-1, 1].
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from scipy import linalg
from torchvision.models import inception as tv

from faces.weights import FaceModelError, loading, read_state_dict


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two Gaussians have different dimensions")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # as pytorch-fid: offset both diagonals only when the root is not finite
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """scipy's matrix square root; its LinAlgWarning for a singular matrix is silenced (expected with few images:
    the root is checked for finiteness by the caller, as pytorch-fid does)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mean (D,), covariance (D, D)), as pytorch-fid (rowvar=False, N - 1)."""
    features = np.asarray(features, np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def fid_between(a: np.ndarray, b: np.ndarray) -> float | None:
    """FID between two feature sets; None with fewer than 2 images on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    return frechet_distance(*gaussian(a), *gaussian(b))


# ---------------------------------------------------------------------------------------------------------------------
# The FID Inception-v3: torchvision's blocks with pytorch-fid's pooling patches


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)  # TF's average pool


class FIDInceptionA(tv.InceptionA):
    def _forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))]


class FIDInceptionC(tv.InceptionC):
    def _forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))]


class FIDInceptionE(tv.InceptionE):
    """Mixed_7b (``pool="avg"``, TF's average pool) and Mixed_7c (``pool="max"``: TF's graph has a max pool there)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__(in_channels)
        self.pool = pool

    def _forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]


# Inception3's modules from the input to the pooled features, in order (shared with ArtFID's network, metrics/artfid.py)
LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
          "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
          "Mixed_7b", "Mixed_7c", "avgpool")


class FIDInception(tv.Inception3):
    """``model(images (N, 3, H, W) in [0, 1]) -> (N, 2048)`` pool3 features.  Keys as in the FID weights file."""

    def __init__(self, num_classes: int = 1008):
        super().__init__(num_classes=num_classes, aux_logits=False, transform_input=False, init_weights=False)
        self.Mixed_5b, self.Mixed_5c = FIDInceptionA(192, 32), FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c, self.Mixed_6d = FIDInceptionC(768, channels_7x7=160), FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b, self.Mixed_7c = FIDInceptionE(1280, "avg"), FIDInceptionE(2048, "max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        for name in LAYERS:
            x = getattr(self, name)(x)
        return x.flatten(1)  # (N, 2048)


def load_inception(path: str | Path, name: str = "fid_inception") -> FIDInception:
    """The FID Inception from pytorch-fid's state dict file (ArtFID's network is another: ``metrics.artfid``)."""
    state = read_state_dict(path, name)
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1008
    return load_every_key(FIDInception(num_classes=classes), state, path, name, "an FID Inception-v3",
                          "pt_inception-2015-12-05-6726825d.pth")


def load_every_key(model: nn.Module, state: dict, path: str | Path, name: str, network: str, file: str) -> nn.Module:
    """``model`` in eval mode with ``state`` loaded, every key of both: another network's file is one line naming the
    first key that differs and the file to use (``models.<name>.file`` in configs/eval.yaml)."""
    with loading(path, name):  # a tensor of another shape under a known key
        missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise FaceModelError(f"{path} is not {network} state dict ({'missing' if missing else 'unexpected'} key {key});"
                             f" use {file} (models.{name}.file in configs/eval.yaml)")
    return model.eval()
