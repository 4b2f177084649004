"""LPIPS (Zhang et al. 2018), version 0.1 with AlexNet, as the ``lpips`` package computes it:

    x' = (x - shift) / scale                     x in [-1, 1]; shift, scale below
    f_l = relu_l(AlexNet(x'))                    l = 1..5 (after conv1..conv5)
    d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )    unit-normalised over channels

Built from torchvision's AlexNet ``features`` (its weight file ``alexnet-owt-7be5be79.pth``) and LPIPS's linear
weights (``alex.pth`` of v0.1: keys ``lin{l}.model.1.weight``).  We do not use the ``lpips`` package: it fetches the
AlexNet weights from the internet when it is constructed, and our version is these few lines.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import alexnet

from faces.weights import FaceModelError, read_state_dict

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
STAGES = (2, 5, 8, 10, 12)  # ends of AlexNet.features slices: relu1 .. relu5
CHANNELS = (64, 192, 384, 256, 256)


class LPIPS(nn.Module):
    """``lpips(x, y) -> (N,)`` distances of images in [-1, 1], (N, 3, H, W)."""

    def __init__(self):
        super().__init__()
        self.features = alexnet(weights=None).features
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, out, start = (x - self.shift) / self.scale, [], 0
        for end in STAGES:
            x = self.features[start:end](x)
            out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # unit length per position
            start = end
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for lin, fx, fy in zip(self.lins, self.stages(x), self.stages(y)):
            total = total + lin((fx - fy) ** 2).mean((2, 3))  # (N, 1)
        return total[:, 0]


def load_lpips(alexnet_path: str | Path, linear_path: str | Path) -> LPIPS:
    model = LPIPS()
    backbone = read_state_dict(alexnet_path, "lpips_alexnet")
    features = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
    linear = read_state_dict(linear_path, "lpips_linear")
    lins = {f"{i}.weight": linear.get(f"lin{i}.model.1.weight") for i in range(len(CHANNELS))}
    try:
        model.features.load_state_dict(features)
    except RuntimeError:
        raise FaceModelError(f"{alexnet_path} is not torchvision's AlexNet (alexnet-owt-7be5be79.pth); check "
                             "models.lpips_alexnet.file in configs/eval.yaml") from None
    if any(v is None for v in lins.values()):
        raise FaceModelError(f"{linear_path} is not LPIPS v0.1's alex.pth (keys lin0.model.1.weight ...); check "
                             "models.lpips_linear.file in configs/eval.yaml")
    try:
        model.lins.load_state_dict(lins)
    except RuntimeError:
        raise FaceModelError(f"{linear_path} does not hold AlexNet's LPIPS layers (use v0.1/alex.pth); check "
                             "models.lpips_linear.file in configs/eval.yaml") from None
    return model.eval()
