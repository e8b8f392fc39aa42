"""Data for the generator stages (docs/PAPER.md §5.3): captioned images (T2I) and edit triplets.

Every sample is a dict:

    T2I   {"key": str, "image": [3,S,S] float32 0..1, "text": caption}
    edit  {"key": str, "source": [3,S,S], "image": [3,S,S] (the edited target), "text": instruction}

so an edit sample is a T2I sample plus its source, and one training step serves both. Images are
resized (shorter side to S, bicubic) and centre-cropped with `psvae_core.images.resize_center_crop`,
S = 256 as in the paper.

Sources
    T2I:  `CaptionFolder` (image + same-name .txt, recursive), `CaptionManifest` (jsonl),
          `HFCaptionDataset` (`datasets` save_to_disk folder or parquet files; needs `datasets`),
          `TarShardStream` (webdataset-style shards, an IterableDataset split over ranks/workers).
    edit: `EditFolder` (source/, target/, instruction/ or instructions.jsonl, matched by name),
          `EditManifest` (jsonl).
    `open_t2i` / `open_edit` pick the source from a path.

Bad data never stops a run and never disappears silently: each skipped sample is counted by
reason in `report()` (with the first few offending paths); a source with nothing usable raises
`EmptyDatasetError` with that report. Map-style sets list their files sorted and then permute them
with `seed`, so the order is the same on every machine and file system.

`LatentCache` keeps PS-VAE latents (posterior mean, raw, i.e. not normalised) in safetensors shards
under a folder named by a fingerprint of the VAE file's tensors + config and of the preprocessing,
so another VAE (or another crop size) never reads stale latents. `fill_cache` encodes what is
missing; `CachedLatents` / `CachedLatentStream` serve samples with latents instead of pixels.

Caption dropout (CFG) and the independent text / image dropout of editing are applied by the
training stage; `dropout_masks` draws them.
"""
from __future__ import annotations

import copy
import glob as _glob
import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import uuid
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from psvae_core.checkpoint import fingerprint as vae_fingerprint  # noqa: F401  (re-exported)
from psvae_core.images import resize_center_crop

from .data import DataReport as _ImageDataReport, select_split

logger = logging.getLogger(__name__)

IMAGE_SIZE = 256
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TEXT_FIELDS = ("caption", "text", "txt", "prompt")  # json keys tried for a caption, in order
INSTRUCTION_FIELDS = ("instruction", "text", "prompt", "edit")
NAME_FIELDS = ("name", "key", "id")
RESIZE_RULE = "shorter-side-bicubic+centre-crop"  # psvae_core.images.resize_center_crop

PathLike = Union[str, os.PathLike]


class DataError(ValueError):
    """A data problem; the message says what was found, what is wrong and what to do."""


class EmptyDatasetError(DataError):
    """A source with no usable sample."""


class MissingDependencyError(ImportError):
    """An optional package a chosen data format needs."""


class BadSample(Exception):
    """One sample that cannot be used; `reason` is the report key."""

    def __init__(self, reason: str, where: str):
        super().__init__(f"{reason}: {where}")
        self.reason, self.where = reason, where


# ================================================================================== report

class DataReport(_ImageDataReport):
    """trainer.data's report (found / used / skipped by reason, a few examples each); its summary
    also names one offending path per reason."""

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {r} (e.g. {self.examples[r][0]})" for r, n in sorted(self.skipped.items())) or "none"
        return f"{self.source} ({self.kind}): {self.used} usable of {self.found} found; skipped: {reasons}"


def _empty_error(report: DataReport, hint: str) -> EmptyDatasetError:
    return EmptyDatasetError(f"no usable sample in {report.summary()}. {hint}")


# ================================================================================== images

def load_image(source: Union[PathLike, bytes, Image.Image], size: int = IMAGE_SIZE, min_side: int = 0,
               where: Optional[str] = None) -> torch.Tensor:
    """A file path, encoded bytes or PIL image -> [3,size,size] float32 in 0..1.

    EXIF rotation is applied; transparency is composited over white (the project's rule).
    Raises BadSample("unreadable_image" | "too_small") instead of a PIL error.
    """
    where = where or (str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette / DecompressionBomb notes
            if isinstance(source, Image.Image):
                image = source
            else:
                image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
            image.load()
            image = ImageOps.exif_transpose(image)
            if min(image.size) < max(min_side, 1):
                raise BadSample("too_small", where)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            crop = resize_center_crop(image.convert("RGB"), size)
    except BadSample:
        raise
    except FileNotFoundError:
        raise BadSample("missing_image", where) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise BadSample("unreadable_image", where) from None
    return torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def _check_image_file(path: Path, min_side: int) -> Optional[str]:
    """None if the file looks like a usable image (header + PIL's verify), else the skip reason."""
    try:
        if not path.is_file():
            return "missing_image"
        if path.stat().st_size == 0:
            return "unreadable_image"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                if min(image.size) < max(min_side, 1):
                    return "too_small"
                image.verify()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "unreadable_image"
    return None


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _images_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _is_hidden(p, root))


