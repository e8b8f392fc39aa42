"""The trainer's one tensor cache (docs/GENERATOR_DATA.md §3): frozen-encoder features (svae / rae,
`data.cache_dir`) and PS-VAE latents (the generator stages, `data.latent_cache`) alike, and the
caption table of tar shards, so training on shards runs map-style from the cache (with the loop's
exact-resume sampler) after one pass over them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from psvae_core.checkpoint import fingerprint as vae_fingerprint
from psvae_core.dtypes import DTYPES
from psvae_core.generation import encode_source

from .captions import PathLike, TarShardStream
from .images import IMAGE_SIZE, RESIZE_RULE
from .report import BadSample, DataError, DataReport

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
LATENT = "posterior-mean-raw"  # what the generator stages cache: PSVAE.encode(x).mode(), not normalised
FEATURES = "encoder-features"  # what svae / rae cache: the frozen representation encoder's output


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def module_fingerprint(module: torch.nn.Module, config: dict) -> str:
    """sha256 over a live module's config and every tensor of its state (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TensorCache:
    """One tensor per sample key, in safetensors shards under `<root>/<cache id>/`, the id a hash of
    the identity (model fingerprint, what is stored, crop size and rule, dtype; layout:
    docs/GENERATOR_DATA.md §3). Shards are written atomically under unique names, so ranks may fill
    one cache at once. The index is 16 bytes a tensor (sorted 64-bit key hashes + shard/row: ~175 MB
    for CC12M's 10.9M), shared copy-on-write by forked DataLoader workers."""

    _MERGE_EVERY = 1 << 18  # recent writes kept in a dict until merged into the sorted index

    def __init__(self, root: PathLike, model: str, stores: str, size: int = IMAGE_SIZE,
                 dtype: torch.dtype = torch.float16, shard_size: int = 4096):
        if dtype not in DTYPES.values():
            raise ValueError(f"cache dtype must be one of {list(DTYPES)}, not {dtype}")
        self.root, self.size, self.dtype, self.shard_size = Path(root), size, dtype, shard_size
        self.identity = {"format": CACHE_FORMAT, "model": model, "stores": stores, "size": size,
                         "resize": RESIZE_RULE, "dtype": _dtype_name(dtype)}
        self.cache_id = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = self.root / self.cache_id
        self._shards: list[str] = []
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._where = np.zeros((0, 2), dtype=np.int64)  # (shard number, row) per sorted hash
        self._recent: dict[int, tuple[int, int]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: dict[tuple[int, str], Any] = {}
        self.refresh()

    @classmethod
    def for_latents(cls, root: PathLike, vae_file: PathLike, size: int = IMAGE_SIZE,
                    dtype: torch.dtype = torch.float16, **kwargs) -> "TensorCache":
        """The latents of the VAE file `vae_file` (its fingerprint: re-saving the same weights keeps it)."""
        return cls(root, vae_fingerprint(vae_file), LATENT, size, dtype, **kwargs)

    def __repr__(self):
        return f"TensorCache({self.folder}, {len(self)} {self.identity['stores']})"

    # -- index
    def refresh(self) -> None:
        """Re-read the shard list (after other processes wrote theirs)."""
        from safetensors import safe_open

        self._check_folder()
        shards, hashes, where = [], [], []
        for shard in sorted(self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else []:
            with safe_open(str(shard), framework="pt") as f:
                keys = json.loads((f.metadata() or {}).get("keys", "[]"))
            number = len(shards)
            shards.append(shard.name)
            hashes += [_key_hash(k) for k in keys]
            where += [(number, row) for row in range(len(keys))]
        self._shards, self._recent = shards, {}
        self._set_index(np.array(hashes, dtype=np.uint64), np.array(where, dtype=np.int64).reshape(-1, 2))

    def _set_index(self, hashes: np.ndarray, where: np.ndarray) -> None:
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._where = hashes[order], where[order]

    def _merge_recent(self) -> None:
        if self._recent:
            hashes = np.fromiter(self._recent.keys(), dtype=np.uint64, count=len(self._recent))
            where = np.array(list(self._recent.values()), dtype=np.int64).reshape(-1, 2)
            self._set_index(np.concatenate([self._hashes, hashes]), np.concatenate([self._where, where]))
            self._recent = {}

    def _locate(self, key: str) -> Optional[tuple[int, int]]:
        h = _key_hash(key)
        i = int(np.searchsorted(self._hashes, np.uint64(h)))
        if i < len(self._hashes) and int(self._hashes[i]) == h:
            return int(self._where[i, 0]), int(self._where[i, 1])
        return self._recent.get(h)

    def _check_folder(self) -> None:
        info = self.folder / "cache.json"
        if info.is_file() and json.loads(info.read_text()) != self.identity:
            raise DataError(f"{self.folder} holds tensors of another model or preprocessing than its name says; "
                            "delete the folder")

    def __len__(self) -> int:
        return len(self._hashes) + len(self._recent) + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._pending or self._locate(key) is not None

    # -- read
    def _handle(self, shard: str):
        from safetensors import safe_open

        slot = (os.getpid(), shard)  # a DataLoader worker opens its own
        if slot not in self._handles:
            self._handles[slot] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[slot]

    def get(self, key: str) -> torch.Tensor:
        """The tensor of `key` as float32."""
        if key in self._pending:
            return self._pending[key].float()
        found = self._locate(key)
        if found is None:
            raise KeyError(f"{key!r} is not in the cache {self.folder}; run fill_cache first")
        shard, row = found
        return self._handle(self._shards[shard]).get_slice("tensors")[row:row + 1][0].float()

    # -- write
    def add(self, keys: Sequence[str], tensors: torch.Tensor) -> None:
        if len(keys) != tensors.shape[0]:
            raise ValueError(f"{len(keys)} keys for {tensors.shape[0]} tensors")
        stored = tensors.detach().to("cpu", self.dtype)
        if not torch.isfinite(stored).all():
            bad = [k for k, row in zip(keys, stored) if not torch.isfinite(row).all()]
            raise DataError(f"non-finite values (NaN/Inf, or beyond {_dtype_name(self.dtype)}'s range) for "
                            f"{bad[:3]}; check those images, or cache in float32")
        for key, row in zip(keys, stored):
            if key not in self:
                self._pending[key] = row.clone()
        while len(self._pending) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        """Write every buffered tensor (shards of at most `shard_size`)."""
        while self._pending:
            self._write(self.shard_size)

    def _write(self, count: int) -> None:
        from safetensors.torch import save_file

        keys = list(self._pending)[:count]
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "cache.json"
        if not info.is_file():
            tmp = info.with_name(f".cache.json.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(self.identity, indent=2, sort_keys=True))
            os.replace(tmp, info)
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"tensors": torch.stack([self._pending[k] for k in keys]).contiguous()}, str(tmp),
                  metadata={"keys": json.dumps(keys), "cache_id": self.cache_id})
        os.replace(tmp, self.folder / name)
        number = len(self._shards)
        self._shards.append(name)
        for row, key in enumerate(keys):
            self._recent[_key_hash(key)] = (number, row)
            del self._pending[key]
        if len(self._recent) >= self._MERGE_EVERY:
            self._merge_recent()

    def __getstate__(self):  # picklable for DataLoader workers; open handles stay behind
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


encode_latents = partial(encode_source, normalize=False)  # (vae, images 0..1) -> what LATENT names


def _cache_key(key: str, name: str) -> str:
    return key if name == "image" else f"{key}#{name}"


def fill_cache(cache: TensorCache, dataset, encode: Callable[[torch.Tensor], torch.Tensor], *,
               batch_size: int = 32, num_workers: int = 0, rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] = lambda: None, log: Callable[[str], None] = logger.info) -> dict:
    """Encode what `cache` lacks of this rank's share (i % world_size == rank) of a map-style `dataset`:
    each of its `fields` ("image", plus "source" of edits, stored as `key#source`). Every rank must
    call it: it ends with `barrier()`, then sees all ranks' shards. Returns {"encoded", "cached", "total"}."""
    size = getattr(dataset, "size", cache.size)
    if size != cache.size:
        raise ValueError(f"the dataset crops to {size} px but the cache was made for {cache.size} px")
    fields = tuple(dataset.fields)
    mine = range(rank, len(dataset), world_size)
    todo = [i for i in mine if any(_cache_key(dataset.key(i), f) not in cache for f in fields)]
    chunks = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers)
    for chunk, batch in zip(chunks, loader):
        for name in fields:
            cache.add([_cache_key(dataset.key(i), name) for i in chunk], encode(batch[name]).cpu())
    cache.flush()
    barrier()
    cache.refresh()
    stats = {"encoded": len(todo), "cached": len(mine) - len(todo), "total": len(cache)}
    log(f"cache {cache.folder}: {stats['encoded']} encoded, {stats['cached']} already cached (rank {rank})")
    return stats


