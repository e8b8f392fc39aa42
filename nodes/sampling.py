"""Text-to-image and editing with the generator inside ComfyUI: input checks, model management,
the per-step progress bar with a live preview, interrupts, and the conversion between the
generator's normalised latents and the raw latents LATENT dicts carry. The sampling itself is
`psvae_core.generation.generate`, the library's one generation path (row i of a batch uses
seed + i, the Euler state is float32), so a seed makes the same picture here, in the trainer's
previews and in the benchmark outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import comfy.model_management as mm
import comfy.utils
from comfy.cli_args import args as comfy_args

from ..psvae_core import flow, generation
from ..psvae_core.images import size_text
from . import runtime
from .handles import PSVAEHandle
from .latents import check_latent, make_latent
from .generator import GeneratorHandle, check_pair

SEED_MAX = generation.SEED_MAX
MAX_STEPS = 1000
MAX_BATCH = 64


@dataclass(frozen=True)
class Settings:
    seed: int
    steps: int
    shift: float
    guidance: float
    image_guidance: Optional[float] = None
    cfg_interval: Optional[tuple[float, float]] = None
    denoise: float = 1.0  # < 1: img2img from an init latent


def require_models(generator, vae, who: str) -> tuple[GeneratorHandle, PSVAEHandle]:
    if generator is None:
        raise ValueError(f"{who}: no generator: the PS-VAE Loader's generator_name is 'none'. Pick a generator "
                         "file there (kind 'generator', in ComfyUI/models/psvae).")
    if not isinstance(generator, GeneratorHandle):
        raise ValueError(f"{who}: the generator input is not a PS-VAE generator (got {type(generator).__name__}); "
                         "connect the 'generator' output of PS-VAE Loader")
    if not isinstance(vae, PSVAEHandle):
        raise ValueError(f"{who}: the vae input is not a PS-VAE autoencoder (got {type(vae).__name__}); "
                         "connect the 'vae' output of PS-VAE Loader")
    check_pair(generator, vae, who)
    return generator, vae


# What to write when the text is empty, per kind of text.
_WRITE = {"prompt": "write what the image should show, e.g. 'a red circle on a white table'",
          "instruction": "write what to change in the source image, e.g. 'make the circle red'"}


def empty_text_problem(text, what: str) -> Optional[str]:
    """The message for an empty prompt/instruction (None when it has text). Used at validation
    (widgets) and again at run time (text that arrives through a link)."""
    if text is None:
        return None  # linked: checked when the node runs
    if not isinstance(text, str) or not text.strip():
        return (f"the {what} is empty: {_WRITE[what]}. This generator is always prompted (guidance compares "
                f"the {what} with none, so an empty one has nothing to follow).")
    return None


def tokenize(gen: GeneratorHandle, text: str, what: str, who: str,
             blank_ok: bool = False) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Token ids and mask [1, L] of one prompt, checked against the generator's length. blank_ok
    (a negative prompt): blank text is no text, and gives None."""
    if blank_ok and (text is None or (isinstance(text, str) and not text.strip())):
        return None
    if blank_ok and not isinstance(text, str):
        raise ValueError(f"{who}: the {what} must be text, got {type(text).__name__}")
    problem = None if blank_ok else empty_text_problem(text, what)
    if problem:
        raise ValueError(f"{who}: {problem}")
    batch = gen.model.tokenizer([text], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = int(mask.sum())
    if n == 0:
        raise ValueError(f"{who}: the {what} gives no tokens with this generator's tokenizer; write it in words")
    if n > gen.max_text_tokens:
        raise ValueError(f"{who}: the {what} is {n} tokens long; the generator {gen.name} reads at most "
                         f"{gen.max_text_tokens}. Shorten it.")
    return ids, mask


def check_settings(s: Settings, batch: int, who: str) -> None:
    # The widgets' min/max bound these already in the UI and at validation; API callers and
    # converted inputs are checked here once more.
    if not (1 <= s.steps <= MAX_STEPS):
        raise ValueError(f"{who}: steps must be 1..{MAX_STEPS}, got {s.steps}")
    if not (1 <= batch <= MAX_BATCH):
        raise ValueError(f"{who}: the batch must be 1..{MAX_BATCH} images, got {batch}")
    if not (0 <= s.seed <= SEED_MAX):
        raise ValueError(f"{who}: seed must be 0..{SEED_MAX}, got {s.seed}")
    values = [s.shift, s.guidance, s.denoise] + ([s.image_guidance] if s.image_guidance is not None else [])
    if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values) or s.shift <= 0:
        raise ValueError(f"{who}: shift must be > 0 and the guidance scales finite numbers")
    if not 0 < s.denoise <= 1:
        raise ValueError(f"{who}: denoise must be in (0, 1] (1 = from pure noise), got {s.denoise}")
    if s.cfg_interval is not None:
        lo, hi = s.cfg_interval
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"{who}: the guidance interval needs 0 <= cfg_interval_start <= cfg_interval_end <= 1 "
                             f"(times run from 1 = noise to 0 = image), got {lo}..{hi}")


