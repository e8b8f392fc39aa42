"""The one table of dtype names: the full names the trainer's configs and the benchmarks take
(`export.dtype`, `data.latent_cache_dtype`, `--dtype`), and the short ones of ComfyUI's widgets and
Accelerate's `precision.mixed`. Both spellings stay what users type; both resolve here."""
from __future__ import annotations

from typing import Literal, get_args

import torch

DType = Literal["float32", "bfloat16", "float16"]  # storage dtypes (exports, caches, benchmarks)
DTYPES: dict[str, torch.dtype] = dict(zip(get_args(DType), (torch.float32, torch.bfloat16, torch.float16)))
SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def to_dtype(name: str) -> torch.dtype:
    """"float32" / "fp32" -> torch.float32, and so on; any other name is a ValueError listing the choices."""
    dtype = DTYPES.get(SHORT_NAMES.get(name, name))
    if dtype is None:
        raise ValueError(f"dtype must be one of {[*DTYPES, *SHORT_NAMES]}, got {name!r}")
    return dtype