def _read_jsonl(path: Path, report: DataReport) -> list[tuple[int, dict]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"manifest {path} does not exist") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            report.found += 1
            report.skip("bad_manifest_line", f"{path}:{n}")
            continue
        if not isinstance(row, dict):
            report.found += 1
            report.skip("bad_manifest_line", f"{path}:{n}")
            continue
        rows.append((n, row))
    return rows


def _first(row: dict, keys: Sequence[str]):
    for k in keys:
        value = row.get(k)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


# ================================================================================== map-style sets

@dataclass
class Entry:
    """One sample before loading: key, text, and image references by field ("image", "source")."""

    key: str
    text: Optional[str]
    images: dict


def _manifest_entries(manifest: Path, report: DataReport, images: dict, text: tuple) -> list:
    """The `Entry`s of a jsonl manifest. `images`: entry field -> (json key, skip reason when missing),
    checked in order; `text`: (json key, skip reason). Key = the line's "key"/"id", else its "image"."""
    entries, seen = [], set()
    for n, row in _read_jsonl(manifest, report):
        report.found += 1
        where = f"{manifest}:{n}"
        values = {name: _first(row, (key,)) for name, (key, _) in images.items()}
        missing = next((reason for name, (_, reason) in images.items() if values[name] is None), None)
        if missing is not None:
            report.skip(missing, where)
            continue
        caption = _first(row, (text[0],))
        if caption is None:
            report.skip(text[1], where)
            continue
        key = _first(row, ("key", "id")) or values["image"]
        if key in seen:
            report.skip("duplicate_key", where)
            continue
        seen.add(key)
        entries.append(Entry(key, caption, {name: _resolve(manifest.parent, v) for name, v in values.items()}))
    return entries


class _MapDataset(Dataset):
    """Common machinery: checks, report, seeded order, skip-and-replace on load failure."""

    kind = "?"
    fields: tuple = ("image",)

    def __init__(self, source: str, size: int = IMAGE_SIZE, seed: int = 0, shuffle: bool = True,
                 check_images: bool = True, min_side: int = 0, check_threads: int = 8, max_retries: int = 16):
        self.source, self.size, self.seed, self.shuffle = source, size, seed, shuffle
        self.check_images, self.min_side = check_images, min_side
        self.check_threads, self.max_retries = check_threads, max_retries
        self._report = DataReport(source, self.kind)
        self.entries: list[Entry] = []
        self.order: list[int] = []

    # -- building
    def _finish(self, entries: list[Entry], hint: str) -> None:
        if self.check_images and entries:
            entries = self._checked(entries)
        entries.sort(key=lambda e: e.key)
        self.entries = entries
        self._report.used = len(entries)
        if not entries:
            raise _empty_error(self._report, hint)
        if self.shuffle:
            g = torch.Generator().manual_seed(int(self.seed))
            self.order = torch.randperm(len(entries), generator=g).tolist()
        else:
            self.order = list(range(len(entries)))
        if self._report.skipped:
            logger.warning("%s", self._report.summary())

    def _checked(self, entries: list[Entry]) -> list[Entry]:
        refs = [(i, f, ref) for i, e in enumerate(entries) for f, ref in e.images.items() if isinstance(ref, Path)]
        with ThreadPoolExecutor(max(1, self.check_threads)) as pool:
            results = list(pool.map(lambda r: _check_image_file(r[2], self.min_side), refs))
        bad: dict[int, tuple[str, Path]] = {}
        for (i, _, ref), reason in zip(refs, results):
            if reason is not None and i not in bad:
                bad[i] = (reason, ref)
        for reason, ref in bad.values():
            self._report.skip(reason, ref)
        return [e for i, e in enumerate(entries) if i not in bad]

    # -- access
    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, index: int) -> Entry:
        return self.entries[self.order[index]]

    def key(self, index: int) -> str:
        return self.entry(index).key

    def text(self, index: int) -> str:
        entry = self.entry(index)
        return entry.text if entry.text is not None else self._load_text(entry)

    def _load_text(self, entry: Entry) -> str:
        raise BadSample("missing_caption", entry.key)

    def _load_image(self, ref, entry: Entry) -> torch.Tensor:
        return load_image(ref, self.size, self.min_side)

    def load(self, index: int) -> dict:
        """The sample at `index`; raises BadSample (no replacement)."""
        entry = self.entry(index)
        item = {"key": entry.key}
        for name in self.fields:
            item[name] = self._load_image(entry.images[name], entry)
        item["text"] = entry.text if entry.text is not None else self._load_text(entry)
        return item

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        for attempt in range(self.max_retries + 1):
            i = (index + attempt) % len(self)
            try:
                return self.load(i)
            except BadSample as bad:
                # Found only now (e.g. a truncated JPEG, which PIL's verify does not catch). In a
                # DataLoader worker this count stays in the worker, so it is logged too.
                self._report.skip(bad.reason, bad.where)
                logger.warning("skipping %s (%s); using the next sample instead", bad.where, bad.reason)
        raise DataError(f"{self.max_retries + 1} samples in a row from index {index} failed to load; "
                        f"{self._report.summary()}")

    def report(self) -> dict:
        return self._report.to_dict()


