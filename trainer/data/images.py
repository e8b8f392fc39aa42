"""The one image rule of the trainer (docs/GENERATOR_DATA.md §1): a file, bytes or PIL image becomes a
uint8 `[3,S,S]` crop (`read_crop`, what DataLoader workers ship) or float32 0..1 (`load_image`);
`to_pil` is the way back, for every image the trainer saves."""
from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from psvae_core.images import resize_center_crop

from .report import BadSample

IMAGE_SIZE = 256  # the paper's training and evaluation crop
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
RESIZE_RULE = "shorter-side-bicubic+centre-crop"  # part of the latent cache's identity: keep the string
DESCRIPTION = ("EXIF orientation applied, transparency composited over white, shorter side resized to the "
               "resolution with PIL bicubic, centre crop to resolution x resolution, uint8 "
               "(trainer.data.images, psvae_core.images.resize_center_crop)")
# What PIL raises for a file that is not a readable image.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)

CHECK_THREADS = 8  # image files checked at once when a source is scanned

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


def is_image_name(name: Union[str, os.PathLike]) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def files_under(root: Path) -> list[Path]:
    """Every file under `root`, as paths relative to it, sorted by their POSIX form: recursive,
    folder links followed (each real folder once), hidden files and folders skipped."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        dirs[:] = [] if real in seen else [d for d in dirs if not d.startswith(".")]
        if real not in seen:
            seen.add(real)
            found += [Path(folder, f).relative_to(root) for f in files
                      if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))]
    return sorted(found, key=lambda p: p.as_posix())


def image_files(root, relative: bool = False) -> list[Path]:
    """The image files of `files_under(root)` (joined to `root` unless `relative`)."""
    root = Path(root)
    return [p if relative else root / p for p in files_under(root) if is_image_name(p)]


def open_rgb(source: ImageSource) -> Image.Image:
    """The decoded image as RGB, upright (EXIF) and with transparency over white; PIL errors pass."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette / DecompressionBomb notes
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB")


def read_crop(source: ImageSource, size: int = IMAGE_SIZE, min_side: int = 0,
              where: Optional[str] = None) -> torch.Tensor:
    """uint8 `[3,size,size]`; raises BadSample("missing_image" | "unreadable_image" | "too_small")."""
    where = where or (str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    try:
        image = open_rgb(source)
    except FileNotFoundError:
        raise BadSample("missing_image", where) from None
    except DECODE_ERRORS:
        raise BadSample("unreadable_image", where) from None
    if min(image.size) < max(min_side, 1):
        raise BadSample("too_small", where)
    return torch.from_numpy(np.asarray(resize_center_crop(image, size), dtype=np.uint8).copy()).permute(2, 0, 1)


def load_image(source: ImageSource, size: int = IMAGE_SIZE, min_side: int = 0,
               where: Optional[str] = None) -> torch.Tensor:
    """`read_crop` as float32 in 0..1."""
    return read_crop(source, size, min_side, where).float().div_(255)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """0..1 float -> uint8 by round(255*x) after clamping: what saving a PNG does."""
    return (images.detach().float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image [3,H,W] in 0..1 -> RGB PIL (rounded as `to_uint8`): how every trainer output is saved."""
    return Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy())


def check_image_file(path: Path, min_side: int = 0, decode: bool = False) -> Optional[str]:
    """None if `path` looks usable, else why not: "missing", "empty", "too_small", "not_image" or
    "unreadable". Reads the header and runs PIL's verify; `decode` decodes the whole image too
    (catches truncated JPEGs, which verify does not)."""
    try:
        if not path.is_file():
            return "missing"
        if path.stat().st_size == 0:
            return "empty"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                if min(image.size) < max(min_side, 1):
                    return "too_small"
                if decode:
                    image.load()
                else:
                    image.verify()
    except UnidentifiedImageError:
        return "not_image"
    except DECODE_ERRORS:
        return "unreadable"
    return None


def check_image_files(paths: list[Path], min_side: int = 0, decode: bool = False) -> list[Optional[str]]:
    with ThreadPoolExecutor(CHECK_THREADS) as pool:  # the wait is on the disk
        return list(pool.map(lambda path: check_image_file(path, min_side, decode), paths))
