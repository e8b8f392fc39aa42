"""A cheap latent -> RGB map for live previews while sampling (ComfyUI's "latent2rgb").

The trainer fits it at export time by least squares over the latent-statistics sample: each latent
vector against the mean colour of the image patch it decodes to. Previewing is then one tiny matmul per step, no decoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def preview_moments(latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares sums of one batch, float64: (A^T A [C+1,C+1], A^T Y [C+1,3]) with A the raw
    latent vectors of [B,C,h,w] plus a constant 1, and Y the average colour (0..1) of each latent
    cell's patch of `images` [B,3,H,W]. Sums over batches (and processes) fit the whole set."""
    b, c, h, w = latents.shape
    colours = F.adaptive_avg_pool2d(images.float(), (h, w))
    x = latents.float().permute(0, 2, 3, 1).reshape(-1, c).double()
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3).double()
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    return a.T @ a, a.T @ y


def solve_preview(ata: torch.Tensor, aty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [3,C], bias [3]) from summed `preview_moments` (lstsq: dead channels make A^T A singular)."""
    solution = torch.linalg.lstsq(ata.cpu(), aty.cpu()).solution  # [C+1, 3]
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


def fit_latent_to_rgb(latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares (weight [3,C], bias [3]) mapping raw latents [B,C,h,w] to the average colour
    (0..1) of each latent cell's image patch; `images` [B,3,H,W] is area-averaged to h x w."""
    return solve_preview(*preview_moments(latents, images))


def latent_to_rgb(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] -> [B,3,h,w] preview colours, clamped to 0..1."""
    rgb = torch.einsum("bchw,rc->brhw", latents.float(), weight.float().to(latents.device))
    return (rgb + bias.float().to(latents.device)[None, :, None, None]).clamp(0.0, 1.0)
