"""The SD1.5 KL autoencoder, written after LDM's ``AutoencoderKL`` (``ldm/modules/diffusionmodules/model.py``).

Attribute names mirror the checkpoint keys under ``first_stage_model.``: ``encoder``, ``decoder``, ``quant_conv``,
``post_quant_conv``; encoder ``down.{i}.block.{j}`` / ``down.{i}.downsample``, decoder ``up.{i}.block.{j}`` /
``up.{i}.upsample``, ``mid.block_1``/``mid.attn_1``/``mid.block_2``.  The mid-block attention keeps LDM's 1x1 convs
``q``/``k``/``v``/``proj_out``.

``encode`` returns the diagonal Gaussian posterior over *unscaled* latents; ``decode`` takes an unscaled latent and
returns the image, not clamped.  The 0.18215 latent scale belongs to the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SD15Config
from .layers import Conv2d, GroupNorm, Upsample


def norm(channels: int) -> GroupNorm:
    return GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of the lowest-resolution feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.q, self.k, self.v, self.proj_out = (Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right and bottom only


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One encoder resolution, ``down.i``: ResnetBlocks, then a stride-2 conv unless it is the last level."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution, ``up.i``: ResnetBlocks, then a 2x upsample unless it is level 0."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: SD15Config):
        super().__init__()
        ch, mult, n = cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks
        self.conv_in = Conv2d(cfg.vae_in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i, m in enumerate(mult):
            blocks = [ResnetBlock(c_in if j == 0 else ch * m, ch * m) for j in range(n)]
            c_in = ch * m
            last = i == len(mult) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(c_in)))
        self.mid = Mid(c_in)
        self.norm_out = norm(c_in)
        self.conv_out = Conv2d(c_in, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, cfg: SD15Config):
        super().__init__()
        ch, mult, n = cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks
        c_in = ch * mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Mid(c_in)
        levels = []
        for i in reversed(range(len(mult))):  # lowest resolution first; stored as up.{i} as LDM does
            blocks = [ResnetBlock(c_in if j == 0 else ch * mult[i], ch * mult[i]) for j in range(n + 1)]
            c_in = ch * mult[i]
            levels.insert(0, UpLevel(blocks, Upsample(c_in) if i != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(c_in)
        self.conv_out = Conv2d(c_in, cfg.vae_in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on the CPU, the layout oneDNN's convolutions work in (see ``layers.py``)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


@dataclass
class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, exp(logvar)), over unscaled latents (B, z_channels, H/8, W/8)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        device = generator.device if generator is not None else self.mean.device  # same noise on every device
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device=device)
        return self.mean + torch.exp(0.5 * self.logvar) * noise.to(self.mean)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: SD15Config):
        super().__init__()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = Conv2d(cfg.z_channels, cfg.z_channels, 1)

        # None: compute in the weights' dtype; float32 for weights stored in bfloat16 (see UNet.compute_dtype)
        self.compute_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the autoencoder computes in (its weights' unless ``compute_dtype`` says otherwise)."""
        return self.compute_dtype or self.quant_conv.weight.dtype

    def encode(self, img: torch.Tensor) -> DiagonalGaussian:
        """img (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, H/8, W/8)."""
        moments = self.quant_conv(self.encoder(_layout(img.to(self.dtype)))).contiguous()
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1], not clamped."""
        return self.decoder(self.post_quant_conv(_layout(z.to(self.dtype)))).contiguous()
