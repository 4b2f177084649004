"""Layers shared by the UNet and the VAE, and the two CPU speed rules that go with them.

* **They compute in their input's dtype.**  ``Conv2d``, ``Linear``, ``GroupNorm`` and ``LayerNorm`` are their ``nn``
  namesakes (same parameters, same checkpoint keys) that cast their weights to the input's dtype, a no-op when the two
  agree.  A model stored in bfloat16 then computes in float32 when its forward casts the input to float32
  (``UNet.compute_dtype``, ``VAE.compute_dtype``): on CPUs without AMX, oneDNN's bfloat16 kernels are 1.5-2x slower
  than float32 ones, so ``model.cpu_compute`` (``models/cpu_tuning.py``) may choose float32 there (bench/README.md).
* **Prepacked weights on the CPU.**  ``nn.Conv2d`` and ``nn.Linear`` hand oneDNN/MKL a plain weight on every call;
  oneDNN then reorders it, or settles for a slower kernel, and a float32 ``addmm`` first copies the bias over the whole
  output.  Reordering once (in the compute dtype) and reusing the result makes the UNet's bfloat16 convolutions
  1.5-4x faster on an AMX Xeon, its large float32 ones up to 1.9x and its float32 linear maps about 10% (the bias is
  fused), for one more copy of those weights in memory (``set_prepack``; ``model.prepack`` chooses).

``Upsample`` is LDM's nearest-neighbour 2x upsampling followed by a 3x3 convolution (checkpoint key ``...conv``).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The prepacked copies live here, beside the modules, so that state_dict, deepcopy and pickling never see them; an
# entry goes with its module.  Each is (key, packed) with key = (weight storage, compute dtype, weight version).
_packed_weights: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_HAS_PACKED_CONV = hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_HAS_PACKED_LINEAR = all(hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight"))
_HAS_FUSED_GEGLU = _HAS_PACKED_LINEAR and hasattr(torch.ops.mkldnn._linear_pointwise, "binary")


def like(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A parameter in the dtype ``x`` computes in (itself when it already is)."""
    return None if p is None else p.to(x.dtype)


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_packed(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN's inference-only kernels apply: CPU, computing in float32 or bfloat16, no gradient to record."""
    if not (x.device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and cpu_has_bf16())


def packed(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype, reorder: Callable[[torch.Tensor], object],
           kind: str) -> object:
    """``reorder(weight in dtype)``, made once per module; again when the weight is another tensor, is edited in place,
    is wanted in another dtype or in another ``kind`` of packing."""
    key = (weight.data_ptr(), dtype, -1 if weight.is_inference() else weight._version, kind)
    cached = _packed_weights.get(module)
    if cached is None or cached[0] != key:
        cached = _packed_weights[module] = (key, reorder(weight.detach().to(dtype)))
    return cached[1]


class Prepacked:
    """The switch of the prepacked layers: ``prepack = False`` on an instance (``set_prepack``) runs the plain kernel
    and keeps no second copy.  ``.to()``, ``.float()``, ... drop the copy: it belongs to the old weight."""

    prepack = True

    def _apply(self, fn, recurse=True):
        _packed_weights.pop(self, None)
        return super()._apply(fn, recurse)


class Conv2d(Prepacked, nn.Conv2d):
    """``nn.Conv2d`` (same parameters) computing in its input's dtype; on the CPU on a weight reordered once.

    A 1x1 convolution runs on the CPU as a linear map of each pixel (see ``pointwise``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.is_pointwise() and (self.prepack or x.dtype == torch.bfloat16):
            return pointwise(self, x)
        if not (self.prepack and _HAS_PACKED_CONV and uses_packed(x, self.weight)):
            return self._conv_forward(x, like(self.weight, x), like(self.bias, x))
        return torch.ops.mkldnn._convolution_pointwise(  # output channels-last
            x, self.packed_weight(x.dtype), like(self.bias, x), self.padding, self.stride, self.dilation, self.groups,
            "none", [], "",
        )

    def is_pointwise(self) -> bool:
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding in ((0, 0), "valid")
                and self.dilation == (1, 1) and self.groups == 1)

    def packed_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in oneDNN's layout, in ``dtype`` (default: the weight's own)."""
        def reorder(w: torch.Tensor) -> torch.Tensor:
            return torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), self.padding, self.stride, self.dilation,
                                                             self.groups)

        return packed(self, self.weight, dtype or self.weight.dtype, reorder, "conv")