class CaptionFolder(_MapDataset):
    """Images under `root` (recursive) with a same-name caption file next to them (`a/b.jpg` + `a/b.txt`).

    Files and folders starting with "." are ignored. Key = the image path relative to `root`.
    """

    kind = "caption-folder"

    def __init__(self, root: PathLike, caption_ext: str = ".txt", **kwargs):
        root = Path(root)
        super().__init__(str(root), **kwargs)
        if not root.is_dir():
            raise DataError(f"caption folder {root} does not exist or is not a folder")
        entries = []
        for path in _images_under(root):
            self._report.found += 1
            text = _read_text(path.with_suffix(caption_ext))
            if text is None:
                self._report.skip("missing_caption", path)
            elif not text:
                self._report.skip("empty_caption", path)
            else:
                entries.append(Entry(path.relative_to(root).as_posix(), text, {"image": path}))
        self._finish(entries, f"Put images ({', '.join(IMAGE_SUFFIXES)}) with same-name {caption_ext} captions "
                              f"under {root}.")


class CaptionManifest(_MapDataset):
    """A jsonl manifest, one `{"image": path, "text": caption}` per line; relative paths are relative
    to the manifest's folder. Key = the line's "key"/"id" if any, else the image path as written."""

    kind = "caption-manifest"

    def __init__(self, manifest: PathLike, image_key: str = "image", text_key: str = "text", **kwargs):
        manifest = Path(manifest)
        super().__init__(str(manifest), **kwargs)
        entries = _manifest_entries(manifest, self._report, {"image": (image_key, "missing_image")},
                                    (text_key, "missing_caption"))
        self._finish(entries, f'Each line of {manifest} needs {{"{image_key}": path, "{text_key}": caption}}.')


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            "reading Hugging Face `datasets` folders or parquet files needs the `datasets` package (with "
            "pyarrow): `pip install datasets`; or convert the data to a jsonl manifest or tar shards") from None
    return datasets


class HFCaptionDataset(_MapDataset):
    """A `datasets.save_to_disk` folder or parquet file(s) (path, glob or list) with an image column
    (an Image feature, encoded bytes, {"bytes", "path"} or a path string) and a text column.

    Rows are read lazily; a row whose image or caption turns out bad is skipped at load time and
    counted. Key = `key_column` if given, else "<row index>".
    """

    kind = "hf-datasets"

    def __init__(self, path: Union[PathLike, Sequence[PathLike]], image_column: str = "image",
                 text_column: str = "text", split: Optional[str] = None, key_column: Optional[str] = None,
                 **kwargs):
        datasets = _require_datasets()
        kwargs.setdefault("check_images", False)  # images live inside the files; checked when loaded
        paths = [Path(p) for p in path] if isinstance(path, (list, tuple)) else None
        super().__init__(str(path), **kwargs)
        if paths is None and Path(path).is_dir():
            ds = datasets.load_from_disk(str(path))
        else:
            files = [str(p) for p in paths] if paths is not None else sorted(_glob.glob(str(path)))
            if not files:
                raise DataError(f"no parquet file matches {path}")
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        ds = select_split(ds, split, path, error=DataError)
        for column, what in ((image_column, "image_column"), (text_column, "text_column"), (key_column, "key_column")):
            if column is not None and column not in ds.column_names:
                raise DataError(f"{path}: no column {column!r}; columns are {ds.column_names} (set {what})")
        feature = ds.features.get(image_column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes; decoded by load_image
        self._ds, self._image_column, self._text_column = ds, image_column, text_column
        self._texts = ds.select_columns([text_column])
        keys = ds[key_column] if key_column else [str(i) for i in range(len(ds))]
        self._report.found = len(ds)
        self._finish([Entry(str(k), None, {"image": i}) for i, k in enumerate(keys)],
                     f"{path} has no rows.")

    def _load_text(self, entry: Entry) -> str:
        value = self._texts[entry.images["image"]][self._text_column]
        if not isinstance(value, str) or not value.strip():
            raise BadSample("missing_caption", f"{self.source}#{entry.key}")
        return value.strip()

    def _load_image(self, ref, entry: Entry) -> torch.Tensor:
        value = self._ds[ref][self._image_column]
        where = f"{self.source}#{entry.key}"
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (bytes, bytearray, Image.Image)):
            return load_image(value, self.size, self.min_side, where=where)
        if isinstance(value, str):
            return load_image(value, self.size, self.min_side, where=where)
        raise BadSample("missing_image", where)


