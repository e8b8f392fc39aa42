"""Image data: sources (folder, manifest, HF `datasets` folder), checks, and the resumable sampler.

- A source is scanned once into a list of items; files that cannot be images are skipped and
  counted by reason in a `DataReport` (written to the run folder), never silently dropped.
- Every image becomes a `size` x `size` RGB crop (shorter side resized, centre crop: the
  project's data rule, `psvae_core.images.resize_center_crop`), returned as uint8 so workers ship
  4x less data; the encoder resizes it to its own input size (224) itself.
- `GlobalBatchSampler` cuts one seeded global sequence of optimiser steps into per-process
  micro-batches, so any layout of the same global batch (processes x batch x accumulation) sees
  exactly the same samples at each step, and the step is the only data position resume needs.
"""
from __future__ import annotations

import csv
import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from psvae_core.images import resize_center_crop

from .rng import derive_seed, micro_rows

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MANIFEST_SUFFIXES = {".jsonl", ".csv"}
MANIFEST_KEYS = ("path", "file_name", "image", "file")  # jsonl keys / csv columns tried in order
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
EXAMPLES_PER_REASON = 5  # offending paths a DataReport keeps per reason


class DataError(ValueError):
    """A data problem; the message says what was found, what is wrong and what to do."""


@dataclass
class DataReport:
    """What a source held and what was kept; written as data_report.json."""

    source: str
    kind: str
    found: int = 0
    used: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    examples: dict = field(default_factory=dict)  # reason -> a few paths

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(str(where))

    def to_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "found": self.found, "used": self.used,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
                "examples": {k: list(v) for k, v in self.examples.items()}}

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        return f"{self.source} ({self.kind}): {self.used} usable of {self.found} found; skipped: {reasons}"


# --------------------------------------------------------------------------- reading images

def open_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparency composited over white (the project's rule, psvae_core.images)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def check_image_file(path: Path, verify: str, min_size: int) -> Optional[str]:
    """None if `path` is usable, else the reason it is skipped."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBomb / palette notes
            with Image.open(path) as img:
                if min(img.size) < max(min_size, 1):
                    return f"smaller than {min_size} px"
                if verify == "full":
                    img.load()
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable or truncated"
    return None


def to_crop_tensor(image: Image.Image, size: int) -> torch.Tensor:
    crop = resize_center_crop(open_rgb(image), size)
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- sources

def detect_kind(source: Path) -> str:
    if source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if source.is_dir() and any((source / m).is_file() for m in HF_MARKERS):
        return "hf"
    if source.is_dir():
        return "folder"
    raise DataError(f"data source {source} is neither a folder nor a .jsonl/.csv manifest")


def _folder_paths(root: Path, report: DataReport) -> list[Path]:
    sidecars = {".txt", ".json", ".jsonl", ".csv", ".caption"}  # captions/metadata beside images are not skipped files
    paths = []
    for path in sorted(root.rglob("*")):
        if (not path.is_file() or path.suffix.lower() in sidecars
                or any(part.startswith(".") for part in path.relative_to(root).parts)):
            continue
        report.found += 1
        if path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(path)
        else:
            report.skip("not an image file type", str(path))
    return paths


def jsonl_lines(path, error: type[Exception] = DataError) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed JSON) per non-empty line of a jsonl file; a line that is not JSON
    raises `error` naming the file and line."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{path}:{n}: not valid JSON ({err.msg})") from None
        yield n, line, row


def _manifest_paths(manifest: Path, key: Optional[str], report: DataReport) -> list[Path]:
    if manifest.suffix.lower() == ".jsonl":
        rows = [row if isinstance(row, dict) else {"path": row} for _n, _line, row in jsonl_lines(manifest)]
    else:
        rows = list(csv.DictReader(manifest.read_text(encoding="utf-8").splitlines()))
    keys = (key,) if key else MANIFEST_KEYS
    paths = []
    for n, row in enumerate(rows, 1):
        value = next((row[k] for k in keys if k in row and row[k]), None)
        if value is None:
            raise DataError(f"{manifest}: row {n} has none of the keys {list(keys)}; name the column with "
                            f"data.manifest_key")
        path = Path(value).expanduser()
        paths.append(path if path.is_absolute() else manifest.parent / path)
    report.found = len(paths)
    return paths


def select_split(ds, split: Optional[str], where, hint: str = "", error: type[Exception] = DataError):
    """The split `split` (default: "train" if there is one, else the first) of a `datasets.DatasetDict`;
    any other dataset as it is. A missing split raises `error` ("<where>: no split ...<hint>")."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds
    names = list(ds)
    split = split or ("train" if "train" in ds else names[0])
    if split not in ds:
        raise error(f"{where}: no split {split!r}; it has {names}{hint}")
    return ds[split]


class _HFItems:
    """Rows of a `datasets.load_from_disk` folder, read lazily (each worker opens its own)."""

    def __init__(self, folder: Path, column: str, split: Optional[str]):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{folder} is a Hugging Face `datasets` folder, but the `datasets` package is not "
                            f"installed; `pip install datasets` or export the images to a folder") from None
        ds = select_split(datasets.load_from_disk(str(folder)), split, folder, " (set data.hf_split)")
        if column not in ds.column_names:
            raise DataError(f"{folder}: no column {column!r}; columns are {ds.column_names} (set data.hf_column)")
        self.ds, self.column = ds, column

    def __len__(self):
        return len(self.ds)

    def load(self, i: int) -> Image.Image:
        value = self.ds[i][self.column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
            import io
            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        if isinstance(value, str):
            return Image.open(value)
        raise DataError(f"column {self.column!r} holds {type(value).__name__}, not images")


class ImageDataset(Dataset):
    """`size` x `size` uint8 RGB crops `[3,S,S]` of one source, plus their index."""

    def __init__(self, load: Callable[[int], Image.Image], items: list, size: int, name: list[str]):
        self._load, self.items, self.size, self.names = load, items, size, name

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        # A file that passed the scan but fails to decode now is replaced by the next item, so
        # every process keeps the same batch shapes; the warning names it.
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = to_crop_tensor(self._load(self.items[j]), self.size)
                return {"image": image, "index": i}
            except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as err:
                logger.warning("skipping unreadable image %s (%s)", self.names[j], err)
        raise DataError("no image of the dataset could be decoded")


def build_image_dataset(source: str, size: int, *, kind: str = "auto", verify: str = "header",
                        min_size: int = 0, manifest_key: Optional[str] = None, hf_column: str = "image",
                        hf_split: Optional[str] = None) -> tuple[ImageDataset, DataReport]:
    """Scan `source` into a dataset; raises DataError when nothing usable is left."""
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"data source {source} does not exist; set data.source to an image folder, a "
                        f".jsonl/.csv manifest or a Hugging Face datasets folder")
    kind = detect_kind(root) if kind == "auto" else kind
    report = DataReport(str(source), kind)
    if kind == "hf":
        rows = _HFItems(root, hf_column, hf_split)
        report.found = len(rows)
        items = list(range(len(rows)))
        if verify == "full":
            kept = []
            for i in items:
                try:
                    img = rows.load(i)
                    img.load()
                    if min(img.size) < max(min_size, 1):
                        report.skip(f"smaller than {min_size} px", f"row {i}")
                        continue
                    kept.append(i)
                except (OSError, ValueError, SyntaxError, UnidentifiedImageError):
                    report.skip("unreadable or truncated", f"row {i}")
            items = kept
        names = [f"{root}[{i}]" for i in items]
        dataset = ImageDataset(rows.load, items, size, names)
    elif kind in ("folder", "manifest"):
        paths = _folder_paths(root, report) if kind == "folder" else _manifest_paths(root, manifest_key, report)
        items = []
        for path in paths:
            if not path.is_file():
                report.skip("missing file", str(path))
                continue
            reason = check_image_file(path, verify, min_size)
            if reason:
                report.skip(reason, str(path))
            else:
                items.append(path)
        dataset = ImageDataset(Image.open, items, size, [str(p) for p in items])
    else:
        raise DataError(f"data.kind must be auto, folder, manifest or hf; got {kind!r}")
    report.used = len(dataset)
    if report.used == 0:
        raise DataError(f"no usable images in {source}: {report.summary()}. Check the path, the file types "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}) and the data report")
    return dataset, report


