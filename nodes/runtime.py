"""The batched encode/decode loops of the PS-VAE nodes, over one out-of-memory retry rule.

As ComfyUI's own VAE (comfy/sd.py): batches are sized from the free memory, results go to
`intermediate_device()` as float32, every batch ticks a ProgressBar and is an interrupt point, and
an out-of-memory error first halves the batch, then (decoding) falls back to overlapping tiles
(`run_batches`). Model handles are in handles.py, LATENT helpers in latents.py.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch

import comfy.model_management as mm
import comfy.utils

from ..psvae_core import images as core_images
from .handles import PSVAEHandle
from .latents import MAX_SIDE, check_latent

RESIZE_CHOICES = ["center crop", "stretch"]
# Latent tile sizes tried, largest first, when even a single image runs out of memory.
TILE_SIZES = (16, 8, 4)

log = logging.getLogger("PS-VAE")


def is_out_of_memory(err: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), mm.OOM_EXCEPTION, MemoryError)
                      if isinstance(t, type) and t is not Exception)
    if isinstance(err, oom_types):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def unless_out_of_memory(attempt: Callable[..., torch.Tensor], *args) -> Optional[torch.Tensor]:
    """attempt(*args), or None when it ran out of memory (any other error is re-raised). The cache is
    emptied after the except block, so the failed attempt's tensors can be freed first; the caller
    then retries smaller."""
    try:
        return attempt(*args)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
        if not is_out_of_memory(err):
            raise
    mm.soft_empty_cache(True)
    return None


def run_batches(who: str, total: int, batch: int, attempt: Callable[[int, int, int], torch.Tensor],
                levels: Sequence[str] = (), out_device=None) -> torch.Tensor:
    """attempt(start, size, level) over rows 0..total in batches, stacked into one float32 tensor on
    `out_device`. Out of memory: halve the batch, down to one row; then step through the fallback
    `levels` (level k >= 0 is levels[k], described in the log; level -1 is the plain attempt); past
    the last one, a MemoryError that says what to do. Interrupt point and progress tick per batch."""
    out: Optional[torch.Tensor] = None
    pbar = comfy.utils.ProgressBar(total)
    i, level = 0, -1
    while i < total:
        mm.throw_exception_if_processing_interrupted()
        part = unless_out_of_memory(attempt, i, batch, level)
        if part is None:
            if batch > 1:
                batch = max(1, batch // 2)
                log.warning("%s: out of memory, retrying with batches of %d", who, batch)
            elif level + 1 < len(levels):
                level += 1
                log.warning("%s: out of memory, retrying with %s", who, levels[level])
            else:
                worst = f"even with {levels[-1]}" if levels else "on a single image"
                raise MemoryError(f"{who}: out of memory {worst}; "
                                  "free memory (Manager -> Unload models), start ComfyUI with --lowvram, or use a "
                                  "smaller image or latent")
            continue
        if out is None:
            out = torch.empty((total,) + tuple(part.shape[1:]), dtype=torch.float32, device=out_device)
        out[i:i + part.shape[0]] = part
        i += part.shape[0]
        pbar.update(part.shape[0])
    return out


# --------------------------------------------------------------------------------------- encode

def crop_to_aspect(x: torch.Tensor, aspect_hw: tuple[int, int]) -> torch.Tensor:
    """Centre crop [B,C,H,W] to the aspect ratio gh:gw (the model's latent grid)."""
    h, w = x.shape[-2:]
    gh, gw = aspect_hw
    if h * gw > w * gh:  # too tall
        new_h = max(1, round(w * gh / gw))
        top = (h - new_h) // 2
        return x[..., top:top + new_h, :]
    if h * gw < w * gh:  # too wide
        new_w = max(1, round(h * gw / gh))
        left = (w - new_w) // 2
        return x[..., :, left:left + new_w]
    return x


def encode_images(handle: PSVAEHandle, image: torch.Tensor, resize: str = "center crop") -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] -> raw latents [B,C,h,w] float32 on the intermediate device.

    Resize rule: with "center crop" the image is first centre-cropped to the aspect ratio of the
    model's latent grid (square for the paper's 224-px encoders); with "stretch" it is not. The
    encoder then resizes it (bicubic) to its own input size: 224x224 -> a 16x16 latent -> 256x256 px
    when decoded. Encoders with a native grid keep the aspect ratio and round each side to the
    nearest multiple of their patch size.
    """
    if resize not in RESIZE_CHOICES:
        raise ValueError(f"PS-VAE Encode: resize must be one of {RESIZE_CHOICES}, got {resize!r}")
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"PS-VAE Encode: expected an IMAGE [batch, height, width, channels], got {shape}")
    try:
        x = core_images.to_model_images(image.movedim(-1, 1))
    except core_images.ImageInputError as err:
        raise core_images.ImageInputError(f"PS-VAE Encode: {err}") from err
    if resize == "center crop":
        x = crop_to_aspect(x, handle.latent_grid(*x.shape[-2:]))
    b, _, h, w = x.shape
    gh, gw = handle.latent_grid(h, w)
    if gh * handle.upsample_factor > MAX_SIDE or gw * handle.upsample_factor > MAX_SIDE:
        raise ValueError(f"PS-VAE Encode: a {core_images.size_text(h, w)} image (width x height) gives a "
                         f"{core_images.size_text(gh, gw)} latent grid, which would decode to "
                         f"more than {MAX_SIDE} px per side; scale the image down first")
    per_item = handle.encode_memory(h, w)
    device = handle.load(per_item)
    out_device = mm.intermediate_device()

    def encode_chunk(start: int, size: int, level: int) -> torch.Tensor:
        chunk = x[start:start + size].to(device=device, dtype=handle.dtype)
        with torch.inference_mode():
            z = handle.model.encode(chunk).mode()
        return z.to(out_device).float()

    return run_batches("PS-VAE Encode", b, handle.batch_size(per_item, b), encode_chunk, out_device=out_device)


# --------------------------------------------------------------------------------------- decode

def _tile_starts(n: int, tile: int, stride: int) -> list[int]:
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile, stride))
    return starts + [n - tile]


def _ramp(length: int, overlap: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    w = torch.ones(length)
    if overlap > 0:
        ramp = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
        if fade_start:
            w[:overlap] = torch.minimum(w[:overlap], ramp)
        if fade_end:
            w[length - overlap:] = torch.minimum(w[length - overlap:], ramp.flip(0))
    return w


def decode_tiled(decode_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int,
                 tile: int, overlap: int, out_device=None) -> torch.Tensor:
    """Decode [B,C,h,w] in overlapping latent tiles, blended with linear ramps -> [B,3,h*f,w*f]."""
    b, _, h, w = z.shape
    out_device = out_device if out_device is not None else z.device
    tile_h, tile_w = min(tile, h), min(tile, w)
    stride_h, stride_w = max(1, tile_h - overlap), max(1, tile_w - overlap)
    out = torch.zeros((b, 3, h * factor, w * factor), dtype=torch.float32, device=out_device)
    weight = torch.zeros((1, 1, h * factor, w * factor), dtype=torch.float32, device=out_device)
    ov = overlap * factor
    for y0 in _tile_starts(h, tile_h, stride_h):
        for x0 in _tile_starts(w, tile_w, stride_w):
            mm.throw_exception_if_processing_interrupted()
            piece = decode_fn(z[:, :, y0:y0 + tile_h, x0:x0 + tile_w]).to(out_device).float()
            wy = _ramp(tile_h * factor, ov, y0 > 0, y0 + tile_h < h)
            wx = _ramp(tile_w * factor, ov, x0 > 0, x0 + tile_w < w)
            mask = (wy[:, None] * wx[None, :]).to(out_device)[None, None]
            ys, xs = slice(y0 * factor, (y0 + tile_h) * factor), slice(x0 * factor, (x0 + tile_w) * factor)
            out[:, :, ys, xs] += piece * mask
            weight[:, :, ys, xs] += mask
    return out / weight


def decode_latents(handle: PSVAEHandle, latent) -> torch.Tensor:
    """LATENT {"samples": raw [B,C,h,w]} -> IMAGE [B,H,W,3] float32 0..1 on the intermediate device."""
    samples = check_latent(handle, latent)
    b, _, h, w = samples.shape
    f = handle.upsample_factor
    per_item = handle.decode_memory(h, w)
    device = handle.load(per_item)
    out_device = mm.intermediate_device()

    def run(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return handle.model.decode(z.to(device=device, dtype=handle.dtype))

    tiles = [t for t in TILE_SIZES if t < max(h, w)] or [max(1, max(h, w) // 2)]

    def decode_chunk(start: int, size: int, level: int) -> torch.Tensor:
        chunk = samples[start:start + size]
        if level < 0:
            img = run(chunk).to(out_device).float()
        else:
            t = tiles[level]
            img = decode_tiled(run, chunk, f, tile=t, overlap=max(1, t // 4), out_device=out_device)
        if handle.dtype == torch.float16 and not torch.isfinite(img).all():
            raise ValueError("PS-VAE Decode: fp16 overflowed (NaN/Inf in the decoded image); set the loader's "
                             "dtype to bf16 or fp32")
        return img.clamp(0.0, 1.0)

    levels = [f"tiled decoding ({t}-latent tiles)" for t in tiles]
    out = run_batches("PS-VAE Decode", b, handle.batch_size(per_item, b), decode_chunk, levels, out_device)
    return out.movedim(1, -1)
