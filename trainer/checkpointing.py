"""Training-state checkpoints: atomic folders with a completion marker.

    <run>/checkpoints/step_00001000/
        trainer_state.json      step (also the data position), counters, config hash, batch layout
        <group>.safetensors     weights of each trained module (model, disc)
        <group>.ema.safetensors EMA weights
        <group>.optim.pt        optimiser + LR schedule state (tensors and numbers only)
        scaler.pt               fp16 grad scaler
        rng_rank<k>.pt          each process's RNG states
        COMPLETE                written last

A checkpoint is written into a hidden `.step_XXXXXXXX.tmp` folder by every process, then rank 0
writes COMPLETE and renames the folder into place, so `latest` never sees a partial one.
`.pt` files are read with `torch.load(weights_only=True)`: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from psvae_core.checkpoint import fsync_path

MARKER = "COMPLETE"
_NAME = re.compile(r"^step_(\d{8})$")


class ResumeError(ValueError):
    """A checkpoint cannot be resumed; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: Optional[str], root: Path) -> Optional[Path]:
    """`checkpoint.resume` -> a checkpoint folder, or None to start fresh."""
    if resume is None:
        return None
    if resume == "latest":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ResumeError(f"checkpoint.resume={resume}: no such folder; pass `latest` or a folder under {root}")
    if not (path / MARKER).is_file():
        raise ResumeError(f"{path} has no {MARKER} marker: the save was interrupted. Pick an earlier checkpoint "
                          f"(complete ones: {[p.name for _, p in complete_checkpoints(path.parent)]})")
    return path


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".{step_dir_name(step)}.tmp"


def begin(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary folder for step `step`."""
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
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
    if not path.is_file():
        raise ResumeError(f"{path} is missing from the checkpoint; it is damaged, pick another one")
    return load_file(str(path))


def save_object(path: Path, obj) -> None:
    torch.save(obj, path)


def load_object(path: Path):
    if not path.is_file():
        raise ResumeError(f"{path} is missing from the checkpoint; it is damaged, pick another one")
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ResumeError(f"{path} is missing; the checkpoint is damaged, pick another one")
    return json.loads(path.read_text())
