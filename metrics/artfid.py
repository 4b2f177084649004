"""ArtFID's Inception-v3 (Wright and Ommer 2022, the ``art_fid`` package's ``art_inception.pth``), as StyleID's
evaluation runs it.

Unlike FID's network (``metrics.fid``) this one is plain torchvision ``Inception3``: its average pools count the
padding, Mixed_7c pools by average, and nothing is resized or rescaled inside.  ArtFID fine-tuned it on art with two
classification heads, so its state dict holds ``fc1``/``fc2`` and ``AuxLogits1``/``AuxLogits2`` where torchvision's
has ``fc`` and ``AuxLogits``; both heads are built here (their class counts read from the file) so that the file loads
strictly, and are never run: the features are the 2048 pooled activations before them.

Input as StyleID's evaluation: the shorter side resized to 512 (torchvision ``Resize(512)``, bilinear with
antialiasing, the longer side ``int(512 * long / short)``), then ``ToTensor()``: RGB in [0, 1], no normalisation.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.models import inception as tv

from faces.weights import read_state_dict

from .fid import LAYERS, load_every_key

SHORTER_SIDE = 512  # StyleID's Resize(512) before ArtFID's ToTensor()
HEADS = ("1", "2")  # fc1 / AuxLogits1 and fc2 / AuxLogits2


class ArtInception(tv.Inception3):
    """``model(images (N, 3, H, W) in [0, 1]) -> (N, 2048)`` pooled features.  Keys as in ``art_inception.pth``."""

    def __init__(self, num_classes: tuple[int, int] = (1000, 1000)):
        super().__init__(aux_logits=False, transform_input=False, init_weights=False)
        del self.fc  # ArtFID's two heads instead (never run: the features come before them)
        for suffix, classes in zip(HEADS, num_classes):
            setattr(self, f"AuxLogits{suffix}", tv.InceptionAux(768, classes))
            setattr(self, f"fc{suffix}", nn.Linear(2048, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in LAYERS:  # (N, 3, H, W) -> (N, 2048, 1, 1); the dropout after the pool is off in eval mode
            x = getattr(self, name)(x)
        return x.flatten(1)  # (N, 2048)


def load_art_inception(path: str | Path, name: str = "artfid_inception") -> ArtInception:
    """ArtFID's Inception from ``art_inception.pth``, loaded strictly (another network's file is one line)."""
    state = read_state_dict(path, name)
    classes = tuple(int(state[f"fc{s}.weight"].shape[0]) if f"fc{s}.weight" in state else 1000 for s in HEADS)
    return load_every_key(ArtInception(num_classes=classes), state, path, name, "ArtFID's Inception-v3",
                          "art_inception.pth of the art_fid package")


def preprocess(img: Image.Image) -> torch.Tensor:
    """RGB image -> (3, H, W) in [0, 1], the shorter side ``SHORTER_SIDE`` (StyleID: ``Resize(512)``, ``ToTensor()``)."""
    from torchvision import transforms as T

    return T.ToTensor()(T.Resize(SHORTER_SIDE)(img))
