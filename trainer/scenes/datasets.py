"""Write scenes datasets in the trainer's input formats (docs/SCENES.md, docs/GENERATOR_DATA.md).

Item i of (split, seed) is drawn from `rng_for(split, seed, i)` alone, so a set is the same whatever
the number of workers, and a longer set starts with the shorter one.

  images  DIR/NNNNNN.png + DIR/scenes.jsonl                 data.source=DIR (VAE stages) or the manifest
  t2i     DIR/NNNNNN.png + DIR/NNNNNN.txt + DIR/captions.jsonl   caption folder or jsonl manifest
  edit    DIR/source/NNNNNN.png + DIR/target/NNNNNN.png + DIR/instructions.jsonl   edit folder
Each jsonl line also carries the exact truth: the scene (and the prompt's spec or the edit spec).
"""
from __future__ import annotations

import json
import os
from multiprocessing import get_context
from pathlib import Path

from .captions import prompt, scene_for
from .edits import make_edit
from .world import render, rng_for, sample_scene

KINDS = ("images", "t2i", "edit")
MANIFESTS = {"images": "scenes.jsonl", "t2i": "captions.jsonl", "edit": "instructions.jsonl"}


def make_item(kind: str, split: str, seed: int, index: int) -> tuple[dict, dict]:
    """(images by relative path, manifest row) of item `index`."""
    rng = rng_for(split, seed, index)
    name = f"{index:06d}"
    if kind == "images":
        scene = sample_scene(rng, split)
        return {f"{name}.png": render(scene)}, {"image": f"{name}.png", "key": name, "scene": scene.to_dict()}
    if kind == "t2i":
        text, spec = prompt(rng, split)
        scene = scene_for(spec, rng, split)
        row = {"image": f"{name}.png", "text": text, "key": name, "spec": spec, "scene": scene.to_dict()}
        return {f"{name}.png": render(scene)}, row
    if kind == "edit":
        source = sample_scene(rng, split)
        instruction, target, spec = make_edit(source, rng, split)
        images = {f"source/{name}.png": render(source), f"target/{name}.png": render(target)}
        return images, {"name": name, "instruction": instruction, "spec": spec}
    raise ValueError(f"unknown dataset kind {kind!r}: expected one of {', '.join(KINDS)}")


def _write_item(job) -> str:
    out, kind, split, seed, index = job
    images, row = make_item(kind, split, seed, index)
    for rel, image in images.items():
        image.save(out / rel, compress_level=1)  # fast; PNG stays lossless
    if kind == "t2i":
        (out / f"{index:06d}.txt").write_text(row["text"] + "\n")
    return json.dumps(row)


def write(out, kind: str, split: str = "train", count: int = 1000, seed: int = 0, workers: int = 1) -> Path:
    """Write `count` items of `kind` to folder `out`; returns the manifest's path."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: expected one of {', '.join(KINDS)}")
    out = Path(out)
    for sub in (("source", "target") if kind == "edit" else ()):
        (out / sub).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, kind, split, seed, i) for i in range(count)]
    manifest = out / MANIFESTS[kind]
    with open(manifest, "w") as f:
        for row in _rows(jobs, workers):  # in order whatever the workers: the same manifest
            f.write(row + "\n")
    return manifest


def _rows(jobs, workers: int):
    if workers <= 1:
        yield from map(_write_item, jobs)
        return
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_write_item, jobs, chunksize=16)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))