class EditFolder(_MapDataset):
    """Edit triplets matched by name: `source/NAME.ext`, `target/NAME.ext`, and the instruction in
    `instruction/NAME.txt` or in one jsonl (`{"name": NAME, "instruction": ...}` per line; "key"/"id"
    are accepted for "name"; default `root/instructions.jsonl` when it exists).

    NAME may contain sub-folders (`source/cats/a.png` pairs with `target/cats/a.jpg`). Key = NAME.
    """

    kind = "edit-folder"
    fields = ("source", "image")

    def __init__(self, root: PathLike, source_dir: str = "source", target_dir: str = "target",
                 instruction_dir: str = "instruction", instructions: Optional[PathLike] = None, **kwargs):
        root = Path(root)
        super().__init__(str(root), **kwargs)
        src_root, tgt_root, ins_root = root / source_dir, root / target_dir, root / instruction_dir
        for folder in (src_root, tgt_root):
            if not folder.is_dir():
                raise DataError(f"edit folder {root} needs {folder.name}/ (and {tgt_root.name}/); {folder} is missing")
        if instructions is None and (root / "instructions.jsonl").is_file():
            instructions = root / "instructions.jsonl"
        table = None
        if instructions is not None:
            table = {}
            for n, row in _read_jsonl(Path(instructions), self._report):
                name, text = _first(row, NAME_FIELDS), _first(row, INSTRUCTION_FIELDS)
                if name is None or text is None:
                    self._report.skip("bad_manifest_line", f"{instructions}:{n}")
                else:  # "a.png" and "a" both name the pair a
                    suffix = Path(name).suffix
                    table[name[:-len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else name] = text
        sources = self._by_name(src_root)
        targets = self._by_name(tgt_root)
        entries = []
        for name in sorted(set(sources) | set(targets)):
            self._report.found += 1
            src, tgt = sources.get(name), targets.get(name)
            if src is None or tgt is None:
                self._report.skip("missing_source" if src is None else "missing_target", tgt or src)
                continue
            if table is not None:
                text = table.get(name)
            else:
                text = _read_text(ins_root / f"{name}.txt")
            if not text:
                self._report.skip("missing_instruction", src)
                continue
            entries.append(Entry(name, text, {"source": src, "image": tgt}))
        where = instructions or f"{ins_root}/NAME.txt"
        self._finish(entries, f"Put pairs as {src_root}/NAME.png + {tgt_root}/NAME.png with instructions in {where}.")

    def _by_name(self, folder: Path) -> dict[str, Path]:
        found: dict[str, list[Path]] = {}
        for path in _images_under(folder):
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
        out = {}
        for name, paths in found.items():
            if len(paths) > 1:  # a.png and a.jpg: which one is meant is unknowable
                for p in paths:
                    self._report.skip("ambiguous_name", p)
            else:
                out[name] = paths[0]
        return out


class EditManifest(_MapDataset):
    """A jsonl manifest, one `{"source": path, "target": path, "instruction": text}` per line;
    relative paths are relative to the manifest. Key = "key"/"id" if given, else the target path."""

    kind = "edit-manifest"
    fields = ("source", "image")

    def __init__(self, manifest: PathLike, source_key: str = "source", target_key: str = "target",
                 instruction_key: str = "instruction", **kwargs):
        manifest = Path(manifest)
        super().__init__(str(manifest), **kwargs)
        entries = _manifest_entries(manifest, self._report, {"source": (source_key, "missing_source"),
                                                             "image": (target_key, "missing_target")},
                                    (instruction_key, "missing_instruction"))
        self._finish(entries, f'Each line of {manifest} needs {{"{source_key}", "{target_key}", "{instruction_key}"}}.')


# ================================================================================== tar shards

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` -> a-000.tar ... a-003.tar (zero padding kept); `{x,y}` -> both; nested ok."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        a, b = int(lo), int(hi)
        step = 1 if b >= a else -1
        options = [str(i).zfill(width) for i in range(a, b + step, step)]
    else:
        options = body.split(",")
    return [s for option in options for s in expand_braces(head + option + tail)]


def expand_shards(shards: Union[PathLike, Sequence[PathLike]], allow_missing: bool = False) -> list[str]:
    """Shard paths from a brace pattern, a glob, a list of either, or a text file listing them (.txt)."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    missing: list[str] = []
    for pattern in map(str, patterns):
        if pattern.endswith(".txt") and Path(pattern).is_file():
            listed = [ln.strip() for ln in Path(pattern).read_text().splitlines() if ln.strip()]
            out += expand_shards([str(_resolve(Path(pattern).parent, x)) for x in listed], allow_missing)
            continue
        for path in expand_braces(os.path.expanduser(pattern)):
            if _glob.has_magic(path):
                matched = sorted(_glob.glob(path))
                if not matched:
                    missing.append(path)
                out += matched
            elif Path(path).is_file():
                out.append(path)
            else:
                missing.append(path)
    if missing and not allow_missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} shard path(s) do not exist: {', '.join(missing[:3])}{more}; "
                        "fix the pattern, or pass allow_missing=True to train on the rest")
    if not out:
        raise EmptyDatasetError(f"no tar shard matches {patterns}")
    return out


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def iter_tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each run of consecutive members sharing a key, streaming the file.
    A truncated or unreadable tar ends with BadSample("bad_shard") after its readable samples."""
    key, group = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_member(member.name)
                if k.rpartition("/")[2] == "" or not ext:
                    continue
                if k != key and group:
                    yield key, group
                    group = {}
                key = k
                data = tar.extractfile(member)
                group[ext] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        if group:
            yield key, group
        raise BadSample("bad_shard", f"{path} ({type(err).__name__}: {err})") from None
    if group:
        yield key, group
    # tarfile reads a header cut short as the end of the archive; a whole tar is 512-byte blocks.
    if os.path.getsize(path) % 512:
        raise BadSample("bad_shard", f"{path} (truncated: {os.path.getsize(path)} bytes is not a whole number "
                                     "of 512-byte tar blocks)")


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class TarShardStream(IterableDataset):
    """webdataset-style tar shards: members `{key}.jpg|jpeg|png|webp` + `{key}.txt` or `{key}.json`
    (caption from the first of `text_fields` present), consecutive per key. Sized for CC12M (10.9M).

    Splitting: one seeded shard order per epoch (the same on every process); with at least as many
    shards as (ranks x DataLoader workers), reader g of G takes shards g, g+G, ...; with fewer, every
    reader streams every shard and keeps samples g, g+G, ... So each sample is read by exactly one
    reader either way. Rank/world come from torch.distributed, else $RANK/$WORLD_SIZE.

    repeat=True streams forever, reshuffling the shard order each pass (epoch + 1).
    shuffle_buffer > 0 shuffles samples within a seeded buffer of that size.
    load_images=False yields no pixels (for `CachedLatentStream`, which reads latents instead).
    Key = "<shard file name>/<member key>". `report()` counts this process's skips.
    """

    kind = "tar-shards"

    def __init__(self, shards, size: int = IMAGE_SIZE, text_fields: Sequence[str] = TEXT_FIELDS, seed: int = 0,
                 shuffle_shards: bool = True, shuffle_buffer: int = 0, repeat: bool = False, epoch: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, min_side: int = 0,
                 load_images: bool = True, allow_missing: bool = False):
        super().__init__()
        self.shards = expand_shards(shards, allow_missing)
        self.size, self.text_fields, self.seed = size, tuple(text_fields), seed
        self.shuffle_shards, self.shuffle_buffer = shuffle_shards, shuffle_buffer
        self.repeat, self.epoch = repeat, epoch
        self.rank, self.world_size, self.min_side, self.load_images = rank, world_size, min_side, load_images
        self._report = DataReport(str(shards), self.kind)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def report(self) -> dict:
        return self._report.to_dict()

    def shard_order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def _reader(self) -> tuple[int, int]:
        rank, world = _dist_rank_world()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict]:
        reader, readers = self._reader()
        epoch = self.epoch
        while True:
            yield from self.iter_partition(reader, readers, epoch)
            if not self.repeat:
                return
            epoch += 1

    def iter_partition(self, reader: int, readers: int, epoch: Optional[int] = None) -> Iterator[dict]:
        """The samples of reader `reader` of `readers` (= rank * num_workers + worker) in one pass."""
        if not 0 <= reader < readers:
            raise ValueError(f"reader {reader} is not in 0..{readers - 1}")
        order = self.shard_order(self.epoch if epoch is None else epoch)
        by_shard = len(order) >= readers
        mine = order[reader::readers] if by_shard else order
        rng = random.Random(f"{self.seed}:{epoch}:{reader}")
        buffer: list[dict] = []
        produced, had_any = 0, False
        for item in self._samples(mine, None if by_shard else (reader, readers)):
            had_any = True
            produced += 1
            if self.shuffle_buffer > 1:
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            else:
                yield item
        rng.shuffle(buffer)
        yield from buffer
        if not had_any and self._report.found:
            raise _empty_error(self._report, "Each sample needs {key}.jpg/png/webp and {key}.txt or {key}.json "
                                             f"(with one of {list(self.text_fields)}).")

    def _samples(self, shards: list[str], stride: Optional[tuple[int, int]]) -> Iterator[dict]:
        count = 0
        for shard in shards:
            name = Path(shard).name
            groups = iter_tar_groups(shard)
            while True:
                try:
                    key, group = next(groups)
                except StopIteration:
                    break
                except BadSample as bad:
                    self._report.skip(bad.reason, bad.where)
                    logger.warning("%s; its remaining samples are skipped", bad.where)
                    break
                count += 1
                if stride is not None and (count - 1) % stride[1] != stride[0]:
                    continue
                self._report.found += 1
                try:
                    item = self._decode(f"{name}/{key}", group)
                except BadSample as bad:
                    self._report.skip(bad.reason, bad.where)
                    continue
                self._report.used += 1
                yield item

    def _decode(self, key: str, group: dict[str, bytes]) -> dict:
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in group), None)
        if image_ext is None:
            raise BadSample("missing_image", key)
        text = None
        if "txt" in group:
            text = group["txt"].decode("utf-8", errors="replace").strip()
        elif "json" in group:
            try:
                meta = json.loads(group["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BadSample("bad_json", key) from None
            text = _first(meta, self.text_fields) if isinstance(meta, dict) else None
        if not text:
            raise BadSample("missing_caption", key)
        item = {"key": key, "text": text}
        if self.load_images:
            item["image"] = load_image(group[image_ext], self.size, self.min_side, where=key)
        return item


# ================================================================================== choosing a source

def open_t2i(source, **kwargs) -> Union[_MapDataset, TarShardStream]:
    """A T2I source from a path: *.tar / brace / glob of tars -> TarShardStream; *.jsonl ->
    CaptionManifest; *.parquet or a `datasets` folder -> HFCaptionDataset; a folder -> CaptionFolder."""
    text = str(source) if isinstance(source, (str, os.PathLike)) else None
    if text is None or ".tar" in text or "{" in text:
        return TarShardStream(source, **kwargs)
    path = Path(text)
    if path.suffix == ".jsonl":
        return CaptionManifest(path, **kwargs)
    hf_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if path.suffix == ".parquet" or _glob.has_magic(text) or (
            path.is_dir() and any((path / m).is_file() for m in hf_markers)):
        return HFCaptionDataset(path if not _glob.has_magic(text) else text, **kwargs)
    return CaptionFolder(path, **kwargs)


def open_edit(source: PathLike, **kwargs) -> _MapDataset:
    """An edit source: *.jsonl -> EditManifest; a folder -> EditFolder."""
    path = Path(source)
    return EditManifest(path, **kwargs) if path.suffix == ".jsonl" else EditFolder(path, **kwargs)


# ================================================================================== dropout

def dropout_masks(batch_size: int, p_text: float, p_image: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_text, keep_image): bool [batch_size], True = keep, each dropped with its own
    probability and drawn independently (both dropped with p_text * p_image): caption dropout for
    classifier-free guidance, and for editing the text / source-image dropout of dual guidance."""
    for name, p in (("p_text", p_text), ("p_image", p_image)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(2, batch_size, generator=generator, device=device)
    return u[0] >= p_text, u[1] >= p_image


# ================================================================================== latent cache

CACHE_FORMAT = 1
_FINGERPRINTS: dict[tuple, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class LatentCache:
    """PS-VAE latents (posterior mean, raw) per sample key, in safetensors shards.

    Layout: `<root>/<cache id>/cache.json` (what the id stands for) + `shard-*.safetensors`, each with
    one tensor "latents" [N,C,h,w] and the N keys (JSON) in its metadata. The cache id hashes the VAE
    fingerprint (`vae_fingerprint`) with the preprocessing (crop size, resize rule, latent kind,
    storage dtype, `settings`), so another VAE or crop gets another folder; nothing stale is read.
    Old folders are left in place (`stale_folders()` lists them).

    Writes: `add` buffers, full shards are written atomically (temporary name, then rename) under a
    unique name, so ranks may fill disjoint parts of one cache at once; `refresh()` sees the others'.
    float16 storage halves the disk (CC12M at 96x16x16: ~0.5 TB); values outside its range raise.
    The in-memory index is 16 bytes a latent (sorted 64-bit key hashes + shard/row), ~175 MB for
    CC12M's 10.9M, and is shared copy-on-write by forked DataLoader workers.
    """

    _MERGE_EVERY = 1 << 18  # recent writes kept in a dict until merged into the sorted index

    def __init__(self, root: PathLike, vae_file: PathLike, size: int = IMAGE_SIZE, dtype: torch.dtype = torch.float16,
                 settings: Optional[dict] = None, shard_size: int = 4096):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"cache dtype must be float16, bfloat16 or float32, not {dtype}")
        self.root, self.size, self.dtype, self.shard_size = Path(root), size, dtype, shard_size
        self.vae_file = Path(vae_file)
        self.vae_fingerprint = vae_fingerprint(vae_file)
        self.settings = {"format": CACHE_FORMAT, "size": size, "resize": RESIZE_RULE,
                         "latent": "posterior-mean-raw", "dtype": _dtype_name(dtype), **(settings or {})}
        ident = json.dumps({"vae": self.vae_fingerprint, "settings": self.settings}, sort_keys=True)
        self.cache_id = hashlib.sha256(ident.encode()).hexdigest()[:24]
        self.folder = self.root / self.cache_id
        self._shards: list[str] = []
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._where = np.zeros((0, 2), dtype=np.int64)  # (shard number, row) per sorted hash
        self._recent: dict[int, tuple[int, int]] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: dict[tuple[int, str], Any] = {}
        self.refresh()

    def __repr__(self):
        return f"LatentCache({self.folder}, {len(self)} latents)"

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
        if info.is_file():
            stored = json.loads(info.read_text())
            if stored.get("vae_fingerprint") != self.vae_fingerprint or stored.get("settings") != self.settings:
                raise DataError(f"{self.folder} holds latents of another VAE or preprocessing than its name says; "
                                "delete the folder")

    def stale_folders(self) -> list[Path]:
        """Cache folders under the root made with another VAE or settings (safe to delete)."""
        return sorted(p for p in self.root.glob("*")
                      if p.is_dir() and (p / "cache.json").is_file() and p != self.folder)

    def __len__(self) -> int:
        return len(self._hashes) + len(self._recent) + len(self._pending)

    def __contains__(self, key: str) -> bool:
        return key in self._pending or self._locate(key) is not None

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self]

    # -- read
    def _handle(self, shard: str):
        from safetensors import safe_open

        slot = (os.getpid(), shard)  # a DataLoader worker opens its own
        if slot not in self._handles:
            self._handles[slot] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[slot]

    def get(self, key: str) -> torch.Tensor:
        """The latent [C,h,w] as float32."""
        if key in self._pending:
            return self._pending[key].float()
        found = self._locate(key)
        if found is None:
            raise KeyError(f"{key!r} is not in the latent cache {self.folder}; run fill_cache first")
        shard, row = found
        return self._handle(self._shards[shard]).get_slice("latents")[row:row + 1][0].float()

    # -- write
    def add(self, keys: Sequence[str], latents: torch.Tensor) -> None:
        if len(keys) != latents.shape[0]:
            raise ValueError(f"{len(keys)} keys for {latents.shape[0]} latents")
        stored = latents.detach().to("cpu", self.dtype)
        if not torch.isfinite(stored).all():
            bad = [k for k, row in zip(keys, stored) if not torch.isfinite(row).all()]
            raise DataError(f"non-finite latents (NaN/Inf, or beyond {_dtype_name(self.dtype)}'s range) for "
                            f"{bad[:3]}; check those images, or cache in float32")
        for key, row in zip(keys, stored):
            if key not in self:
                self._pending[key] = row.clone()
        while len(self._pending) >= self.shard_size:
            self._write(self.shard_size)

    def flush(self) -> None:
        """Write every buffered latent (shards of at most `shard_size`)."""
        while self._pending:
            self._write(self.shard_size)

    def _write(self, count: int) -> None:
        from safetensors.torch import save_file

        keys = list(self._pending)[:count]
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "cache.json"
        if not info.is_file():
            tmp = info.with_name(f".cache.json.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps({"vae_fingerprint": self.vae_fingerprint, "vae_file": str(self.vae_file),
                                       "settings": self.settings}, indent=2, sort_keys=True))
            os.replace(tmp, info)
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"latents": torch.stack([self._pending[k] for k in keys]).contiguous()}, str(tmp),
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


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The posterior mean of `images` [B,3,H,W] 0..1 (raw: not normalised), on the VAE's device."""
    weight = next(vae.parameters())
    return vae.encode(images.to(weight.device, weight.dtype)).mode()


def _cache_key(key: str, name: str) -> str:
    return key if name == "image" else f"{key}#{name}"


def fill_cache(cache: LatentCache, vae, dataset, batch_size: int = 32, num_workers: int = 0,
               encode: Callable = encode_latents, rank: int = 0, world_size: int = 1,
               log_every: int = 0) -> dict:
    """Encode every image of `dataset` not yet in `cache` (map-style: this rank's indices i with
    i % world_size == rank; a TarShardStream: its own partition). Returns counts.

    `encode(vae, images) -> latents` does the work (default: posterior mean). Fields cached: the
    dataset's `fields` ("image", plus "source" for edit sets); keys are `key` and `key#source`.
    """
    size = getattr(dataset, "size", cache.size)
    if size != cache.size:
        raise ValueError(f"the dataset crops to {size} px but the cache was made for {cache.size} px")
    fields = tuple(getattr(dataset, "fields", ("image",)))
    was_training = vae.training
    vae.eval()
    stats = Counter()
    try:
        if isinstance(dataset, IterableDataset):  # each worker reads its own share of the shards
            source = dataset if num_workers == 0 else torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=num_workers)
            batches = _stream_batches(source, cache, fields, batch_size, stats)
        else:
            todo = [i for i in range(rank, len(dataset), world_size)
                    if any(_cache_key(dataset.key(i), f) not in cache for f in fields)]
            stats["cached"] = len(range(rank, len(dataset), world_size)) - len(todo)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, todo), batch_size=batch_size,
                                                 num_workers=num_workers, collate_fn=_collate)
            batches = iter(loader)
        for n, batch in enumerate(batches, 1):
            for name in fields:
                keys = [_cache_key(k, name) for k in batch["key"]]
                cache.add(keys, encode(vae, batch[name]).cpu())
            stats["encoded"] += len(batch["key"])
            if log_every and n % log_every == 0:
                logger.info("latent cache: %d encoded, %d already cached", stats["encoded"], stats["cached"])
        cache.flush()
    finally:
        vae.train(was_training)
    return {"encoded": stats["encoded"], "cached": stats["cached"], "total": len(cache)}


def _stream_batches(stream, cache, fields, batch_size, stats) -> Iterator[dict]:
    batch: list[dict] = []
    for item in stream:
        if all(_cache_key(item["key"], f) in cache for f in fields):
            stats["cached"] += 1
            continue
        batch.append(item)
        if len(batch) == batch_size:
            yield _collate(batch)
            batch = []
    if batch:
        yield _collate(batch)


def _collate(items: list[dict]) -> dict:
    out = {}
    for name in items[0]:
        values = [it[name] for it in items]
        out[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


class CachedLatents(Dataset):
    """A map-style set served from a LatentCache: `{"key", "text", "latent"[, "source_latent"]}`,
    raw latents [C,h,w] float32 (normalise with the VAE's stats in the stage); no image is decoded.

    Samples without a cached latent (their image failed to load while filling) are left out and
    counted as "not_cached" in `report()`; none cached at all is an error (fill_cache not run)."""

    def __init__(self, dataset: _MapDataset, cache: LatentCache):
        self.dataset, self.cache = dataset, cache
        self.fields = tuple(dataset.fields)
        self._report = DataReport(f"{dataset.source} via {cache.folder}", "latent-cache", found=len(dataset))
        self.indices = []
        for i in range(len(dataset)):
            key = dataset.key(i)
            if all(_cache_key(key, f) in cache for f in self.fields):
                self.indices.append(i)
            else:
                self._report.skip("not_cached", key)
        self._report.used = len(self.indices)
        if not self.indices:
            raise _empty_error(self._report, "Run fill_cache(cache, vae, dataset) first.")
        if self._report.skipped:
            logger.warning("%s", self._report.summary())

    def report(self) -> dict:
        return self._report.to_dict()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        i = self.indices[index]
        key = self.dataset.key(i)
        item = {"key": key, "text": self.dataset.text(i)}
        for name in self.fields:
            item["latent" if name == "image" else f"{name}_latent"] = self.cache.get(_cache_key(key, name))
        return item


class CachedLatentStream(IterableDataset):
    """A TarShardStream served from a LatentCache (pixels are not decoded); uncached samples are
    skipped and counted as "not_cached"."""

    def __init__(self, stream: TarShardStream, cache: LatentCache):
        super().__init__()
        self.stream, self.cache = copy.copy(stream), cache
        self.stream.load_images = False
        self.not_cached = 0

    def __iter__(self):
        for item in self.stream:
            if item["key"] not in self.cache:
                self.not_cached += 1
                continue
            yield {"key": item["key"], "text": item["text"], "latent": self.cache.get(item["key"])}
