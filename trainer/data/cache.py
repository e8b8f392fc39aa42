"""The trainer's one tensor cache (docs/GENERATOR_DATA.md §3) of frozen-encoder features (svae / rae) and
PS-VAE latents (generator stages), and the caption table that lets tar shards train map-style from it."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from psvae_core.checkpoint import fingerprint as vae_fingerprint
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    """One tensor per sample key in safetensors shards under `<root>/<hash of the identity>/` (layout, ranks,
    index: docs/GENERATOR_DATA.md §3); the index arrays are shared copy-on-write by forked DataLoader workers."""

    _MERGE_EVERY = 1 << 18  # recent writes kept in a dict until merged into the sorted index

    def __init__(self, root: PathLike, model: str, stores: str, size: int = IMAGE_SIZE,
                 dtype: torch.dtype = torch.float16, shard_size: int = 4096):
        self.root, self.size, self.dtype, self.shard_size = Path(root), size, dtype, shard_size
        self.identity = {"format": CACHE_FORMAT, "model": model, "stores": stores, "size": size,
                         "resize": RESIZE_RULE, "dtype": _dtype_name(dtype)}
        self.cache_id = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = self.root / self.cache_id
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: dict[tuple[int, str], Any] = {}
        self.refresh()  # the index: shard names, sorted key hashes and their (shard number, row)

    @classmethod
    def for_latents(cls, root: PathLike, vae_file: PathLike, size: int = IMAGE_SIZE,
                    dtype: torch.dtype = torch.float16, **kwargs) -> "TensorCache":
        """The latents of the VAE file `vae_file` (its fingerprint: re-saving the same weights keeps it)."""
        return cls(root, vae_fingerprint(vae_file), LATENT, size, dtype, **kwargs)

    # -- index
    def refresh(self) -> None:
        """Re-read the shard list (after other processes wrote theirs)."""
        info = self.folder / "cache.json"
        if info.is_file() and json.loads(info.read_text()) != self.identity:
            raise DataError(f"{self.folder} holds tensors of another model or preprocessing than its name says; "
                            "delete the folder")
        shards, hashes, where = [], [], []
        for number, shard in enumerate(sorted(self.folder.glob("shard-*.safetensors"))):  # none: no folder yet
            with safe_open(str(shard), framework="pt") as f:
                keys = json.loads((f.metadata() or {}).get("keys", "[]"))
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

    def __len__(self) -> int:
        return len(self._hashes) + len(self._recent) + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._pending or self._locate(key) is not None

    # -- read
    def _handle(self, shard: str):
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
        stored = tensors.detach().to("cpu", self.dtype)
        if not torch.isfinite(stored).all():
            bad = [k for k, row in zip(keys, stored) if not torch.isfinite(row).all()]
            raise DataError(f"non-finite values (NaN/Inf, or beyond {_dtype_name(self.dtype)}'s range) for "
                            f"{bad[:3]}; check those images, or cache in float32")
        for key, row in zip(keys, stored):
            if key not in self:
                self._pending[key] = row.clone()
        while len(self._pending) >= self.shard_size:
            self._write()

    def flush(self) -> None:
        """Write every buffered tensor (shards of at most `shard_size`)."""
        while self._pending:
            self._write()

    def _write(self) -> None:
        keys = list(self._pending)[:self.shard_size]
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "cache.json").is_file():
            _write_atomic(self.folder / "cache.json", json.dumps(self.identity, indent=2, sort_keys=True))
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
    """Encode what `cache` lacks of this rank's share of a map-style `dataset`'s `fields` (keys and ranks:
    docs/GENERATOR_DATA.md §3; every rank calls it, barrier included). Returns {"encoded", "cached", "total"}."""
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


class StringTable:
    """Many strings in two files: `<prefix>.bin` (utf-8, concatenated) and `<prefix>.idx.npy`
    (int64 offsets, n + 1), memory-mapped on read (shared by DataLoader workers, no Python objects)."""

    def __init__(self, prefix: Path):
        self.prefix, self._blob, self._offsets = prefix, None, None

    def _open(self):
        if self._offsets is None:
            self._offsets = np.load(f"{self.prefix}.idx.npy", mmap_mode="r")
            empty = self._offsets[-1] == 0  # numpy cannot map an empty file
            self._blob = np.zeros(0, np.uint8) if empty else np.memmap(f"{self.prefix}.bin", np.uint8, mode="r")

    def __len__(self):
        self._open()
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        self._open()
        return bytes(self._blob[int(self._offsets[i]):int(self._offsets[i + 1])]).decode("utf-8")

    def __getstate__(self):
        return {"prefix": self.prefix, "_blob": None, "_offsets": None}


class StringWriter:
    """Appends strings to a `StringTable`'s files (temporary names until `close`)."""

    def __init__(self, prefix: Path):
        self.prefix, self.offsets = prefix, [0]
        self._tmp = prefix.with_name(f".{prefix.name}.bin.tmp")
        self._file = open(self._tmp, "wb")

    def add(self, text: str) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def append_table(self, prefix: Path) -> None:
        """Append every string of the table at `prefix`, then delete its files."""
        offsets = np.load(f"{prefix}.idx.npy")
        with open(f"{prefix}.bin", "rb") as f:
            shutil.copyfileobj(f, self._file)
        self.offsets.extend((offsets[1:] + self.offsets[-1]).tolist())
        os.remove(f"{prefix}.bin")
        os.remove(f"{prefix}.idx.npy")

    def close(self) -> None:
        self._file.close()
        tmp_idx = self.prefix.with_name(f".{self.prefix.name}.idx.tmp.npy")
        np.save(tmp_idx, np.asarray(self.offsets, dtype=np.int64))
        os.replace(self._tmp, f"{self.prefix}.bin")
        os.replace(tmp_idx, f"{self.prefix}.idx.npy")


