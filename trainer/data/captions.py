"""Caption and edit sources of the generator stages: samples, formats, report reasons and order as
docs/GENERATOR_DATA.md §1-2 describes them."""
from __future__ import annotations

import glob as _glob
import json
import logging
import os
import re
import tarfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset, IterableDataset

from .images import IMAGE_SIZE, IMAGE_SUFFIXES, check_image_files, image_files, is_image_name, load_image
from .report import BadSample, DataError, DataReport, EmptyDatasetError
from .sampling import launcher_rank
from .sources import HF_MARKERS, hf_image, jsonl_lines, open_hf, resolve

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("caption", "text", "txt", "prompt")  # json keys tried for a caption, in order
INSTRUCTION_FIELDS = ("instruction", "text", "prompt", "edit")
NAME_FIELDS = ("name", "key", "id")
# What a scan-time check (images.check_image_file) means, in this report's words.
SCAN_REASONS = {"missing": "missing_image", "too_small": "too_small"}
MAX_RETRIES = 16  # samples in a row that may fail to load before the set is called broken

PathLike = Union[str, os.PathLike]


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def _read_jsonl(path: Path, report: DataReport) -> Iterator[tuple[int, dict]]:
    """(line number, row) per JSON object line; other lines are counted as bad_manifest_line."""
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")

    def bad(n: int):
        report.found += 1
        report.skip("bad_manifest_line", f"{path}:{n}")
    for n, _line, row in jsonl_lines(path, bad=bad):
        if isinstance(row, dict):
            yield n, row
        else:
            bad(n)


def _first(row: dict, keys: Sequence[str]):
    for k in keys:
        value = row.get(k)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


@dataclass
class Entry:
    """One sample before loading: key, text, and image references by field ("image", "source")."""

    key: str
    text: Optional[str]
    images: dict


def _manifest_entries(manifest: Path, report: DataReport, columns: dict) -> list:
    """The `Entry`s of a jsonl manifest. `columns`: entry field (image fields, then "text") -> (json key,
    skip reason when missing), checked in order. Key = the line's "key"/"id", else its "image"."""
    entries, seen = [], set()
    for n, row in _read_jsonl(manifest, report):
        report.found += 1
        values = {name: _first(row, (key,)) for name, (key, _) in columns.items()}
        missing = next((reason for name, (_, reason) in columns.items() if values[name] is None), None)
        key = _first(row, ("key", "id")) or values["image"]
        if missing is not None or key in seen:
            report.skip(missing or "duplicate_key", f"{manifest}:{n}")
            continue
        seen.add(key)
        text = values.pop("text")
        entries.append(Entry(key, text, {name: resolve(manifest.parent, v) for name, v in values.items()}))
    return entries


class _MapDataset(Dataset):
    """Entries sorted by key, then permuted by `seed` (the same order on every machine); image headers
    checked when built; a sample that fails to load is counted and replaced by the next one."""

    kind = "?"
    fields: tuple = ("image",)

    def __init__(self, source: str, size: int = IMAGE_SIZE, seed: int = 0, shuffle: bool = True,
                 check_images: bool = True, min_side: int = 0):
        self.source, self.size, self.seed, self.shuffle = source, size, seed, shuffle
        self.check_images, self.min_side = check_images, min_side
        self._report = DataReport(source, self.kind)

    def _finish(self, entries: list[Entry], hint: str) -> None:
        if self.check_images and entries:
            entries = self._checked(entries)
        entries.sort(key=lambda e: e.key)
        self.entries = entries
        self._report.used = len(entries)
        if not entries:
            raise self._report.empty_error(hint)
        g = torch.Generator().manual_seed(int(self.seed))
        self.order = torch.randperm(len(entries), generator=g).tolist() if self.shuffle else list(range(len(entries)))
        if self._report.skipped:
            logger.warning("%s", self._report.summary())

    def _checked(self, entries: list[Entry]) -> list[Entry]:
        refs = [(i, ref) for i, e in enumerate(entries) for ref in e.images.values() if isinstance(ref, Path)]
        bad = set()  # an entry is skipped once, for its first bad image
        for (i, ref), reason in zip(refs, check_image_files([ref for _, ref in refs], self.min_side)):
            if reason is not None and i not in bad:
                bad.add(i)
                self._report.skip(SCAN_REASONS.get(reason, "unreadable_image"), ref)
        return [e for i, e in enumerate(entries) if i not in bad]

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, index: int) -> Entry:
        return self.entries[self.order[index]]

    def key(self, index: int) -> str:
        return self.entry(index).key

    def text(self, index: int) -> str:
        return self.entry(index).text

    def _load_image(self, ref, entry: Entry) -> torch.Tensor:
        return load_image(ref, self.size, self.min_side)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        for attempt in range(MAX_RETRIES + 1):
            i = (index + attempt) % len(self)
            entry = self.entry(i)
            try:
                return {"key": entry.key, **{name: self._load_image(entry.images[name], entry) for name in self.fields},
                        "text": self.text(i)}
            except BadSample as bad:
                # Found only now (e.g. a truncated JPEG, which PIL's verify does not catch). In a
                # DataLoader worker this count stays in the worker, so it is logged too.
                self._report.skip(bad.reason, bad.where)
                logger.warning("skipping %s (%s); using the next sample instead", bad.where, bad.reason)
        raise DataError(f"{MAX_RETRIES + 1} samples in a row from index {index} failed to load; "
                        f"{self._report.summary()}")

    def report(self) -> dict:
        return self._report.to_dict()


