"""Convolution layers shared by the UNet and the VAE.

``Conv2d`` is ``nn.Conv2d`` whose CPU inference runs on a weight prepacked once for oneDNN; ``Upsample`` is LDM's
nearest-neighbour 2x upsampling followed by a 3x3 convolution (checkpoint key ``...conv``).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# nn.Conv2d hands oneDNN a plain (O, I, kh, kw) weight on every call; oneDNN then reorders it, or settles for a slower
# kernel.  Reordering once and reusing the result makes the UNet's bfloat16 convolutions 1.5-4x faster and its large
# float32 ones up to 1.9x (bench/README.md), for one more copy of the convolution weights in memory.  The copies live
# here, beside the modules, so that state_dict, deepcopy and pickling never see them; an entry goes with its module.
_packed_weights: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_HAS_PACKED_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_packed_conv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's inference-only convolution applies: CPU, float32 or bfloat16, no gradient to record."""
    if not (_HAS_PACKED_CONV and x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and x.dtype == weight.dtype):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_bf16())


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters) whose CPU inference runs on a weight reordered once and cached.

    ``prepack = False`` on an instance (see ``set_prepack``) runs the plain convolution and keeps no second copy.
    A bfloat16 1x1 convolution runs on the CPU as a linear map of each pixel, never prepacked (see ``pointwise``).
    """

    prepack = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.is_pointwise():
            return pointwise(x, self.weight, self.bias)
        if not (self.prepack and uses_packed_conv(x, self.weight)):
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(  # output channels-last
            x, self.packed_weight(), self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )

    def is_pointwise(self) -> bool:
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid")
                and self.dilation == (1, 1) and self.groups == 1)

    def packed_weight(self) -> torch.Tensor:
        """The weight in oneDNN's layout; made again when the weight is another tensor, dtype or edited in place."""
        w = self.weight
        key = (w.data_ptr(), w.dtype, -1 if w.is_inference() else w._version)
        cached = _packed_weights.get(self)
        if cached is None or cached[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.detach().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups
            )
            cached = _packed_weights[self] = (key, packed)
        return cached[1]

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: drop the cache, it belongs to the old weight
        _packed_weights.pop(self, None)
        return super()._apply(fn, recurse)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as ``F.linear`` on the (B, H, W, C) view of a channels-last x; the output is channels-last.

    oneDNN's prepacked bfloat16 1x1 kernels are pathologically slow: the ResBlock skip 2560 -> 1280 at 8x8 took
    314 ms against 6 ms as a matmul (bench/README.md).  float32 keeps oneDNN's 1x1 path: the gain there is a few
    percent of a forward, and the method tests' float32 references (chaotic random tiny UNets) were made with it.
    """
    out = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)  # (B, H, W, C_out)
    return out.permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last


def set_prepack(model: nn.Module, enabled: bool) -> None:
    """Turn the prepacked weights of every ``Conv2d`` in ``model`` on or off (off: less memory, slower on CPU)."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.prepack = enabled
            if not enabled:
                _packed_weights.pop(module, None)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
