"""Training-state checkpoints: atomic `step_XXXXXXXX/` folders with a COMPLETE marker written last
(layout, resume rules: docs/TRAINER.md "Exact resume and checkpoints"). `.pt` files are read with
`torch.load(weights_only=True)`: nothing is ever unpickled. A checkpoint is verified (`verify`)
before a resume; with `latest` a damaged one is skipped for the previous one.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from psvae_core.checkpoint import fsync_path

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d{8})$")


class ResumeError(ValueError):
    """A checkpoint cannot be resumed; the message says why and what to do."""


class OutputError(OSError):
    """The run folder cannot be written (read-only, a path through a file, disk full); the message
    names the folder, its free space and the fix."""


def free_space(path: Path) -> str:
    """Free space on the file system of `path` (or of its nearest existing parent), e.g. '3.2 GiB'."""
    path = Path(path).absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def output_error(folder: Path, err: OSError, doing: str) -> OutputError:
    if err.errno == errno.ENOSPC:
        return OutputError(f"disk full while {doing} in {folder} ({free_space(folder)} free); free some space or "
                           f"set run.output_dir elsewhere, then continue with checkpoint.resume=latest")
    return OutputError(f"cannot write {folder} while {doing} ({err.strerror or err}; {free_space(folder)} free): "
                       f"set run.output_dir to a writable folder")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / MARKER).is_file())


def resolve_resume(resume: Optional[str], root: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """`checkpoint.resume` -> a verified checkpoint folder, or None to start fresh. With `latest`, a
    damaged checkpoint is skipped for the previous complete one (one line each through `log`)."""
    if resume is None:
        return None
    if resume == "latest":
        damaged = []
        for _, folder in reversed(complete_checkpoints(root)):
            try:
                verify(folder)
            except ResumeError as err:
                damaged.append(str(err))
                continue
            for problem in damaged:
                log(f"warning: {problem}; resuming from the previous complete checkpoint, {folder.name}")
            return folder
        if damaged:
            raise ResumeError(f"every checkpoint under {root} is damaged ({'; '.join(damaged)}); "
                              f"start again with another run.name")
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ResumeError(f"checkpoint.resume={resume}: no such folder; pass `latest` or a folder under {root}")
    if not (path / MARKER).is_file():
        raise ResumeError(f"{path} has no {MARKER} marker: the save was interrupted. Pick an earlier checkpoint "
                          f"(complete ones: {[p.name for _, p in complete_checkpoints(path.parent)]})")
    verify(path)
    return path


def _read(path: Path, reader: Callable[[Path], Any]):
    """`reader(path)`; a missing or unreadable file is a ResumeError naming it (safetensors, zip and
    JSON errors name no file)."""
    if not path.is_file():
        raise ResumeError(f"checkpoint {path.parent.name} is damaged: {path.name} is missing; pick another one")
    try:
        return reader(path)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ResumeError(f"checkpoint {path.parent.name} is damaged: {path.name} cannot be read ({reason})") from None


def verify(folder: Path) -> None:
    """Open every file of a complete checkpoint (headers and archive directories, not every byte)
    and check that its step agrees with its marker; a ResumeError names the first damaged file."""
    step = read_json(folder / MARKER).get("step")
    state = read_json(folder / "trainer_state.json")
    if not isinstance(step, int) or state.get("step") != step:
        raise ResumeError(f"checkpoint {folder.name} is damaged: trainer_state.json says step {state.get('step')!r}, "
                          f"its {MARKER} marker step {step!r}")
    readers = {".safetensors": lambda f: safe_open(str(f), "pt"), ".json": _json_object,
               ".pt": lambda f: torch.load(f, map_location="cpu", weights_only=True, mmap=True)}
    for file in sorted(folder.iterdir()):
        if file.suffix in readers:
            _read(file, readers[file.suffix])


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".{step_dir_name(step)}.tmp"


def begin(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary folder for step `step`."""
    tmp = tmp_dir(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(root: Path, step: int, keep_last: int) -> Path:
    """Rank 0, after every process wrote its files: marker, atomic rename, pruning."""
    tmp, final = tmp_dir(root, step), root / step_dir_name(step)
    for file in tmp.iterdir():
        fsync_path(file)
    (tmp / MARKER).write_text(json.dumps({"step": step}) + "\n")
    fsync_path(tmp / MARKER)
    fsync_path(tmp)
    if final.exists():  # re-saving a step (e.g. signal right after a scheduled save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    if keep_last > 0:
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # Own CPU copies: safetensors refuses tensors that share storage.
    save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, lambda p: load_file(str(p)))


def save_object(path: Path, obj) -> None:
    with open(path, "wb") as file:  # through a Python file: a full disk is OSError(ENOSPC), not a zip error
        torch.save(obj, file)


def load_object(path: Path):
    return _read(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _json_object(path: Path) -> dict:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_json(path: Path) -> dict:
    return _read(path, _json_object)
