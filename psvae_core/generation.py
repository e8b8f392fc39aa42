"""Generation: prompt or edit -> latents -> images, the one path that the ComfyUI samplers, the
trainer's previews and the benchmark outputs all call (README "Using the library", docs/PAPER.md §5.2).

Pure functions around one denoise loop (`flow.euler_sample`):

    seeds = row_seeds(seed, batch)            # row i uses seed + i
    noise = make_noise(shape, seeds)          # float32, drawn on the CPU row by row
    latents = generate(model, prompts, ...)   # the prefix once, then Euler steps in float32
                                              # (negative=: a negative prompt; init=, denoise=: img2img)
    images = decode(vae, latents)             # 0..1

One seed rule: row i of a batch starts from `flow.make_noise` seeded with its own seed (seed + i
when one seed is given, or the caller's list), drawn on the CPU, so a seed gives the same picture
on every device and in every batch size (row i of a batch at seed s is the picture a batch of one
makes at seed s + i). The Euler state stays float32 whatever the model's dtype: the model casts its
inputs, and the steps accumulate in full precision.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from . import flow

SEED_MAX = 0xFFFFFFFFFFFFFFFF  # seeds are unsigned 64-bit (ComfyUI's widget range); seed + i wraps

Seeds = Union[int, Sequence[int]]


def row_seeds(seed: Seeds, batch_size: int) -> list[int]:
    """The noise seed of every row: seed + i for one seed (wrapping at 2**64), or the given list."""
    if isinstance(seed, int):
        return [(seed + i) % (SEED_MAX + 1) for i in range(batch_size)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch_size:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch_size}")
    return seeds


def make_noise(shape, seeds: Sequence[int], device=None) -> torch.Tensor:
    """Starting noise [len(seeds), *shape] float32: row i from `flow.make_noise` at seeds[i]."""
    return torch.cat([flow.make_noise((1, *shape), s, device) for s in seeds])


def _blank(text) -> bool:
    """Prompts that are all blank (a negative prompt left empty)."""
    return isinstance(text, (list, tuple)) and all(isinstance(p, str) and not p.strip() for p in text)


@torch.no_grad()
def generate(model, text, source: Optional[torch.Tensor] = None, *, seed: Seeds = 0,
             batch_size: Optional[int] = None, size: Optional[tuple] = None, steps: int = flow.DEFAULT_STEPS,
             shift: float = flow.DEFAULT_SHIFT, guidance: float = flow.DEFAULT_GUIDANCE,
             image_guidance: Optional[float] = None, cfg_interval: Optional[tuple] = None,
             callback: Optional[flow.Callback] = None, interrupt: Optional[Callable[[], None]] = None,
             vae=None, negative=None, init: Optional[torch.Tensor] = None, denoise: float = 1.0) -> torch.Tensor:
    """Normalised latents [B, C, h, w] float32 (or, with `vae`, its decoded images [B, 3, H, W] 0..1).

    model: a FusionDiffuser. text: prompts, token ids, (ids, mask) or a PrefixCache (for an edit
        one encoded with its source). source: normalised source latents [B or 1, C, h, w] to edit.
    seed: one seed (row i uses seed + i) or one per row. batch_size: default the text's, source's
        or init's batch, or the number of seeds. size: latent (h, w); default the init's or the
        source's, else the model's.
    guidance: text classifier-free guidance (1 = off); image_guidance: not None = dual guidance
        (editing); cfg_interval: guidance only for t in [lo, hi] (flow.euler_sample).
    callback(step, total, x, x0_estimate) after every step (progress, previews); interrupt() before
        every step: raise there to stop (ComfyUI's cancel).
    negative: a negative prompt (or instruction), guided against instead of the empty text
        (`FusionDiffuser.encode_negative`): a string, prompts, token ids or (ids, mask). None or
        blank text is the empty text, and gives exactly the result without a negative.
    init, denoise (img2img): normalised latents [B or 1, C, h, w] to start from, noised to the
        time that `denoise` picks on the shifted grid (`flow.euler_sample`; row i's noise as
        above); denoise 1 is plain generation. init sets the default size and batch too.
    """
    prefix = model.encode_prefix(text, source)
    if batch_size is None:
        batch_size = (len(seed) if not isinstance(seed, int)
                      else max(prefix.batch_size, init.shape[0] if init is not None else 1))
    if size is None:
        given = init if init is not None else source
        size = given.shape[-2:] if given is not None else model.config.latent_size
    h, w = size
    device = model.x_embedder.weight.device
    noise = make_noise((model.config.latent_channels, h, w), row_seeds(seed, batch_size), device)
    if init is not None and (init.shape[0] not in (1, batch_size) or init.shape[1:] != noise.shape[1:]):
        raise ValueError(f"init latents {tuple(init.shape)} do not fit a batch of {batch_size} "
                         f"{tuple(noise.shape[1:])} latents (a batch of one is broadcast)")
    negative = [negative] if isinstance(negative, str) else negative
    if _blank(negative):
        negative = None  # the empty text: the plain guidance, untouched
    if negative is not None and prefix.source_tokens and source is None:
        raise ValueError("a negative instruction needs the source: pass the instruction and the source, "
                         "not a PrefixCache encoded already")
    branches = None if negative is None else model.encode_negative(negative, source)
    velocity = model.velocity_fn(prefix, branches)
    if interrupt is not None:
        guided = velocity

        def velocity(x, t, branches):
            interrupt()
            return guided(x, t, branches)

    latents = flow.euler_sample(velocity, noise, steps=steps, shift=shift, guidance=guidance,
                                image_guidance=image_guidance, cfg_interval=cfg_interval, callback=callback,
                                init=None if init is None else init.to(device), denoise=denoise)
    return latents if vae is None else decode(vae, latents)


@torch.no_grad()
def encode_source(vae, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Images [B, 3, H, W] in 0..1 -> the normalised source latents an edit starts from (posterior mean);
    `normalize=False`: the raw posterior mean in the VAE's dtype (what the trainer's latent cache stores)."""
    weight = next(vae.parameters())
    raw = vae.encode(images.to(weight.device, weight.dtype)).mode()
    return vae.normalize_latents(raw.float()) if normalize else raw


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> images [B, 3, H, W] float32 in 0..1 (`PSVAE.decode` of the raw latents)."""
    weight = next(vae.parameters())
    raw = vae.denormalize_latents(latents.float())
    return vae.decode(raw.to(weight.device, weight.dtype)).float().clamp(0, 1)
