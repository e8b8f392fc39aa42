"""Generator files in the loader, and the VAE <-> generator compatibility check.

A generator (`psvae_core.fusion.FusionDiffuser`, kind "generator") makes *normalised* latents of
one VAE's latent space. It is loaded into a ModelPatcher (ComfyUI's model management places and
unloads it like any diffusion model) and checked against a VAE, in words, whenever the two meet:
in the loader (both files chosen) and again in each sampler (whose `vae` socket may come from
another loader). The rules, in order:

1. latent channels: the generator's `latent_channels` must equal the VAE's;
2. latent grid: when the VAE resizes every image to a fixed square (224 px -> 16x16), the
   generator's `latent_size` must be that grid; a "native"-grid VAE (image_size None) makes any
   grid, so this is not checked;
3. the VAE it was trained with, when the generator file records one in its provenance: the one
   rule of psvae_core.provenance (recorded latent statistics decide; without them the fingerprint;
   the same statistics under another fingerprint is only logged). A file that records nothing is
   checked by 1 and 2 alone (logged once).
"""
from __future__ import annotations

import json
import logging
from typing import Optional

import torch

import comfy.model_management as mm

from ..psvae_core import checkpoint
from ..psvae_core.fusion import FusionDiffuser
from ..psvae_core.images import size_text
from ..psvae_core.provenance import recorded_vae, vae_mismatch
from .handles import ModelHandle, PSVAEHandle, choose_dtype

log = logging.getLogger("PS-VAE")

class GeneratorHandle(ModelHandle):
    """What the loader's `generator` output carries: a FusionDiffuser, and what its file records
    about the VAE it was trained with."""

    def __init__(self, model: FusionDiffuser, name: str, dtype: torch.dtype, load_device, offload_device,
                 provenance: Optional[dict] = None):
        super().__init__(model, name, dtype, load_device, offload_device)
        self.config = model.config
        self.provenance = provenance or {}
        self.recorded_vae = recorded_vae(self.provenance)
        self._checked: set = set()

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def latent_size(self) -> tuple[int, int]:
        h, w = self.config.latent_size
        return int(h), int(w)

    @property
    def max_text_tokens(self) -> int:
        return int(self.config.lm.get("max_position_embeddings", 2048)) - 3  # the source's, a gap, the target's

    def memory_required(self, batch: int, text_tokens: int, image_tokens: int, branches: int) -> int:
        """Activation memory of one guided step (bytes, generous); the weights are counted by ComfyUI."""
        lm = self.config.lm
        hidden, inter = int(lm.get("hidden_size", 1024)), int(lm.get("intermediate_size", 4096))
        heads = int(lm.get("num_attention_heads", 16))
        elem = self.element_size()
        rows = batch * branches
        tokens = image_tokens + text_tokens
        per_row = (image_tokens * (hidden * 16 + inter * 4 + self.config.head_width * 12)
                   + heads * image_tokens * tokens * 2) * elem
        text = text_tokens * hidden * int(lm.get("num_hidden_layers", 24)) * 4 * elem  # cached K/V
        return int(1.25 * (rows * per_row + text)) + 64 * 1024 * 1024


# ----------------------------------------------------------------------------- compatibility

def pair_problems(gen: GeneratorHandle, vae: PSVAEHandle) -> list[str]:
    """Why `gen` cannot sample in `vae`'s latent space, in words (empty when they belong together)."""
    problems = []
    if gen.latent_channels != vae.latent_channels:
        problems.append(
            f"the generator {gen.name} makes {gen.latent_channels}-channel latents, but the VAE {vae.name} has "
            f"{vae.latent_channels}-channel latents")
    grid = vae.fixed_grid
    if grid is not None and gen.latent_size != grid:
        problems.append(
            f"the generator {gen.name} makes {size_text(*gen.latent_size)} latents, but the VAE "
            f"{vae.name} resizes every image to {vae.input_size} px, a {size_text(*grid)} latent grid")
    if problems:
        return problems
    verdict = vae_mismatch(gen.recorded_vae, vae.fingerprint, *vae.latent_stats, generator=gen.name, vae=vae.name)
    if verdict.note:
        log.warning("PS-VAE: %s", verdict.note)
    if verdict.problem:
        problems.append(verdict.problem)
    return problems


def check_pair(gen: GeneratorHandle, vae: PSVAEHandle, who: str) -> None:
    """Raise a ValueError in words when `gen` and `vae` do not belong together."""
    problems = pair_problems(gen, vae)
    if problems:
        raise ValueError(
            f"{who}: the generator and the VAE do not belong together: " + "; ".join(problems) + ". "
            "Load the VAE the generator was trained with (same PS-VAE Loader, or connect that loader's vae).")
    key = (id(vae), vae.fingerprint)
    if key not in gen._checked:
        gen._checked.add(key)
        if gen.recorded_vae.empty:
            log.info("PS-VAE: %s records no training VAE; only the latent channels and grid of %s were checked",
                     gen.name, vae.name)


# ----------------------------------------------------------------------------------- loading

def auto_dtype(device) -> torch.dtype:
    """ComfyUI's diffusion-model choice (honours --bf16-unet / --fp16-unet / --fp32-unet): bf16 where
    the device runs it natively, else fp32; fp8 choices are not used for this model."""
    dtype = mm.unet_dtype(device=device, supported_dtypes=[torch.bfloat16, torch.float32])
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.bfloat16 if mm.should_use_bf16(device) else torch.float32
    return dtype


def load_generator(path: str, name: str, vae_handle: PSVAEHandle, dtype_choice: str) -> GeneratorHandle:
    who = "PS-VAE Loader (generator_name)"
    device, offload = mm.get_torch_device(), mm.unet_offload_device()
    dtype = choose_dtype(dtype_choice, device, lambda: auto_dtype(device))
    try:  # straight onto the device the model waits on (the GPU itself with --gpu-only), in its dtype
        model = FusionDiffuser.from_file(path, device=offload, dtype=dtype)
        provenance = json.loads(checkpoint.read_metadata(path).get("provenance", "{}"))
    except checkpoint.CheckpointError as err:
        raise checkpoint.CheckpointError(f"{who}: {err}") from err
    except ValueError as err:  # the config itself (e.g. an unsupported LM type)
        raise ValueError(f"{who}: {name}: {err}") from err
    if model.tokenizer is None:
        raise ValueError(f"{who}: {name} carries no tokenizer, so prompts cannot be read; export the generator "
                         "with its tokenizer (FusionDiffuser.from_pretrained_lm keeps it)")
    handle = GeneratorHandle(model, name, dtype, device, offload, provenance)
    check_pair(handle, vae_handle, "PS-VAE Loader")
    return handle