class CaptionFolder(_MapDataset):
    """Images under `root` (recursive) with a same-name caption file (`a/b.jpg` + `a/b.txt`); key = the
    image path relative to `root`."""

    kind = "caption-folder"

    def __init__(self, root: PathLike, **kwargs):
        root = Path(root)
        super().__init__(str(root), **kwargs)
        if not root.is_dir():
            raise DataError(f"caption folder {root} does not exist or is not a folder")
        entries = []
        for path in image_files(root):
            self._report.found += 1
            text = _read_text(path.with_suffix(".txt"))
            if text is None:
                self._report.skip("missing_caption", path)
            elif not text:
                self._report.skip("empty_caption", path)
            else:
                entries.append(Entry(path.relative_to(root).as_posix(), text, {"image": path}))
        self._finish(entries, f"Put images ({', '.join(sorted(IMAGE_SUFFIXES))}) with same-name .txt captions "
                              f"under {root}.")


class CaptionManifest(_MapDataset):
    """A jsonl manifest of `{"image": path, "text": caption}` lines (key: "key"/"id", else the image path)."""

    kind = "caption-manifest"

    def __init__(self, manifest: PathLike, **kwargs):
        manifest = Path(manifest)
        super().__init__(str(manifest), **kwargs)
        entries = _manifest_entries(manifest, self._report, {"image": ("image", "missing_image"),
                                                             "text": ("text", "missing_caption")})
        self._finish(entries, f'Each line of {manifest} needs {{"image": path, "text": caption}}.')


class HFCaptionDataset(_MapDataset):
    """A `datasets.save_to_disk` folder or parquet file(s) (path, glob or list), read lazily: a bad row
    is skipped when it is loaded. Key = "<row index>"."""

    kind = "hf-datasets"

    def __init__(self, path: Union[PathLike, Sequence[PathLike]], image_column: str = "image",
                 text_column: str = "text", split: Optional[str] = None, **kwargs):
        super().__init__(str(path), **kwargs)  # images live inside the files: checked when loaded
        ds = open_hf(path, split, "split", {image_column: "image_column", text_column: "text_column"})
        self._ds, self._image_column, self._text_column = ds, image_column, text_column
        self._texts = ds.select_columns([text_column])
        self._report.found = len(ds)
        self._finish([Entry(str(i), None, {"image": i}) for i in range(len(ds))], f"{path} has no rows.")

    def text(self, index: int) -> str:  # read lazily, like the image
        entry = self.entry(index)
        value = self._texts[entry.images["image"]][self._text_column]
        if not isinstance(value, str) or not value.strip():
            raise BadSample("missing_caption", f"{self.source}#{entry.key}")
        return value.strip()

    def _load_image(self, ref, entry: Entry) -> torch.Tensor:
        where = f"{self.source}#{entry.key}"
        return load_image(hf_image(self._ds[ref][self._image_column], where), self.size, self.min_side, where=where)


