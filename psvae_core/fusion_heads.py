"""The image-side pieces around the generator's LM backbone: timestep embedding, 2-D position
embedding, and the wide DDT head (docs/PAPER.md §5.1, §9.2) or its plain-linear ablation.

Latent tokens are patch-1 pixels of the latent grid, `[B, h*w, C]`, raster order.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [h*w, dim] (MAE/DiT): half the channels code the row,
    half the column. Computed on the fly, so any grid size works."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    rows = torch.arange(h, device=device, dtype=torch.float32)[:, None] * freqs  # [h, dim/4]
    cols = torch.arange(w, device=device, dtype=torch.float32)[:, None] * freqs  # [w, dim/4]
    rows = torch.cat([rows.sin(), rows.cos()], -1)[:, None, :].expand(h, w, dim // 2)
    cols = torch.cat([cols.sin(), cols.cos()], -1)[None, :, :].expand(h, w, dim // 2)
    return torch.cat([rows, cols], -1).reshape(h * w, dim)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP (DiT's embedder)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]
        emb = torch.cat([args.cos(), args.sin()], -1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(a) * b)


class DDTBlock(nn.Module):
    """Pre-norm attention + SwiGLU block with per-token adaLN (shift, scale, gate for each half):
    the modulation is [B, L, 6D], one set per token, from that token's backbone output."""

    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.mlp = SwiGLU(width, mlp_hidden)
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).chunk(6, -1)
        B, L, D = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Per-token adaLN then a linear map to the latent channels."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(cond)).chunk(2, -1)
        return self.out(modulate(self.norm(x), shift, scale))


class DDTHead(nn.Module):
    """RAE's wide DDT head. cond = proj(silu(t_emb + s)) per token (s: backbone output at the target
    tokens); the head re-embeds x_t itself, a long skip that lets the high-dimensional noise pass
    without going through the narrower backbone (paper §3.2). Modulations and the final layer start
    at zero, so a fresh head predicts v = 0 and training starts from the backbone's signal."""

    def __init__(self, channels: int, cond_dim: int, width: int, depth: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"head width {width} is not divisible by head_heads {heads}")
        mlp_hidden = int(2 / 3 * mlp_ratio * width)  # SwiGLU keeps the parameter count of a 4x MLP
        self.width = width
        self.cond_proj = nn.Linear(cond_dim, width)
        self.x_embed = nn.Linear(channels, width)
        self.blocks = nn.ModuleList(DDTBlock(width, heads, mlp_hidden) for _ in range(depth))
        self.final = FinalLayer(width, channels)
        self.apply(_xavier)
        for ada in [b.ada for b in self.blocks] + [self.final.ada, self.final.out]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)

    def forward(self, s: torch.Tensor, x_tokens: torch.Tensor, t_emb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        cond = self.cond_proj(F.silu(s + t_emb[:, None]))
        x = self.x_embed(x_tokens) + sincos_2d(*grid, self.width, device=s.device).to(s.dtype)
        for block in self.blocks:
            x = block(x, cond)
        return self.final(x, cond)


class LinearHead(nn.Module):
    """Ablation without the DDT head: velocity = a linear map of the backbone output."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        self.out = nn.Linear(cond_dim, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, s: torch.Tensor, x_tokens: torch.Tensor, t_emb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.out(s)


def _xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
