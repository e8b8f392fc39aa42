"""S-VAE parts (docs/PAPER.md §2): the semantic encoder E_s and its mirror, the semantic decoder D_s.

E_s: features [B,D,h,w] -> transformer blocks at width D -> LayerNorm -> MLP -> (mean, logvar)
     of the C-channel latent (a DiagonalGaussian).
D_s: latent [B,C,h,w] -> MLP -> transformer blocks at width D -> LayerNorm -> Linear -> features.
The blocks are the representation encoder's own design (`RepresentationEncoder.make_blocks`),
copied from its last blocks or freshly initialised (SemanticConfig.block_init).
"""
from __future__ import annotations

import torch
from torch import nn

from .distributions import DiagonalGaussian


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # [B,D,h,w] -> [B,h*w,D]


def _to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


class SemanticEncoder(nn.Module):
    """E_s: compresses encoder features of width `width` to a KL latent of `latent_channels`."""

    def __init__(self, width: int, latent_channels: int, blocks: nn.Module, proj_hidden: int | None = None):
        super().__init__()
        self.blocks = blocks
        self.norm = nn.LayerNorm(width)
        self.proj = _mlp(width, proj_hidden or width, 2 * latent_channels)

    def forward(self, features: torch.Tensor) -> DiagonalGaussian:
        grid = tuple(features.shape[-2:])
        tokens = self.blocks(_to_tokens(features), grid)
        return DiagonalGaussian.from_parameters(_to_map(self.proj(self.norm(tokens)), grid))


class SemanticDecoder(nn.Module):
    """D_s: maps a latent back to encoder features (trained against the frozen encoder, L_s)."""

    def __init__(self, width: int, latent_channels: int, blocks: nn.Module, proj_hidden: int | None = None):
        super().__init__()
        self.proj = _mlp(latent_channels, proj_hidden or width, width)
        self.blocks = blocks
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, width)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        grid = tuple(latents.shape[-2:])
        tokens = self.blocks(self.proj(_to_tokens(latents)), grid)
        return _to_map(self.out(self.norm(tokens)), grid)