class EditFolder(_MapDataset):
    """Triplets matched by NAME (a path without suffix): `source/NAME.*`, `target/NAME.*`, and
    `instruction/NAME.txt` or one jsonl of {"name", "instruction"} (default `root/instructions.jsonl`)."""

    kind = "edit-folder"
    fields = ("source", "image")

    def __init__(self, root: PathLike, instructions: Optional[PathLike] = None, **kwargs):
        root = Path(root)
        super().__init__(str(root), **kwargs)
        src_root, tgt_root, ins_root = root / "source", root / "target", root / "instruction"
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
                    table[name.removesuffix(Path(name).suffix) if is_image_name(name) else name] = text
        sources, targets = self._by_name(src_root), self._by_name(tgt_root)
        entries = []
        for name in sorted(set(sources) | set(targets)):
            self._report.found += 1
            src, tgt = sources.get(name), targets.get(name)
            if src is None or tgt is None:
                self._report.skip("missing_source" if src is None else "missing_target", tgt or src)
                continue
            text = table.get(name) if table is not None else _read_text(ins_root / f"{name}.txt")
            if not text:
                self._report.skip("missing_instruction", src)
                continue
            entries.append(Entry(name, text, {"source": src, "image": tgt}))
        where = instructions or f"{ins_root}/NAME.txt"
        self._finish(entries, f"Put pairs as {src_root}/NAME.png + {tgt_root}/NAME.png with instructions in {where}.")

    def _by_name(self, folder: Path) -> dict[str, Path]:
        found = defaultdict(list)
        for path in image_files(folder):
            found[path.relative_to(folder).with_suffix("").as_posix()].append(path)
        for path in (p for paths in found.values() if len(paths) > 1 for p in paths):
            self._report.skip("ambiguous_name", path)  # a.png and a.jpg: which one is meant is unknowable
        return {name: paths[0] for name, paths in found.items() if len(paths) == 1}


