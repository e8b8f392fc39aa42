"""Shared helpers of the trainer tests (no tests here): tiny configs, photo folders, weight comparison."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY_SVAE = ROOT / "trainer" / "configs" / "svae_tiny.yaml"
TINY_PSVAE = ROOT / "trainer" / "configs" / "psvae_tiny.yaml"

# A discriminator from step 2 and EMA on: resume and multi-process tests must cover both.
GAN_ON = ["gan.weight=0.5", "gan.start_step=2", "gan.disc_start_step=1", "gan.ndf=16", "gan.n_layers=2"]


def write_sample_photos(folder, size: int = 256, names=None) -> list[Path]:
    """The bundled photos (trainer.samples) as `folder/<name>.png`."""
    from trainer.samples import SAMPLE_PHOTOS, sample_photos

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in sample_photos(size, names or SAMPLE_PHOTOS).items():
        paths.append(folder / f"{name}.png")
        image.save(paths[-1])
    return paths


def photos(folder: Path, size: int = 128) -> Path:
    write_sample_photos(folder, size)
    return folder


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600, **kwargs)


def torchrun(*args, entry=("-m", "trainer")) -> subprocess.CompletedProcess:
    """Two gloo processes (CPU) running `entry` (the trainer, or a script) with `args`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           "--master_addr=127.0.0.1", *entry, *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)


def weights(checkpoint: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / name))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]