class Linear(Prepacked, nn.Linear):
    """``nn.Linear`` (same parameters) computing in its input's dtype; on the CPU on a weight reordered once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self, x)


def linear(module: Conv2d | Linear, x: torch.Tensor, *, prepack: bool = True) -> torch.Tensor:
    """``x @ W^T + b`` with the weight and bias of ``module`` (a ``Linear``, or a 1x1 ``Conv2d`` applied to tokens),
    computing in x's dtype.  On the CPU the weight is reordered once and the bias is added inside the product (a
    float32 ``addmm`` first writes the bias over the whole output); ``prepack=False``: the plain product."""
    weight, bias = module.weight, module.bias
    if not (prepack and module.prepack and _HAS_PACKED_LINEAR and uses_packed(x, weight)):
        return F.linear(x, like(weight, x).flatten(1), like(bias, x))
    w = packed(module, weight, x.dtype, lambda w: torch.ops.mkldnn._reorder_linear_weight(w.flatten(1)), "linear")
    return torch.ops.mkldnn._linear_pointwise(x, w, like(bias, x), "none", [], "")


def geglu(proj: Linear, x: torch.Tensor) -> torch.Tensor:
    """GEGLU: ``a * GELU(g)`` where ``(a, g)`` are the two halves of ``proj(x)``'s features.  On the CPU the halves are
    two prepacked products with the GELU and the product fused into them, which saves the separate passes of
    ``chunk``, ``gelu`` and ``mul`` over the UNet's largest activation (96 -> 73 ms per call at 64x64 in float32,
    bench/README.md)."""
    if not (proj.prepack and _HAS_FUSED_GEGLU and uses_packed(x, proj.weight)):
        a, g = proj(x).chunk(2, dim=-1)
        return a * F.gelu(g)
    (w_a, w_g), (b_a, b_g) = packed(proj, proj.weight, x.dtype, _reorder_halves, "geglu"), like(proj.bias, x).chunk(2)
    gate = torch.ops.mkldnn._linear_pointwise(x, w_g, b_g, "gelu", [], "none")  # GELU(x W_g + b_g), erf form
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w_a, b_a, "mul")  # (x W_a + b_a) * gate


def _reorder_halves(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.ops.mkldnn._reorder_linear_weight(half.contiguous()) for half in w.chunk(2))


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computing in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, like(self.weight, x), like(self.bias, x), self.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computing in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, like(self.weight, x), like(self.bias, x), self.eps)


def pointwise(conv: Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as a linear map of each pixel: ``linear`` (prepacked) in float32, a plain ``F.linear`` in
    bfloat16, on the (B, H, W, C) view of a channels-last x; the output is channels-last.

    oneDNN's prepacked 1x1 convolution kernels are slow for some shapes on the CPUs measured: in bfloat16
    pathologically (the ResBlock skip 2560 -> 1280 at 8x8 took 314 ms against 6 ms as a matmul), in float32 by up to
    9x (1920 -> 1280 at 16x16: 84 ms against 9.6 ms as a prepacked linear map; bench/README.md).
    """
    h = x.permute(0, 2, 3, 1)  # (B, H, W, C_in)
    return linear(conv, h, prepack=x.dtype != torch.bfloat16).permute(0, 3, 1, 2)  # (B, C_out, H, W), channels-last


def set_prepack(model: nn.Module, enabled: bool) -> None:
    """Turn the prepacked weights of every ``Conv2d`` and ``Linear`` in ``model`` on or off (off: less memory, slower
    where ``model.prepack: auto`` measured them faster)."""
    for module in model.modules():
        if isinstance(module, Prepacked):
            module.prepack = enabled
            if not enabled:
                _packed_weights.pop(module, None)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
