"""Pixel decoders (docs/PAPER.md §3): latent [B,C,h,w] -> image [B,3,f*h,f*w] in [-1,1].

- `ConvDecoder`: the LDM autoencoder's ResNet decoder (conv_in, middle res/attn/res, one level per
  channel multiplier with nearest x2 upsampling between levels, GroupNorm/SiLU, conv_out).
  Fully convolutional, so any latent grid works (16x16 -> 256 px, 32x32 -> 512 px).
- `ViTDecoder`: the RAE baseline's decoder: linear embed, fixed 2-D sin-cos positions, ViT blocks,
  linear to patch pixels, unpatchify.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .config import PixelDecoderConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)  # 32 groups when the width allows


# The blocks are transformers' checkpointable layers (a flag read in their own call, no bound
# closure), so one switch, `PSVAE.set_grad_checkpointing`, covers them and the encoder's layers.
class ResnetBlock(GradientCheckpointingLayer):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(GradientCheckpointingLayer):
    """Single-head spatial self-attention (LDM), through SDPA."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n c) h w -> n b 1 (h w) c", n=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class ConvDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, latent_channels: int, out_channels: int = 3):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        top = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, top, 3, padding=1)
        mid = [ResnetBlock(top, top)] + ([AttnBlock(top)] if cfg.attention else []) + [ResnetBlock(top, top)]
        self.mid = nn.Sequential(*mid)
        levels, c = [], top
        for i in reversed(range(len(widths))):  # lowest resolution first
            layers = []
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResnetBlock(c, widths[i]))
                c = widths[i]
                if cfg.attention and i == len(widths) - 1:
                    layers.append(AttnBlock(c))
            if i != 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
            levels.append(nn.Sequential(*layers))
        self.levels = nn.Sequential(*levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight the LDM adaptive GAN weight is computed at."""
        return self.conv_out.weight

    def forward(self, z):
        h = self.levels(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


def sincos_2d(width: int, h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [h*w, width] (half the channels per axis)."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}")
    freqs = 1.0 / (10000 ** (torch.arange(width // 4, device=device, dtype=torch.float64) / (width // 4)))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float64),
                            torch.arange(w, device=device, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        angles = pos[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).to(dtype)


class ViTDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, latent_channels: int, out_channels: int = 3):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.patch = cfg.vit_patch
        self.embed = nn.Linear(latent_channels, cfg.vit_width)
        self.blocks = nn.Sequential(*[Block(cfg.vit_width, cfg.vit_heads, mlp_ratio=4.0) for _ in range(cfg.vit_depth)])
        self.norm = nn.LayerNorm(cfg.vit_width)
        self.out = nn.Linear(cfg.vit_width, self.patch * self.patch * out_channels)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.out.weight

    def forward(self, z):
        b, _, h, w = z.shape
        x = self.embed(z.flatten(2).transpose(1, 2))
        x = x + sincos_2d(x.shape[-1], h, w, device=x.device, dtype=x.dtype)
        x = self.out(self.norm(self.blocks(x)))
        return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch)


def build_pixel_decoder(cfg: PixelDecoderConfig, latent_channels: int) -> nn.Module:
    return (ConvDecoder if cfg.kind == "conv" else ViTDecoder)(cfg, latent_channels)
