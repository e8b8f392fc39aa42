"""The PS-VAE models inside ComfyUI's model management, and the batched encode/decode loops.

Everything here follows ComfyUI's own VAE (comfy/sd.py): the nn.Module is wrapped in a
ModelPatcher, `load_models_gpu` places it (and frees other models when memory is short, so
--lowvram / --novram / --gpu-only / --cpu / --cpu-vae all apply), batches are sized from the free
memory, results go to `intermediate_device()` as float32, every batch ticks a ProgressBar and is an
interrupt point, and an out-of-memory error first halves the batch, then decodes in overlapping
tiles.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils

from ..psvae_core import images as core_images
from ..psvae_core.checkpoint import fingerprint as vae_fingerprint
from ..psvae_core.preview import latent_to_rgb

MAX_SIDE = core_images.MAX_SIDE  # largest image side the pack produces or accepts (px)
DTYPE_CHOICES = ["auto", "fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESIZE_CHOICES = ["center crop", "stretch"]
# Upper bound on images per batch even when memory allows more: keeps progress ticks and interrupt
# points coming on big batches.
MAX_BATCH = 16
# Latent tile sizes tried, largest first, when even a single image runs out of memory.
TILE_SIZES = (16, 8, 4)

log = logging.getLogger("PS-VAE")


def choose_dtype(choice: str, device: torch.device, auto: Callable[[], torch.dtype]) -> torch.dtype:
    """"auto" = ComfyUI's choice (honours --fp16-vae/--bf16-vae/--fp32-vae etc.); otherwise the
    named dtype, except fp16 on a CPU, which is slow and partly unsupported there: fp32 instead."""
    if choice == "auto":
        return auto()
    if choice not in _DTYPES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {choice!r}")
    dtype = _DTYPES[choice]
    if dtype == torch.float16 and mm.is_device_cpu(device):
        log.warning("PS-VAE: fp16 is not used on the CPU; running in fp32 instead")
        return torch.float32
    return dtype


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


class PSVAEHandle:
    """What the loader's `vae` output carries: a PSVAE in a ModelPatcher, plus its dtype."""

    def __init__(self, model, name: str, dtype: torch.dtype, load_device, offload_device, path: Optional[str] = None):
        stats = {k: getattr(model, k).detach().float().clone() for k in ("latents_mean", "latents_std")}
        # CPU float32 copies of the small per-channel tensors the samplers need on every step
        # (normalisation and the latent -> RGB preview), wherever the weights are at the time.
        self._small = {k: getattr(model, k).detach().float().cpu().clone()
                       for k in ("latents_mean", "latents_std", "latent_rgb_weight", "latent_rgb_bias")}
        model = model.to(dtype=dtype).eval().requires_grad_(False)
        for k, v in stats.items():  # the latent stats stay fp32 whatever the weights are
            getattr(model, k).data = v
        self.model = model
        self.name = name
        self.path = path
        self.dtype = dtype
        self._fingerprint: Optional[str] = None
        self.patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)

    # --- facts about the model ---------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.model.latent_channels)

    @property
    def upsample_factor(self) -> int:
        return int(self.model.upsample_factor)

    @property
    def load_device(self) -> torch.device:
        return self.patcher.load_device

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        gh, gw = self.model.latent_grid(height, width)
        return int(gh), int(gw)

    @property
    def input_size(self) -> Optional[int]:
        """The square size every image is resized to before the encoder, or None ("native" grid)."""
        size = self.model.config.encoder.image_size
        return int(size) if size is not None else None

    @property
    def fixed_grid(self) -> Optional[tuple[int, int]]:
        """The one latent grid this VAE makes (16x16 for 224-px encoders), or None for a native grid."""
        size = self.input_size
        return self.latent_grid(size, size) if size is not None else None

    @property
    def patch_size(self) -> int:
        return int(self.model.encoder.patch_size)

    @property
    def fingerprint(self) -> Optional[str]:
        """sha256 identity of the file (psvae_core.checkpoint.fingerprint); None for a model not loaded from a file."""
        if self._fingerprint is None and self.path is not None:
            self._fingerprint = vae_fingerprint(self.path)
        return self._fingerprint

    @property
    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._small["latents_mean"], self._small["latents_std"]

    # --- the generator's space and the live preview (cheap; any device) ---------------------------
    def _stat(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self._small[key].to(device=like.device, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (LATENT dicts, the decoder's input) -> the generator's normalised space (float32)."""
        return (raw.float() - self._stat("latents_mean", raw)) / self._stat("latents_std", raw)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The generator's normalised latents -> raw latents (float32)."""
        return latents.float() * self._stat("latents_std", latents) + self._stat("latents_mean", latents)

    def preview(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents [B,C,h,w] -> [B,3,h,w] colours in 0..1 (PSVAE.preview; grey when not fitted)."""
        return latent_to_rgb(raw.float(), self._small["latent_rgb_weight"], self._small["latent_rgb_bias"])

    # --- memory estimates (bytes per image; deliberately generous) ---------------------------------
    def _elem(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def decode_memory(self, h: int, w: int) -> int:
        f = self.upsample_factor
        cfg = self.model.config.pixel_decoder
        width = cfg.base_channels * max(cfg.channel_mult) if cfg.kind == "conv" else cfg.vit_width
        pixels = (h * f) * (w * f)
        return int(pixels * max(cfg.base_channels, 32) * 8 * self._elem() + h * w * width * 16 * self._elem()
                   + (h * w) ** 2 * 4 * self._elem())

    def encode_memory(self, h: int, w: int) -> int:
        gh, gw = self.latent_grid(h, w)
        tokens = gh * gw + 8
        width = int(getattr(self.model.encoder, "hidden_size", 768))
        return int(3 * h * w * 4 * 4 + tokens * width * 24 * self._elem() + tokens * tokens * 16 * self._elem())

    def load(self, memory_required: int) -> torch.device:
        # Fully loaded: psvae_core modules are plain torch modules without ComfyUI's cast-weight
        # hooks, so a partial (lowvram) load would leave weights on the wrong device. Other models
        # are unloaded to make room instead.
        mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        return self.load_device

    def batch_size(self, per_item: int, total: int) -> int:
        free = mm.get_free_memory(self.load_device)
        return max(1, min(total, MAX_BATCH, int(free // max(per_item, 1))))


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
        raise ValueError(f"PS-VAE Encode: a {h}x{w} image gives a {gh}x{gw} latent grid, which would decode to "
                         f"more than {MAX_SIDE} px per side; scale the image down first")
    per_item = handle.encode_memory(h, w)
    device = handle.load(per_item)
    batch = handle.batch_size(per_item, b)
    out_device = mm.intermediate_device()
    out: Optional[torch.Tensor] = None
    pbar = comfy.utils.ProgressBar(b)

    def encode_chunk(start: int, size: int) -> torch.Tensor:
        chunk = x[start:start + size].to(device=device, dtype=handle.dtype)
        with torch.inference_mode():
            z = handle.model.encode(chunk).mode()
        return z.to(out_device).float()

    i = 0
    while i < b:
        mm.throw_exception_if_processing_interrupted()
        z = unless_out_of_memory(encode_chunk, i, batch)
        if z is None:
            if batch == 1:
                raise MemoryError("PS-VAE Encode: out of memory encoding a single image; close other workflows, "
                                  "free memory (Manager -> Unload models) or use a smaller image")
            batch = max(1, batch // 2)
            log.warning("PS-VAE Encode: out of memory, retrying with batches of %d", batch)
            continue
        if out is None:
            out = torch.empty((b,) + tuple(z.shape[1:]), dtype=torch.float32, device=out_device)
        out[i:i + z.shape[0]] = z
        i += z.shape[0]
        pbar.update(z.shape[0])
    return out


# --------------------------------------------------------------------------------------- decode

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
        raise ValueError(f"{who}: a {h}x{w} latent decodes to {h * f}x{w * f} px, above the {MAX_SIDE} px "
                         "limit per side; use a smaller latent")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{who}: the {what} contains NaN or Inf values; the node that made it failed "
                         "(with fp16, try bf16 or fp32)")
    return samples


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
    batch = handle.batch_size(per_item, b)
    out_device = mm.intermediate_device()
    out = torch.empty((b, 3, h * f, w * f), dtype=torch.float32, device=out_device)
    pbar = comfy.utils.ProgressBar(b)

    def run(z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return handle.model.decode(z.to(device=device, dtype=handle.dtype))

    tiles = [t for t in TILE_SIZES if t < max(h, w)] or [max(1, max(h, w) // 2)]

    def decode_chunk(start: int, size: int, level: int) -> torch.Tensor:
        chunk = samples[start:start + size]
        if level < 0:
            return run(chunk).to(out_device).float()
        t = tiles[level]
        return decode_tiled(run, chunk, f, tile=t, overlap=max(1, t // 4), out_device=out_device)

    i = 0
    tile_level = -1  # -1: whole images; k >= 0: tiles of TILE_SIZES[k]
    while i < b:
        mm.throw_exception_if_processing_interrupted()
        img = unless_out_of_memory(decode_chunk, i, batch, tile_level)
        if img is None:
            if batch > 1:
                batch = max(1, batch // 2)
                log.warning("PS-VAE Decode: out of memory, retrying with batches of %d", batch)
            elif tile_level + 1 < len(tiles):
                tile_level += 1
                log.warning("PS-VAE Decode: out of memory, retrying with tiled decoding (%d-latent tiles)",
                            tiles[tile_level])
            else:
                raise MemoryError("PS-VAE Decode: out of memory even with tiled decoding; free memory "
                                  "(Manager -> Unload models), start ComfyUI with --lowvram, or decode a "
                                  "smaller latent")
            continue
        if handle.dtype == torch.float16 and not torch.isfinite(img).all():
            raise ValueError("PS-VAE Decode: fp16 overflowed (NaN/Inf in the decoded image); set the loader's "
                             "dtype to bf16 or fp32")
        n = img.shape[0]
        out[i:i + n] = img.clamp(0.0, 1.0)
        i += n
        pbar.update(n)
    return out.movedim(1, -1)