class CachedDataset(Dataset):
    """`dataset` with its cached tensors (float32) under `name`, or `<field>_<name>` for "source": beside
    `dataset[i]` with `with_item` (the VAE stages keep the pixels), else beside {"key", "text"} alone
    (no image decoded). A sample missing from the cache is left out and counted as "not_cached"."""

    def __init__(self, dataset, cache: TensorCache, name: str = "latent", with_item: bool = False):
        self.dataset, self.cache, self.name, self.with_item = dataset, cache, name, with_item
        self.fields = tuple(dataset.fields)
        self._report = DataReport(f"{getattr(dataset, 'source', 'images')} via {cache.folder}", "cache",
                                  found=len(dataset))
        self.indices = []
        for i in range(len(dataset)):
            key = dataset.key(i)
            if all(_cache_key(key, f) in cache for f in self.fields):
                self.indices.append(i)
            else:
                self._report.skip("not_cached", key)
        self._report.used = len(self.indices)
        if not self.indices:
            raise self._report.empty_error("Run fill_cache(cache, dataset, encode) first.")
        if self._report.skipped:
            logger.warning("%s", self._report.summary())

    def report(self) -> dict:
        return self._report.to_dict()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        i = self.indices[index]
        key = self.dataset.key(i)
        item = dict(self.dataset[i]) if self.with_item else {"key": key, "text": self.dataset.text(i)}
        for f in self.fields:
            item[self.name if f == "image" else f"{f}_{self.name}"] = self.cache.get(_cache_key(key, f))
        return item


