"""Optional cache of frozen-encoder features for stage 1 (and RAE), where the encoder never changes.

One float16 `.npy` memory map per (encoder weights, encoder config, image list, crop size),
`[N, D, h, w]`, filled once by all processes (each its shard) and reused by later runs; a `.json`
beside it is written last and marks it complete. A different encoder or data set gets a new key,
so a stale cache is never read.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .sampling import shard_indices


def cache_key(encoder: torch.nn.Module, encoder_config: dict, names: list[str], size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(encoder_config, sort_keys=True, default=str).encode())
    h.update(json.dumps([names, size]).encode())
    with torch.no_grad():  # a cheap fingerprint of the weights: per-tensor sums and a few values
        for name, t in encoder.state_dict().items():
            flat = t.detach().float().flatten()
            h.update(name.encode())
            h.update(np.asarray([flat.double().sum().item(), *flat[:8].tolist()], dtype=np.float64).tobytes())
    return h.hexdigest()[:20]


class CachedFeatures(Dataset):
    """Wraps an image dataset; each item also gets `features` from the memory map."""

    def __init__(self, dataset: Dataset, path: Path):
        self.dataset, self.path, self._array = dataset, path, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if self._array is None:  # opened lazily: each DataLoader worker maps the file itself
            self._array = np.load(self.path, mmap_mode="r")
        item = dict(self.dataset[i])
        item["features"] = torch.from_numpy(np.array(self._array[i], dtype=np.float32))
        return item


@torch.no_grad()
def build_cache(dataset: Dataset, encode, folder: Path, key: str, ctx, batch_size: int, barrier) -> Path:
    """Fill (or reuse) the cache for `dataset`; `encode(images float 0..1) -> features [B,D,h,w]`."""
    folder.mkdir(parents=True, exist_ok=True)
    path, meta = folder / f"features_{key}.npy", folder / f"features_{key}.json"
    if meta.is_file():
        ctx.log(f"feature cache: reusing {path}")
        return path
    n = len(dataset)
    first = dataset[0]["image"][None].to(ctx.device).float() / 255
    shape = tuple(encode(first).shape[1:])
    if ctx.rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, *shape)).flush()
    barrier()
    array = np.load(path, mmap_mode="r+")
    mine = shard_indices(n, ctx.world_size, ctx.rank)
    ctx.log(f"feature cache: encoding {n} images into {path}")
    for s in range(0, len(mine), batch_size):
        idx = mine[s:s + batch_size]
        images = torch.stack([dataset[i]["image"] for i in idx]).to(ctx.device).float() / 255
        array[idx[0]:idx[-1] + 1] = encode(images).float().cpu().numpy().astype(np.float16)
    array.flush()
    del array
    barrier()
    if ctx.rank == 0:
        meta.write_text(json.dumps({"count": n, "shape": list(shape), "dtype": "float16"}) + "\n")
    barrier()
    return path