def preview_image(vae: PSVAEHandle, x0: torch.Tensor) -> Image.Image:
    """The first image's current clean estimate (normalised latents) as a picture at latent
    resolution: denormalised, then mapped to RGB by the VAE's stored latent -> RGB map. ComfyUI's
    server scales it (bilinear) to --preview-size before sending it."""
    rgb = vae.preview(vae.denormalize(x0[:1].detach()))  # [1,3,h,w] 0..1
    return Image.fromarray((rgb[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy())


def sample(who: str, generator, vae, text: str, what: str, s: Settings, *, negative: str = "", batch: int = 1,
           sources: Optional[tuple] = None, init_latent=None) -> dict:
    """A sampler node's whole run: check the inputs (texts first, before encoding a source), then `run`.
    sources: (source_image, source_latent) for editing, exactly one connected; the batch is then
    one edit per source. init_latent: the LATENT to start from (img2img, with s.denoise)."""
    gen, vae = require_models(generator, vae, who)
    tokenize(gen, text, what, who)
    tokenize(gen, negative, f"negative_{what}", who, blank_ok=True)
    source = None if sources is None else source_latents(gen, vae, *sources, who)
    init = None if init_latent is None else generator_latents(gen, vae, init_latent, who, "init_latent")
    if init is None and s.denoise != 1:
        raise ValueError(f"{who}: denoise {s.denoise} needs an init_latent to start from: connect one (e.g. PS-VAE "
                         "Encode of an image, with this VAE), or set denoise to 1.0 to start from noise")
    rows = 0 if init is None else init.shape[0]
    if source is not None:
        batch = source.shape[0]
        if rows not in (0, 1, batch):
            raise ValueError(f"{who}: init_latent holds {rows} latents for {batch} source images; connect one "
                             "latent, or one per source")
    elif rows > 1:
        if batch not in (1, rows):
            raise ValueError(f"{who}: init_latent holds {rows} latents but batch is {batch}; set batch to 1 (one "
                             f"image per latent) or {rows}, or connect a single latent")
        batch = rows
    return run(gen, vae, text, what, s, batch, source, who, negative=negative, init=init)


def run(gen: GeneratorHandle, vae: PSVAEHandle, text: str, what: str, s: Settings, batch: int,
        source: Optional[torch.Tensor], who: str, *, negative: str = "",
        init: Optional[torch.Tensor] = None) -> dict:
    """Sample and return a LATENT dict of raw latents [batch,C,h,w] (float32, intermediate device).
    `source`: normalised source latents [batch,C,h,w] for editing, else None. negative: a negative
    prompt (blank: none). init: normalised latents [batch or 1,C,h,w] to start from (s.denoise)."""
    check_settings(s, batch, who)
    ids, mask = tokenize(gen, text, what, who)
    neg = tokenize(gen, negative, f"negative_{what}", who, blank_ok=True)
    size = tuple(source.shape[-2:]) if source is not None else gen.latent_size
    branches = len(flow.branches_for(s.guidance, s.image_guidance))
    image_tokens = size[0] * size[1] * (2 if source is not None else 1)
    text_tokens = max(int(ids.shape[1]), 0 if neg is None else int(neg[0].shape[1]))
    device = gen.load(gen.memory_required(batch, text_tokens, image_tokens, branches))
    pbar = comfy.utils.ProgressBar(s.steps)
    max_preview = int(getattr(comfy_args, "preview_size", 512) or 512)

    def callback(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        preview = ("JPEG", preview_image(vae, x0), max_preview)
        pbar.update_absolute(step, total, preview)  # also an interrupt point (ComfyUI's progress hook)

    with torch.inference_mode():
        src = source.to(device) if source is not None else None
        out = generation.generate(gen.model, (ids, mask), src, seed=s.seed, batch_size=batch, size=size,
                                  steps=s.steps, shift=s.shift, guidance=s.guidance,
                                  image_guidance=s.image_guidance, cfg_interval=s.cfg_interval,
                                  callback=callback, interrupt=mm.throw_exception_if_processing_interrupted,
                                  negative=neg, init=init, denoise=s.denoise)
    if not torch.isfinite(out).all():
        hint = " (fp16 overflowed: set the loader's dtype to bf16 or fp32)" if gen.dtype == torch.float16 else ""
        raise ValueError(f"{who}: the generator produced NaN/Inf values{hint}")
    raw = vae.denormalize(out).to(mm.intermediate_device())
    return make_latent(vae, raw)


# ---------------------------------------------------------------------- sources and init latents

def source_latents(gen: GeneratorHandle, vae: PSVAEHandle, source_image, source_latent,
                   who: str) -> torch.Tensor:
    """Exactly one source -> normalised source latents [B,C,h,w] (float32, CPU/intermediate device).

    An IMAGE is centre-cropped to the aspect ratio of the generator's latent grid and encoded
    with the VAE (which resizes it to its input size; a native-grid VAE gets it resized to exactly
    the generator's grid). A LATENT must come from this VAE (channels and the recorded VAE file
    are checked) and have the generator's grid.
    """
    if source_image is None and source_latent is None:
        raise ValueError(f"{who}: no source: connect the image to edit to source_image (or its PS-VAE latent to "
                         "source_latent)")
    if source_image is not None and source_latent is not None:
        raise ValueError(f"{who}: both source_image and source_latent are connected; connect only one of them "
                         "(the image to edit, or its latent from PS-VAE Encode)")
    if source_latent is not None:
        return generator_latents(gen, vae, source_latent, who, "source_latent")
    if not isinstance(source_image, torch.Tensor) or source_image.ndim != 4:
        raise ValueError(f"{who}: source_image must be an IMAGE [batch, height, width, channels]")
    gh, gw = gen.latent_size
    x = runtime.crop_to_aspect(source_image.movedim(-1, 1), (gh, gw))
    if vae.fixed_grid is None:  # native grid: make the encoder's grid the generator's
        p = vae.patch_size
        x = F.interpolate(x.float(), size=(gh * p, gw * p), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
    return _generator_grid(gen, vae, runtime.encode_images(vae, x.movedim(1, -1), "stretch"), who, "source")


def generator_latents(gen: GeneratorHandle, vae: PSVAEHandle, latent, who: str, what: str) -> torch.Tensor:
    """A LATENT input (a source or an init latent) -> normalised latents [B,C,h,w]: made by this
    VAE (channels and the recorded VAE file checked) on the generator's grid."""
    return _generator_grid(gen, vae, check_latent(vae, latent, who, what), who, what)


def _generator_grid(gen: GeneratorHandle, vae: PSVAEHandle, raw: torch.Tensor, who: str, what: str) -> torch.Tensor:
    gh, gw = gen.latent_size
    if tuple(raw.shape[-2:]) != (gh, gw):
        raise ValueError(f"{who}: the {what} is a {size_text(*raw.shape[-2:])} latent, but the generator "
                         f"{gen.name} works on {size_text(gh, gw)} latents; encode the image with PS-VAE Encode "
                         "instead of resizing the latent")
    if raw.shape[0] > MAX_BATCH:
        raise ValueError(f"{who}: the {what} holds {raw.shape[0]} latents; at most {MAX_BATCH} at a time")
    return vae.normalize(raw)
