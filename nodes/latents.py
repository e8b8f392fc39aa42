"""LATENT dicts of PS-VAE latents: what the pack writes into them and the checks on the way in."""
from __future__ import annotations

import torch

from ..psvae_core import images as core_images
from .handles import PSVAEHandle

MAX_SIDE = core_images.MAX_SIDE  # largest image side the pack produces or accepts (px)

# LATENT dicts made by this pack carry the identity of the VAE whose latent space they are in
# (core latent nodes copy the dict, so the keys survive upscales, batching, etc.).
LATENT_VAE_KEY = "psvae_vae"  # the VAE file's fingerprint (psvae_core.checkpoint.fingerprint)
LATENT_VAE_NAME_KEY = "psvae_vae_name"  # its file name, for messages


def make_latent(handle: PSVAEHandle, samples: torch.Tensor) -> dict:
    out = {"samples": samples}
    if handle.fingerprint is not None:
        out[LATENT_VAE_KEY] = handle.fingerprint
        out[LATENT_VAE_NAME_KEY] = handle.name
    return out


def check_latent(handle: PSVAEHandle, latent, who: str = "PS-VAE Decode", what: str = "LATENT") -> torch.Tensor:
    """The latent's samples [B,C,h,w] after checks that name the problem: another VAE's latent
    (channel count, or the identity this pack records in its LATENT outputs), empty, oversized,
    NaN/Inf."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{who}: the {what} input has no 'samples' tensor")
    if samples.ndim != 4:
        raise ValueError(f"{who}: expected a {what} [batch, channels, height, width], got shape "
                         f"{tuple(samples.shape)} (video or audio latents cannot be used by an image VAE)")
    b, c, h, w = samples.shape
    if c != handle.latent_channels:
        raise ValueError(
            f"{who}: this {what} has {c} channels, but the VAE {handle.name} takes "
            f"{handle.latent_channels}-channel latents. It was made by another VAE or latent node (for example "
            "ComfyUI's VAE Encode or Empty Latent Image): encode the image with PS-VAE Encode using this same VAE, "
            "or load the VAE that made the latent.")
    origin = latent.get(LATENT_VAE_KEY)
    if isinstance(origin, str) and handle.fingerprint is not None and origin != handle.fingerprint:
        made_by = latent.get(LATENT_VAE_NAME_KEY) or "another VAE file"
        raise ValueError(
            f"{who}: this {what} was made with the VAE {made_by}, which is another VAE than {handle.name} "
            f"(the files differ: fingerprint {origin[:12]} vs {handle.fingerprint[:12]}). Latents of one VAE mean "
            "nothing to another even with the same channel count: connect the VAE that made the latent, or "
            "encode the image again with this VAE.")
    if b == 0 or h == 0 or w == 0:
        raise ValueError(f"{who}: the {what} is empty (shape {tuple(samples.shape)})")
    f = handle.upsample_factor
    if h * f > MAX_SIDE or w * f > MAX_SIDE:
        size, px = core_images.size_text(h, w), core_images.size_text(h * f, w * f)
        raise ValueError(f"{who}: a {size} latent decodes to {px} px (width x height), above the {MAX_SIDE} px "
                         "limit per side; use a smaller latent")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{who}: the {what} contains NaN or Inf values; the node that made it failed "
                         "(with fp16, try bf16 or fp32)")
    return samples