def split_holdout(dataset: ImageDataset, count: int, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Hold `count` items out of `dataset` (a seeded choice) -> (train, held_out)."""
    if count <= 0:
        return dataset, ImageDataset(dataset._load, [], dataset.size, [])
    if count >= len(dataset):
        raise DataError(f"data.val_count={count} leaves no training images (the source has {len(dataset)})")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derive_seed(seed, "holdout")))
    held = set(order[:count].tolist())
    pick = lambda keep: [i for i in range(len(dataset)) if (i in held) == keep]  # noqa: E731
    parts = []
    for keep in (False, True):
        idx = pick(keep)
        parts.append(ImageDataset(dataset._load, [dataset.items[i] for i in idx], dataset.size,
                                  [dataset.names[i] for i in idx]))
    return parts[0], parts[1]


# --------------------------------------------------------------------------- sampling

class GlobalBatchSampler:
    """Infinite micro-batches of this process, cut from one seeded global order.

    Epoch e is a permutation seeded by (seed, e), cut into optimiser steps of
    `batch_size * world_size * accum` samples (an incomplete tail is dropped so every process stays
    in step). Inside a step, micro-batch m of process r is the `batch_size` slice starting at
    (m * world_size + r) * batch_size. The samples of a step therefore depend only on the step and
    the global batch, not on how processes and accumulation split it, and resuming at step s is
    `start_step=s` whatever layout wrote the checkpoint.
    """

    def __init__(self, num_items: int, batch_size: int, world_size: int, rank: int, seed: int,
                 accum: int = 1, start_step: int = 0):
        self.step_batch = batch_size * world_size * accum
        self.per_epoch = num_items // self.step_batch
        if self.per_epoch == 0:
            raise DataError(f"the dataset has {num_items} usable images, fewer than one optimiser step's batch "
                            f"({batch_size} per process x {world_size} processes x {accum} accumulation = "
                            f"{self.step_batch}); add images, or lower train.batch_size or train.grad_accum")
        self.num_items, self.batch_size, self.world_size, self.rank = num_items, batch_size, world_size, rank
        self.seed, self.accum, self.start_step = seed, accum, start_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "data-order", epoch))
        return torch.randperm(self.num_items, generator=g)

    def __iter__(self):
        step, epoch, order = self.start_step, None, None
        while True:
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            step_order = order[k * self.step_batch:(k + 1) * self.step_batch]
            for micro in range(self.accum):
                yield step_order[micro_rows(self.batch_size, self.rank, self.world_size, micro)].tolist()
            step += 1

    def __len__(self):  # DataLoader asks; the stream is infinite, report one epoch
        return self.per_epoch * self.accum


def shard_indices(n: int, world_size: int, rank: int) -> list[int]:
    """Contiguous, possibly uneven shard of range(n) for evaluation passes."""
    per = -(-n // world_size)
    return list(range(rank * per, min(n, (rank + 1) * per)))
