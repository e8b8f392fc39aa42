"""The toy understanding encoder: a small DINOv2-with-registers ViT pretrained on the scenes world.

    python -m trainer.scenes.encoder --out WORK/encoder [--steps 1500 --batch-size 128 ...]

It plays the part of DINOv2 in the miniature (docs/SCENES.md): the same transformers architecture
(`Dinov2WithRegistersModel`, 224-px input, patch 14 -> a 16x16 grid, 4 registers), read by the
trainer exactly as a user's DINOv2 folder (`model.encoder_weights=FOLDER`, family `dinov2_reg`).
It learns semantics, not pixels: a linear head on its (LayerNorm-ed) patch features predicts the
class of each of the SUB x SUB sub-cells of its patch (`world.label_grid` at 64x64: background or
one of the colour-shape pairs), so the features say what is where, down to a quarter of a patch,
and nothing forces them to keep texture or exact shading. One class per patch (SUB=1, the first
round) left the outlines of small shapes out of the features: every decoder rounded stars into
blobs (docs/SCENES.md).

The folder it writes holds `config.json` + `model.safetensors` (save_pretrained),
`preprocessor_config.json` (ImageNet mean/std, as DINOv2's), and `encoder_report.json` with the
training curve and the linear-probe accuracy on held-out (validation-split) scenes.

`linear_probe` is the one probe of the project: the evaluation runs the same function on each
VAE's latents (trainer/scenes/evaluate.py).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from psvae_core.config import EncoderConfig
from psvae_core.encoders import IMAGENET_MEAN, IMAGENET_STD, RepresentationEncoder

from . import world

GRID = 16  # 224 / 14: the encoder's patch grid, also the PS-VAE latent grid
IMAGE_SIZE = 256  # the trainer's crop; the encoder resizes it to 224 itself (as in training the VAEs)
SUB = 4  # the pretraining labels: SUB x SUB sub-cells per patch (4 px of the 256-px image each)


def encoder_config(hidden: int = 192, layers: int = 6, heads: int = 3) -> dict:
    """The transformers config of the toy encoder (DINOv2-B with registers, scaled down)."""
    return dict(model_type="dinov2_with_registers", hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=4 * hidden, patch_size=14, image_size=224,
                num_register_tokens=4, layerscale_value=1.0)


# --------------------------------------------------------------------------- scenes as tensors

# Scene sets (world.rng_for's `seed`) of each use, so no two uses share scenes.
ENCODER_SET, PROBE_TRAIN_SET, PROBE_TEST_SET = 101, 102, 103


def _render_one(args) -> tuple[np.ndarray, np.ndarray]:
    split, seed, index, size, grid = args
    scene = world.sample_scene(world.rng_for(split, seed, index), split)
    return np.array(world.render(scene, size)), world.label_grid(scene, grid)


def render_scenes(split: str, seed: int, count: int, size: int = IMAGE_SIZE, workers: int = 1,
                  grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes 0..count-1 of set `seed` of `split` as (uint8 [N,3,size,size], int64 labels
    [N,grid,grid]), rendered in `workers` processes (the same bytes whatever the count)."""
    jobs = [(split, seed, i, size, grid) for i in range(count)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            out = list(pool.map(_render_one, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
    else:
        out = [_render_one(j) for j in jobs]
    images = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(np.stack([o[1] for o in out]))
    return images, labels


# --------------------------------------------------------------------------- the linear probe

@torch.no_grad()
def grid_features(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, device,
                  batch_size: int = 64) -> torch.Tensor:
    """fn(images 0..1 [B,3,H,W]) -> [B,C,16,16] over `images` (uint8), as float32 [N,C,16,16] on CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        x = images[s:s + batch_size].to(device).float() / 255
        f = fn(x).float()
        if tuple(f.shape[-2:]) != (GRID, GRID):
            raise ValueError(f"linear probe: features on a {tuple(f.shape[-2:])} grid; the labels are {GRID}x{GRID}")
        out.append(f.cpu())
    return torch.cat(out)


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, device="cpu", steps: int = 300, lr: float = 0.01,
                 batch_size: int = 8192, seed: int = 0) -> dict:
    """A linear classifier on frozen per-cell features ([N,C,16,16] -> the cell's class).

    Features are standardised with the training set's per-channel mean/std (so the result does not
    depend on the latent's scale), then one nn.Linear is trained with AdamW on the training cells.
    Returns accuracy over all test cells, over object cells only (background is ~3/4 of the cells,
    so this is the number that shows semantics), and the class-balanced accuracy over object classes.
    """
    def rows(f):
        return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])

    xtr, xte = rows(train_features), rows(test_features)
    ytr, yte = train_labels.reshape(-1), test_labels.reshape(-1)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = ((xtr - mean) / std).to(device), ((xte - mean) / std).to(device)
    ytr, yte = ytr.to(device), yte.to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # a seeded head init: the same number every run
        torch.manual_seed(seed)
        head = nn.Linear(xtr.shape[1], world.NUM_CLASSES).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(len(xtr), (min(batch_size, len(xtr)),), generator=g).to(device)
        loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.cat([head(xte[s:s + 65536]).argmax(1) for s in range(0, len(xte), 65536)])
    hit = pred == yte
    obj = yte != 0
    classes = [c for c in yte[obj].unique().tolist()]
    balanced = sum(hit[yte == c].float().mean().item() for c in classes) / max(1, len(classes))
    return {"accuracy": hit.float().mean().item(), "object_accuracy": hit[obj].float().mean().item(),
            "object_balanced_accuracy": balanced, "train_cells": int(len(ytr)), "test_cells": int(len(yte)),
            "feature_dim": int(xtr.shape[1]), "steps": steps}


def probe_sets(train_count: int, test_count: int, workers: int) -> dict:
    """The probe's scenes: `train_count` training-split scenes and `test_count` held-out
    validation-split scenes, apart from every other use's scenes."""
    return {"train": render_scenes("train", PROBE_TRAIN_SET, train_count, workers=workers),
            "test": render_scenes("val", PROBE_TEST_SET, test_count, workers=workers)}


def probe(fn, sets: dict, device, steps: int = 300) -> dict:
    """`linear_probe` of the features `fn` gives on the probe scenes of `probe_sets`."""
    ftr = grid_features(fn, sets["train"][0], device)
    fte = grid_features(fn, sets["test"][0], device)
    return linear_probe(ftr, sets["train"][1], fte, sets["test"][1], device=device, steps=steps)


# --------------------------------------------------------------------------- pretraining

def save_encoder(encoder: RepresentationEncoder, folder: Path) -> None:
    """A Hugging Face-layout folder that `RepresentationEncoder.from_pretrained` (and so the
    trainer's `model.encoder_weights`) loads like a DINOv2 download."""
    folder.mkdir(parents=True, exist_ok=True)
    model = encoder.model
    model.layernorm = encoder.final_norm  # put the detached final norm back for a complete file
    try:
        model.save_pretrained(folder)  # safetensors
    finally:
        model.layernorm = nn.Identity()
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 3,
    }, indent=2) + "\n")


def pretrain(out: Path, steps: int = 1500, batch_size: int = 128, lr: float = 1e-3, train_scenes: int = 12000,
             probe_train: int = 1000, probe_test: int = 500, workers: int = 8, hidden: int = 192, layers: int = 6,
             heads: int = 3, device: Optional[str] = None, seed: int = 0, log_every: int = 50,
             sub: int = SUB) -> dict:
    """Train the toy encoder on dense labels (`sub` x `sub` per patch) and write its folder; returns the report."""
    start = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    t = time.time()
    images, labels = render_scenes("train", ENCODER_SET, train_scenes, workers=workers, grid=GRID * sub)
    render_s = time.time() - t
    config = EncoderConfig(family="dinov2_reg", hf_config=encoder_config(hidden, layers, heads), image_size=224,
                           feature_norm="layernorm")
    encoder = RepresentationEncoder(config).set_trainable(True).to(device).train()
    head = nn.Linear(hidden, sub * sub * world.NUM_CLASSES).to(device)  # each patch: its sub-cells' classes
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        images, labels = images.to(device), labels.to(device)  # 2.4 GB at 12k scenes: no per-step copies
    g = torch.Generator().manual_seed(seed)
    curve = []
    t = time.time()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=g).to(images.device)
        flip = (torch.rand(batch_size, generator=g) < 0.5).to(images.device)  # mirror image and labels together
        x, y = images[idx], labels[idx]
        x, y = torch.where(flip[:, None, None, None], x.flip(-1), x), torch.where(flip[:, None, None], y.flip(-1), y)
        x, y = x.to(device).float() / 255, y.to(device)
        with autocast:
            logits = head(encoder(x).permute(0, 2, 3, 1))  # [B,16,16,sub*sub*classes]
        logits = rearrange(logits, "b h w (i j c) -> b (h i) (w j) c", i=sub, j=sub)  # the label grid's layout
        loss = F.cross_entropy(logits.float().reshape(-1, world.NUM_CLASSES), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            acc = (logits.argmax(-1) == y).float().mean().item()
            curve.append({"step": step + 1, "loss": round(loss.item(), 4), "accuracy": round(acc, 4)})
            print(f"encoder step {step + 1}/{steps} loss {loss.item():.4f} cell accuracy {acc:.3f}", flush=True)
    train_s = time.time() - t
    encoder.eval()
    save_encoder(encoder, out)
    # The probe runs on the folder as the trainer loads it, so the number describes what is shipped.
    loaded = RepresentationEncoder.from_pretrained(out, family="dinov2_reg", image_size=224).to(device).eval()
    t = time.time()
    sets = probe_sets(probe_train, probe_test, workers)
    result = probe(loaded, sets, device)
    report = {"probe": result, "curve": curve, "config": encoder_config(hidden, layers, heads),
              "parameters": sum(p.numel() for p in encoder.parameters()),
              "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "scenes": train_scenes, "seed": seed,
                        "label_grid": GRID * sub},
              "seconds": {"render": round(render_s, 1), "train": round(train_s, 1),
                          "probe": round(time.time() - t, 1), "total": round(time.time() - start, 1)},
              "device": str(device)}
    (out / "encoder_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"encoder: probe accuracy {result['accuracy']:.3f} (object cells {result['object_accuracy']:.3f}); "
          f"wrote {out}", flush=True)
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the encoder folder to write")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-scenes", type=int, default=12000, help="training scenes rendered once into memory")
    p.add_argument("--probe-train", type=int, default=1000)
    p.add_argument("--probe-test", type=int, default=500)
    p.add_argument("--workers", type=int, default=8, help="rendering processes")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sub", type=int, default=SUB, help="label sub-cells per patch side (1: one class per patch)")
    a = p.parse_args(argv)
    return pretrain(Path(a.out), a.steps, a.batch_size, a.lr, a.train_scenes, a.probe_train, a.probe_test,
                    a.workers, a.hidden, a.layers, a.heads, a.device, a.seed, sub=a.sub)


if __name__ == "__main__":
    main()
