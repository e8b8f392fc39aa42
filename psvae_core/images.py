"""User images -> the one tensor form every model takes: [B,3,H,W] float32 in 0..1.

Rules (documented in README "Image input"):
- torch tensors are channels-first ([C,H,W] or [B,C,H,W]); numpy arrays and PIL images are
  channels-last ([H,W], [H,W,C] or [B,H,W,C]), as those libraries store them.
- uint8 is divided by 255, uint16 by 65535; float must already be in 0..1 (a drift of 1e-3 is
  clamped, anything further is an error that says how to convert). Each image of a list is scaled
  by its own dtype. PIL modes I;16 and I (16-bit grey) are divided by 65535; mode F is float.
- Empty, meta-device and sparse tensors and non-numeric numpy arrays are errors.
- 1 channel is repeated to RGB; 4 channels (RGBA) are composited over `background` (white by
  default); 2 channels (grey + alpha) likewise.
- NaN or Inf anywhere is an error, never propagated.
- Sides must lie in [MIN_SIDE, MAX_SIDE]; size changes (to the encoder's grid) are the encoder's
  documented resize, never done silently here. Messages write sizes width x height (`size_text`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

MIN_SIDE = 8
MAX_SIDE = 8192
RANGE_TOLERANCE = 1e-3
_INTEGER_SCALES = {torch.uint8: 255.0, **({torch.uint16: 65535.0} if hasattr(torch, "uint16") else {})}


def size_text(height: int, width: int) -> str:
    """A size for messages: width x height, as image tools and ComfyUI's widgets write it (tensors
    store height first)."""
    return f"{int(width)}x{int(height)}"


class ImageInputError(ValueError):
    """An image the models cannot take; the message says what is wrong and how to fix it."""


# PIL modes whose pixels are not 8-bit: read as arrays and scaled by what the mode holds.
_PIL_INT16 = ("I;16", "I;16L", "I;16B", "I;16N")  # 0..65535
_PIL_INT32 = "I"  # 32-bit signed; PNG decoders put 16-bit grey here, so 0..65535
_PIL_FLOAT = "F"  # 32-bit float, taken as 0..1 like any float image


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise ImageInputError(f"numpy dtype {array.dtype} is not an image dtype; pass uint8 (0..255), uint16 "
                              "(0..65535) or float (0..1)")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[None]
    if array.ndim != 4:
        raise ImageInputError(f"a numpy image must be [H,W], [H,W,C] or [B,H,W,C]; got shape {array.shape}")
    # np.array(dtype=native): a writable copy, in native byte order (big-endian I;16B included)
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("="))).permute(0, 3, 1, 2)


def _from_pil(image) -> torch.Tensor:
    if image.mode in _PIL_INT16:
        return _from_numpy(np.asarray(image).astype(np.uint16))
    if image.mode == _PIL_INT32:
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageInputError(f"a mode-I PIL image must hold 0..65535 (16-bit) values, got "
                                  f"{values.min()}..{values.max()}; convert it to 8- or 16-bit first")
        return _from_numpy(values.astype(np.uint16))
    if image.mode == _PIL_FLOAT:
        return _from_numpy(np.asarray(image, dtype=np.float32))
    mode = image.mode if image.mode in ("L", "LA", "RGB", "RGBA") else "RGBA"
    return _from_numpy(np.asarray(image.convert(mode)))


def _check_tensor(x: torch.Tensor) -> torch.Tensor:
    if x.is_meta:
        raise ImageInputError("the image tensor is on the meta device and has no data; pass a materialised tensor")
    if x.layout != torch.strided:
        raise ImageInputError(f"sparse image tensors ({x.layout}) are not supported; call .to_dense() first")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ImageInputError(f"a tensor image must be [C,H,W] or [B,C,H,W]; got shape {tuple(x.shape)}")
    return x


def _as_unit_float(images: Any) -> torch.Tensor:
    """[B,C,H,W] float in 0..1; each image of a list is scaled by its own dtype."""
    if isinstance(images, torch.Tensor):
        x = _check_tensor(images)
    elif isinstance(images, np.ndarray):
        x = _from_numpy(images)
    elif _is_pil(images):
        x = _from_pil(images)
    elif isinstance(images, (list, tuple)):
        if not images:
            raise ImageInputError("the image list is empty; pass at least one image")
        parts = [_as_unit_float(im) for im in images]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise ImageInputError(f"images in one batch must share channels and size; got {sorted(shapes)}. "
                                  "Resize them to one size first or encode them separately.")
        return torch.cat(parts)
    else:
        raise ImageInputError(f"unsupported image type {type(images).__name__}; pass a torch tensor, numpy array or PIL image")
    if x.numel() == 0:
        raise ImageInputError(f"the image is empty (shape [B,C,H,W] = {list(x.shape)}); pass at least one "
                              "image with channels and pixels")
    return _to_unit_float(x)


def _is_pil(images: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(images, Image.Image)


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in _INTEGER_SCALES:
        return x.float() / _INTEGER_SCALES[x.dtype]
    if x.dtype == torch.bool or not x.is_floating_point():
        raise ImageInputError(f"image dtype {x.dtype} is not supported; pass uint8 (0..255) or float (0..1)")
    x = x.float()
    # One host sync for both checks (this runs on every encode, training steps included):
    # min/max propagate NaN and reach +-Inf, so non-finite values show up in them.
    lo, hi = (float(v) for v in torch.stack(torch.aminmax(x)).tolist())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = (~torch.isfinite(x)).sum().item()
        raise ImageInputError(f"the image contains {bad} NaN/Inf value(s); fix the upstream step that produced them")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = "divide by 255 (or pass uint8)" if hi > 2 else "map [-1,1] to [0,1] with (x + 1) / 2"
        raise ImageInputError(f"float images must be in 0..1, got values in [{lo:.4g}, {hi:.4g}]; {hint}")
    return x.clamp(0.0, 1.0)


def to_model_images(images: Any, *, background: float = 1.0) -> torch.Tensor:
    """Validate and convert `images` to [B,3,H,W] float32 in 0..1 (see the module rules)."""
    x = _as_unit_float(images)
    channels = x.shape[1]
    if channels in (2, 4):  # colour + alpha: composite over the background
        colour, alpha = x[:, :-1], x[:, -1:]
        x = colour * alpha + background * (1.0 - alpha)
        channels -= 1
    if channels == 1:
        x = x.expand(-1, 3, -1, -1)
    elif channels != 3:
        raise ImageInputError(f"images need 1, 2, 3 or 4 channels (channels-first for tensors); got {channels}. "
                              "A ComfyUI IMAGE is [B,H,W,C]: move the channel axis first.")
    h, w = x.shape[-2:]
    if min(h, w) < MIN_SIDE or max(h, w) > MAX_SIDE:
        raise ImageInputError(f"image size {size_text(h, w)} (width x height) is outside the supported "
                              f"{MIN_SIDE}..{MAX_SIDE} px per side; resize it first")
    return x.contiguous()


def resize_center_crop(image, size: int):
    """PIL image -> `size`x`size` RGB: shorter side resized to `size` (bicubic), centre crop.

    The data rule of the trainer and the demo (ImageNet-style); models never crop on their own.
    """
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))