class EditManifest(_MapDataset):
    """A jsonl manifest of {"source", "target", "instruction"} lines (key: "key"/"id", else the target path)."""

    kind = "edit-manifest"
    fields = ("source", "image")

    def __init__(self, manifest: PathLike, **kwargs):
        manifest = Path(manifest)
        super().__init__(str(manifest), **kwargs)
        entries = _manifest_entries(manifest, self._report, {"source": ("source", "missing_source"),
                                                             "image": ("target", "missing_target"),
                                                             "text": ("instruction", "missing_instruction")})
        self._finish(entries, f'Each line of {manifest} needs {{"source", "target", "instruction"}}.')


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` -> a-000.tar ... a-003.tar (zero padding kept); `{x,y}` -> both; nested ok."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [s for option in options for s in expand_braces(head + option + tail)]


def expand_shards(shards: Union[PathLike, Sequence[PathLike]]) -> list[str]:
    """Shard paths from a brace pattern, a glob, a list of either, or a text file listing them (.txt)."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out, missing = [], []
    for pattern in map(str, patterns):
        if pattern.endswith(".txt") and Path(pattern).is_file():
            listed = [ln.strip() for ln in Path(pattern).read_text().splitlines() if ln.strip()]
            out += expand_shards([str(resolve(Path(pattern).parent, x)) for x in listed])
            continue
        for path in expand_braces(os.path.expanduser(pattern)):  # a plain path globs to itself if it is there
            matched = sorted(p for p in _glob.glob(path) if os.path.isfile(p))
            if not matched:
                missing.append(path)
            out += matched
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} shard path(s) do not exist: {', '.join(missing[:3])}{more}; "
                        "fix the pattern or the list")
    if not out:
        raise EmptyDatasetError(f"no tar shard matches {patterns}")
    return out


class TarShardStream(IterableDataset):
    """webdataset-style tar shards, one pass per iteration, each sample read by exactly one of the
    (ranks x DataLoader workers) readers (the split rule: docs/GENERATOR_DATA.md). Key =
    "<shard file name>/<member key>"; `report()` counts this process's skips."""

    kind = "tar-shards"

    def __init__(self, shards, size: int = IMAGE_SIZE, text_fields: Sequence[str] = TEXT_FIELDS,
                 rank: Optional[int] = None, world_size: Optional[int] = None, min_side: int = 0):
        super().__init__()
        self.shards = expand_shards(shards)
        self.source = str(shards)
        self.size, self.text_fields = size, tuple(text_fields)
        self.rank, self.world_size, self.min_side = rank, world_size, min_side
        self._report = DataReport(self.source, self.kind)

    def report(self) -> dict:
        return self._report.to_dict()

    def __iter__(self) -> Iterator[dict]:
        rank, world = launcher_rank()
        rank, world = rank if self.rank is None else self.rank, world if self.world_size is None else self.world_size
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_partition(rank * workers + worker, world * workers)

    def iter_partition(self, reader: int, readers: int) -> Iterator[dict]:
        """The samples of reader `reader` of `readers` (= rank * num_workers + worker) in one pass."""
        by_shard = len(self.shards) >= readers
        shards = self.shards[reader::readers] if by_shard else self.shards
        groups = ((Path(shard).name, key, group) for shard in shards for key, group in self._groups(shard))
        used = 0
        for n, (name, key, group) in enumerate(groups):
            if not by_shard and n % readers != reader:
                continue
            self._report.found += 1
            try:
                item = self._decode(f"{name}/{key}", group)
            except BadSample as bad:
                self._report.skip(bad.reason, bad.where)
                continue
            used += 1
            self._report.used += 1
            yield item
        if not used and self._report.found:
            raise self._report.empty_error("Each sample needs {key}.jpg/png/webp and {key}.txt or {key}.json "
                                             f"(with one of {list(self.text_fields)}).")

    def _groups(self, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {ext: bytes}) for each run of consecutive members sharing a key, streaming the file; a
        truncated or unreadable tar ends after its readable samples and is counted as bad_shard."""
        key, group, problem = None, {}, None
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    folder, _, base = member.name.rpartition("/")
                    stem, _, ext = base.partition(".")  # webdataset's rule: the key ends at the name's first dot
                    if not member.isfile() or not stem or not ext:
                        continue
                    k = f"{folder}/{stem}" if folder else stem
                    if k != key and group:
                        yield key, group
                        group = {}
                    key = k
                    group[ext.lower()] = tar.extractfile(member).read()  # a file member: never None
        except (tarfile.TarError, OSError, EOFError) as err:
            problem = f"{type(err).__name__}: {err}"
        if group:
            yield key, group
        # tarfile reads a header cut short as the end of the archive; a whole tar is 512-byte blocks.
        if problem is None and os.path.getsize(path) % 512:
            problem = f"truncated: {os.path.getsize(path)} bytes is not a whole number of 512-byte tar blocks"
        if problem is not None:
            self._report.skip("bad_shard", f"{path} ({problem})")
            logger.warning("%s (%s); its remaining samples are skipped", path, problem)

    def _decode(self, key: str, group: dict[str, bytes]) -> dict:
        image_ext = next((e for e in group if f".{e}" in IMAGE_SUFFIXES), None)
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
        return {"key": key, "text": text, "image": load_image(group[image_ext], self.size, self.min_side, where=key)}


def t2i_format(source: str) -> str:
    """The format `open_t2i` picks for `source`: "tar" (*.tar, brace or glob of tars), "jsonl",
    "hf" (*.parquet, a glob, or a `datasets` folder) or "folder"."""
    if ".tar" in source or "{" in source:
        return "tar"
    path = Path(source)
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".parquet" or _glob.has_magic(source) or (
            path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)):
        return "hf"
    return "folder"


def open_t2i(source, format: str = "auto", *, text_fields: Sequence[str] = TEXT_FIELDS, seed: int = 0,
             check_images: bool = True, image_column: str = "image", text_column: str = "text",
             split: Optional[str] = None, **kwargs) -> Union[_MapDataset, TarShardStream]:
    """A T2I source in `format` ("auto": `t2i_format`; a list of shard paths is tar), each class given the
    options that apply to it; `kwargs` (size, min_side, ...) go to all."""
    if format == "auto":
        format = t2i_format(str(source)) if isinstance(source, (str, os.PathLike)) else "tar"
    if format == "tar":
        return TarShardStream(source, text_fields=text_fields, **kwargs)
    kwargs.update(seed=seed, check_images=check_images)
    if format == "hf":
        return HFCaptionDataset(source, image_column, text_column, split, **kwargs)
    return {"jsonl": CaptionManifest, "folder": CaptionFolder}[format](source, **kwargs)


def open_edit(source: PathLike, format: str = "auto", **kwargs) -> _MapDataset:
    """An edit source: "jsonl" (auto: a *.jsonl path) -> EditManifest, "folder" -> EditFolder."""
    if format == "auto":
        format = "jsonl" if Path(source).suffix == ".jsonl" else "folder"
    return {"jsonl": EditManifest, "folder": EditFolder}[format](source, **kwargs)


def dropout_masks(batch_size: int, p_text: float, p_image: float = 0.0,
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_text, keep_image): bool [batch_size], True = keep, each dropped with its own probability,
    independently (caption dropout for CFG; for edits, the text / source dropout of dual guidance); the
    config schema keeps both in [0, 1]."""
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(2, batch_size, generator=generator, device=device)
    return u[0] >= p_text, u[1] >= p_image


