"""Image sources of the autoencoder stages (an image folder, a .jsonl/.csv manifest of paths, or a
Hugging Face `datasets` folder), scanned once into an `ImageDataset` of uint8 crops; what cannot be
used is counted by reason in a `DataReport` (docs/TRAINER.md "Data")."""
from __future__ import annotations

import csv
import glob
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_SUFFIXES, check_image_files, files_under, is_image_name, read_crop
from .report import BadSample, DataError, DataReport, MissingDependencyError

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".jsonl", ".csv"}
MANIFEST_KEYS = ("path", "file_name", "image", "file")  # jsonl keys / csv columns tried in order
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# What a scan-time check (images.check_image_file) means, in this report's words.
SCAN_REASONS = {"missing": "missing file", "empty": "empty file", "not_image": "not an image",
                "unreadable": "unreadable or truncated"}


def detect_kind(source: Path) -> str:
    if source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest"
    if not source.is_dir():
        raise DataError(f"data source {source} is neither a folder nor a .jsonl/.csv manifest")
    return "hf" if any((source / m).is_file() for m in HF_MARKERS) else "folder"


def resolve(base: Path, value: str) -> Path:
    """A path from a manifest: relative to the manifest's folder `base` unless absolute (`~` expanded)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _folder_paths(root: Path, report: DataReport) -> list[Path]:
    sidecars = {".txt", ".json", ".jsonl", ".csv", ".caption"}  # captions/metadata beside images are not skipped files
    paths = [root / rel for rel in files_under(root) if rel.suffix.lower() not in sidecars]
    report.found += len(paths)
    for path in paths:
        if not is_image_name(path):
            report.skip("not an image file type", str(path))
    return [path for path in paths if is_image_name(path)]


def jsonl_lines(path, error: type[Exception] = DataError,
                bad: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed JSON) per non-empty line of a jsonl file; a line that is not JSON
    raises `error` naming the file and line, or is passed to `bad(line number)` and left out."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if bad is None:
                raise error(f"{path}:{n}: not valid JSON ({err.msg})") from None
            bad(n)
            continue
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
        paths.append(resolve(manifest.parent, value))
    report.found = len(paths)
    return paths


def open_hf(path, split: Optional[str], split_setting: str, columns: dict[str, str]):
    """The rows of a `datasets.save_to_disk` folder or of parquet file(s) (a path, glob or list): the
    split `split` (default "train" if there is one, else the first; named by the setting
    `split_setting`); each of `columns` (column -> the setting that names it) must exist. Image
    columns stay undecoded (bytes): `hf_image` + the image rule read them."""
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            "reading Hugging Face `datasets` folders or parquet files needs the `datasets` package (with "
            "pyarrow): `pip install datasets`; or convert the data to an image folder, a jsonl manifest or tar "
            "shards") from None
    if not isinstance(path, (list, tuple)) and Path(path).is_dir():
        ds = datasets.load_from_disk(str(path))
    else:
        files = [str(p) for p in path] if isinstance(path, (list, tuple)) else sorted(glob.glob(str(path)))
        if not files:
            raise DataError(f"no parquet file matches {path}")
        ds = datasets.load_dataset("parquet", data_files=files, split="train")
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else list(ds)[0])
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {list(ds)} (set {split_setting})")
        ds = ds[split]
    for column, setting in columns.items():
        if column not in ds.column_names:
            raise DataError(f"{path}: no column {column!r}; columns are {ds.column_names} (set {setting})")
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def hf_image(value, where: str):
    """An image cell (encoded bytes, {"bytes", "path"}, a path or a PIL image) as read_crop takes it."""
    if isinstance(value, dict):  # an undecoded Image feature
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, (bytes, bytearray, str, Image.Image)):
        raise BadSample("missing_image", where)
    return value


def _hf_row(ds, column: str, folder: Path, i: int):
    """Row i's image, read lazily (a module function: DataLoader workers get it pickled)."""
    return hf_image(ds[i][column], f"{folder}[{i}]")


class ImageDataset(Dataset):
    """`size` x `size` uint8 RGB crops `[3,S,S]` of one source, plus their index; `names[i]` says
    where item i comes from (its path, or "<folder>[row]") and is its key in a cache."""

    fields = ("image",)

    def __init__(self, load: Callable, items: list, size: int, names: list[str]):
        self._load, self.items, self.size, self.names = load, items, size, names

    def __len__(self):
        return len(self.items)

    def key(self, i: int) -> str:
        return self.names[i]

    def subset(self, indices: Sequence[int]) -> "ImageDataset":
        return ImageDataset(self._load, [self.items[i] for i in indices], self.size, [self.names[i] for i in indices])

    def __getitem__(self, i: int) -> dict[str, Any]:
        # A file that passed the scan but fails to decode now is replaced by the next item, so
        # every process keeps the same batch shapes; the warning names it.
        for k in range(len(self.items)):
            j = (i + k) % len(self.items)
            try:
                return {"image": read_crop(self._load(self.items[j]), self.size, where=self.names[j]), "index": i}
            except (BadSample, DataError) as err:
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
    too_small = f"smaller than {min_size} px"
    if kind == "hf":
        rows = open_hf(root, hf_split, "data.hf_split", {hf_column: "data.hf_column"})
        load, items = partial(_hf_row, rows, hf_column, root), list(range(len(rows)))
        report.found = len(items)
        if verify == "full":
            kept = []
            for i in items:
                try:
                    read_crop(load(i), size, min_size)
                    kept.append(i)
                except BadSample as bad:
                    report.skip(too_small if bad.reason == "too_small" else SCAN_REASONS["unreadable"], f"row {i}")
            items = kept
        dataset = ImageDataset(load, items, size, [f"{root}[{i}]" for i in items])
    else:  # folder or manifest (data.kind's schema refuses anything else)
        paths = _folder_paths(root, report) if kind == "folder" else _manifest_paths(root, manifest_key, report)
        items = []
        for path, reason in zip(paths, check_image_files(paths, min_size, decode=verify == "full")):
            if reason:
                report.skip(too_small if reason == "too_small" else SCAN_REASONS[reason], str(path))
            else:
                items.append(path)
        dataset = ImageDataset(Path, items, size, [str(p) for p in items])  # Path(path): the item as it is
    report.used = len(dataset)
    if report.used == 0:
        raise DataError(f"no usable images in {source}: {report.summary()}. Check the path, the file types "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))}) and the data report")
    return dataset, report