class TarCaptionTable:
    """The (key, caption) list of tar shards beside their latents, shaped like a map-style caption set
    (`key(i)`, `text(i)`, `fields`, `source`) for `CachedDataset`."""

    fields = ("image",)

    def __init__(self, prefix: Path, source: str):
        self.keys, self.texts = StringTable(Path(f"{prefix}.keys")), StringTable(Path(f"{prefix}.texts"))
        self.key, self.text = self.keys.__getitem__, self.texts.__getitem__  # key(i), text(i) of a map-style set
        self.source = source

    def __len__(self):
        return len(self.keys)


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
    prefix = cache.folder / f"captions-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}"
    done = Path(f"{prefix}.json")
    if done.is_file():
        count = json.loads(done.read_text())["count"]
        log(f"latent cache: reusing {count} tar samples of {prefix}")
        return TarCaptionTable(prefix, stream.source), {"encoded": 0, "cached": count, "table": str(prefix)}
    cache.folder.mkdir(parents=True, exist_ok=True)
    part = f"{prefix}.part{rank}-of-{world_size}"
    keys, texts = StringWriter(Path(f"{part}.keys")), StringWriter(Path(f"{part}.texts"))
    mine = copy.copy(stream)
    mine.rank, mine.world_size = rank, world_size
    items = mine if num_workers == 0 else torch.utils.data.DataLoader(mine, batch_size=None, num_workers=num_workers)
    cached, batch = 0, []

    def encode_batch():
        cache.add([it["key"] for it in batch], encode(torch.stack([it["image"] for it in batch])).cpu())
        batch.clear()

    try:
        for item in items:
            keys.add(item["key"])
            texts.add(item["text"])
            if item["key"] in cache:
                cached += 1
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
    encoded = len(keys.offsets) - 1 - cached
    log(f"latent cache: {encoded} tar samples encoded, {cached} already cached (rank {rank})")
    barrier()
    if rank == 0:
        for name in ("keys", "texts"):
            out = StringWriter(Path(f"{prefix}.{name}"))
            for r in range(world_size):
                out.append_table(Path(f"{prefix}.part{r}-of-{world_size}.{name}"))
            out.close()
        _write_atomic(done, json.dumps({"count": len(out.offsets) - 1, **ident}) + "\n")  # last: marks it complete
    barrier()
    cache.refresh()  # every rank's latents
    return TarCaptionTable(prefix, stream.source), {"encoded": encoded, "cached": cached, "table": str(prefix)}