# ================================================================================== tar caption tables

class StringTable:
    """Many strings in two files: `<prefix>.bin` (utf-8, concatenated) and `<prefix>.idx.npy`
    (int64 offsets, n + 1), memory-mapped on read (shared by DataLoader workers, no Python objects)."""

    def __init__(self, prefix: Path):
        self.prefix, self._blob, self._offsets = prefix, None, None

    @staticmethod
    def files(prefix: Path) -> tuple[Path, Path]:
        return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx.npy")

    def _open(self):
        if self._offsets is None:
            blob, idx = self.files(self.prefix)
            self._offsets = np.load(idx, mmap_mode="r")
            self._blob = np.memmap(blob, dtype=np.uint8, mode="r") if self._offsets[-1] > 0 else np.zeros(0, np.uint8)

    def __len__(self):
        self._open()
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        self._open()
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        return bytes(self._blob[a:b]).decode("utf-8")

    def __getstate__(self):
        return {"prefix": self.prefix, "_blob": None, "_offsets": None}


class StringWriter:
    """Appends strings to a `StringTable`'s files (temporary names until `close`)."""

    def __init__(self, prefix: Path):
        self.prefix = prefix
        self.blob_path, self.idx_path = StringTable.files(prefix)
        self._tmp = self.blob_path.with_name("." + self.blob_path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self.offsets = [0]

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def append_table(self, prefix: Path) -> None:
        """Append every string of the table at `prefix`, then delete its files."""
        blob, idx = StringTable.files(prefix)
        offsets = np.load(idx)
        with open(blob, "rb") as f:
            shutil.copyfileobj(f, self._file)
        base = self.offsets[-1]
        self.offsets.extend((offsets[1:] + base).tolist())
        blob.unlink()
        idx.unlink()

    def close(self) -> None:
        self._file.close()
        tmp_idx = self.idx_path.with_name("." + self.idx_path.name + ".tmp.npy")
        np.save(tmp_idx, np.asarray(self.offsets, dtype=np.int64))
        os.replace(self._tmp, self.blob_path)
        os.replace(tmp_idx, self.idx_path)


class TarCaptionTable:
    """The (key, caption) list of tar shards beside their latents, shaped like a map-style caption set
    (`key(i)`, `text(i)`, `fields`, `source`) for `CachedDataset`."""

    fields = ("image",)

    def __init__(self, prefix: Path, source: str):
        self.keys = StringTable(prefix.with_name(prefix.name + ".keys"))
        self.texts = StringTable(prefix.with_name(prefix.name + ".texts"))
        self.source = source

    def __len__(self):
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i]

    def text(self, i: int) -> str:
        return self.texts[i]


