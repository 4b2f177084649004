"""The SD1.5 denoising UNet, written after LDM's ``openaimodel.UNetModel``.

Attribute names mirror the checkpoint keys under ``model.diffusion_model.``: ``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``; ResBlocks have ``in_layers``/``emb_layers``/``out_layers``/
``skip_connection``; SpatialTransformers have ``norm``, 1x1-conv ``proj_in``/``proj_out`` and ``transformer_blocks``
whose BasicTransformerBlock holds ``attn1`` (self-attention), ``attn2`` (cross-attention to the text) and a GEGLU
``ff``.  Loading is therefore a strict ``load_state_dict`` after stripping the prefix.

Every ``attn1`` is the swap point of the method: its ``recipe(layer, x)`` computes the attention output from the
layer's normalised input x (``layer.qkv(x)`` gives the projections), and ``set_recipe(unet, path, recipe)`` installs
one by the layer's path, e.g. ``output_blocks.6.1.transformer_blocks.0.attn1``.  The recipes are in ``attention/``.

Speed on CPU (same parameters, same state dict): activations are kept channels-last; the layers of ``layers.py`` run
oneDNN on weights reordered once into its blocked layout (cached; for bfloat16 this is what lets oneDNN use its AMX
kernels) and compute in ``compute_dtype``; and the SpatialTransformers' 1x1 ``proj_in``/``proj_out`` run as linear
maps on the (B, H*W, C) tokens, which channels-last makes a free view.  ``bench/benchmark.py --unet`` measures it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn

from attention.core import multihead_attention
from attention.plain import plain

from .config import SD15Config
from .layers import Conv2d, GroupNorm, LayerNorm, Linear, Upsample, geglu, linear

# A recipe maps the layer and its normalised input x (B, N, C) to the attention output (B, N, C), which the layer
# then sends through its own output projection ``to_out`` (see ``attention/``).
Recipe = Callable[["Attention", torch.Tensor], torch.Tensor]


def group_norm(channels: int, eps: float = 1e-5) -> GroupNorm:
    return GroupNorm(32, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of integer timesteps t (B,) -> (B, dim), as LDM computes it."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0), Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if channels == out_channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention with LDM's ``to_q``/``to_k``/``to_v``/``to_out`` names.

    Self-attention when ``context`` is None: then ``recipe(layer, x)`` (default: plain softmax attention) computes the
    output before ``to_out``.  ``path`` is the layer's address in the UNet, set by the UNet for its ``attn1`` layers.
    """

    def __init__(self, query_dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = Linear(query_dim, query_dim, bias=False)
        self.to_k = Linear(context_dim, query_dim, bias=False)
        self.to_v = Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(Linear(query_dim, query_dim), nn.Dropout(0.0))
        self.recipe: Recipe = plain
        self.path = ""

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention projections W_Q x, W_K x, W_V x (paper eq. 3): three (B, N, C)."""
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            return self.to_out(self.recipe(self, x))
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N, C), (B, M, C), (B, M, C)
        return self.to_out(multihead_attention(q, k, v, self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(self.proj, x)  # x W_a + b_a times GELU(x W_g + b_g): proj's two halves


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # self-attention: the layer MagicStyle works on (paper eq. 3, Alg. 1 l. 6)
        x = x + self.attn2(self.norm2(x), context)  # cross-attention to the prompt
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = Conv2d(channels, channels, 1)  # 1x1 convolutions, run as linear maps on the tokens
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)
        )
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, H*W, C); a view when x is channels-last
        h = linear(self.proj_in, h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = linear(self.proj_out, h)
        return x + h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class TimestepEmbedSequential(nn.Sequential):
    """A block of the UNet: passes the time embedding to ResBlocks and the text context to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """eps_theta(x_t, t, c): (B, 4, h, w), (B,) timesteps, (B, 77, context_dim) -> predicted noise (see ``forward``)."""

    def __init__(self, cfg: SD15Config):
        super().__init__()
        mc, heads, depth, ctx = cfg.model_channels, cfg.num_heads, cfg.transformer_depth, cfg.context_dim
        emb_dim = mc * 4
        self.model_channels = mc
        # None: compute in the weights' dtype.  float32 for weights stored in bfloat16: every layer casts its weights
        # (models/layers.py); where bfloat16 kernels are slow (CPUs without AMX), model.cpu_compute chooses this.
        self.compute_dtype: torch.dtype | None = None
        self.time_embed = nn.Sequential(Linear(mc, emb_dim), nn.SiLU(), Linear(emb_dim, emb_dim))

        def transformer(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, heads, depth, ctx)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_channels, ch = [mc], mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_dim, ch), transformer(ch), ResBlock(ch, emb_dim, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(transformer(ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), Conv2d(mc, cfg.out_channels, 3, padding=1))

        for path, module in self.named_modules():
            if path.endswith(".attn1"):
                module.path = path

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
        """x (B, 4, h, w), t (B,) or one timestep for all rows, context (B, 77, D) -> eps (B, 4, h, w).

        The inputs may be on any device and of any dtype (``t`` integer or float): they are moved to the UNet's device
        and to the dtype it computes in (``compute_dtype``, by default its weights' dtype), and the result is on that
        device, in that dtype.
        """
        weight = self.out[2].weight
        dtype, device = self.compute_dtype or weight.dtype, weight.device
        t = torch.as_tensor(t, device=device)
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))  # (B, 4*mc)
        h, context = x.to(device, dtype), context.to(device, dtype)
        if h.device.type == "cpu":
            h = h.contiguous(memory_format=torch.channels_last)  # (B, C, H, W) stored as (B, H, W, C)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).contiguous()

    def self_attention_layers(self) -> Iterator[Attention]:
        """All ``attn1`` layers, in forward order; ``layer.path`` is the address recipes are installed under."""
        return (m for m in self.modules() if isinstance(m, Attention) and m.path)


def set_recipe(unet: UNet, path: str, recipe: Recipe) -> None:
    """Install ``recipe`` in the self-attention layer at ``path`` (e.g. ``output_blocks.6.1.transformer_blocks.0.attn1``)."""
    try:
        layer = unet.get_submodule(path)
    except AttributeError:
        layer = None
    if not (isinstance(layer, Attention) and layer.path):
        raise KeyError(f"{path} is not a self-attention (attn1) layer of this UNet")
    layer.recipe = recipe