@torch.no_grad()
def fill_cache_from_tar(stream: TarShardStream, cache: TensorCache, encode: Callable[[torch.Tensor], torch.Tensor],
                        *, batch_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                        barrier: Callable[[], None] = lambda: None,
                        log: Callable[[str], None] = logger.info) -> tuple[TarCaptionTable, dict]:
    """Stream the shards once (each rank its share): encode what the cache lacks and record every
    (key, caption) in a table beside the latents, which later runs reuse without reading a shard.
    Every rank must call it (barriers). Returns the table and {"encoded", "cached", "table"}."""
    ident = {"shards": [[s, os.path.getsize(s)] for s in stream.shards], "text_fields": list(stream.text_fields),
             "min_side": stream.min_side}
    table_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    prefix = cache.folder / f"captions-{table_id}"
    done = prefix.with_name(prefix.name + ".json")
    source = stream.source
    if done.is_file():
        info = json.loads(done.read_text())
        log(f"latent cache: reusing {info['count']} tar samples of {prefix}")
        return TarCaptionTable(prefix, source), {"encoded": 0, "cached": info["count"], "table": str(prefix)}
    cache.folder.mkdir(parents=True, exist_ok=True)
    part = prefix.with_name(f"{prefix.name}.part{rank}-of-{world_size}")
    keys, texts = StringWriter(part.with_name(part.name + ".keys")), StringWriter(part.with_name(part.name + ".texts"))
    mine = copy.copy(stream)
    mine.rank, mine.world_size = rank, world_size
    items = mine if num_workers == 0 else torch.utils.data.DataLoader(mine, batch_size=None, num_workers=num_workers)
    stats, batch = Counter(), []

    def encode_batch():
        cache.add([it["key"] for it in batch], encode(torch.stack([it["image"] for it in batch])).cpu())
        stats["encoded"] += len(batch)
        batch.clear()

    try:
        for item in items:
            keys.add(item["key"])
            texts.add(item["text"])
            if item["key"] in cache:
                stats["cached"] += 1
                continue
            batch.append(item)
            if len(batch) == batch_size:
                encode_batch()
        if batch:
            encode_batch()
        cache.flush()
    except BadSample as bad:
        raise DataError(f"tar shards: {bad}") from None
    keys.close()
    texts.close()
    log(f"latent cache: {stats['encoded']} tar samples encoded, {stats['cached']} already cached (rank {rank})")
    barrier()
    if rank == 0:
        count = 0
        for field_name in ("keys", "texts"):
            out = StringWriter(prefix.with_name(f"{prefix.name}.{field_name}"))
            for r in range(world_size):
                out.append_table(prefix.with_name(f"{prefix.name}.part{r}-of-{world_size}.{field_name}"))
            out.close()
            count = len(out.offsets) - 1
        tmp = done.with_name("." + done.name + ".tmp")
        tmp.write_text(json.dumps({"count": count, **ident}) + "\n")
        os.replace(tmp, done)  # written last: marks the table complete
    barrier()
    cache.refresh()  # every rank's latents
    return TarCaptionTable(prefix, source), {"encoded": stats["encoded"], "cached": stats["cached"], "table": str(prefix)}
