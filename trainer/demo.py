"""The README's main job: train a small PS-VAE on real photos (svae, then psvae) and report.

    python -m trainer.demo --out outputs/demo

About three minutes on a 2-core CPU. README.md ("make demo") says what it trains on and what it writes
into --out: report.json, comparison.png, reconstructions/, vae.safetensors and the runs (runs/svae, runs/psvae).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid

from psvae_core import metrics
from psvae_core.autoencoder import PSVAE

from .config import load_config
from .data import read_crop, to_pil
from .loop import train
from .rng import seed_everything
from .samples import sample_photos
from .vae_stages import PSVAEStage, SVAEStage, model_config

CONFIGS = Path(__file__).resolve().parent / "configs"
HELD_OUT = ("chelsea", "coffee", "motorcycle_right")  # the cat, the cup and one of the stereo pair
SIZE = 256


def _score(vae: PSVAE, x: torch.Tensor, n_train: int) -> tuple[dict, dict, torch.Tensor]:
    """`metrics.evaluate_reconstruction` of the photos `x` (training ones first) -> (mean PSNR/SSIM per split,
    per-image PSNR/SSIM, the reconstructions)."""
    recons = []  # the callback's (start, originals, reconstructions): keep the clamped reconstructions
    per = metrics.evaluate_reconstruction(vae, [x], resolution=SIZE,
                                          callback=lambda _, __, y: recons.append(y))["per_image"]
    means = {split: {"psnr": round(float(np.mean(per["psnr"][rows])), 3),
                     "ssim": round(float(np.mean(per["ssim"][rows])), 4)}
             for split, rows in (("train", slice(0, n_train)), ("held_out", slice(n_train, None)))}
    return means, per, recons[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--svae-steps", type=int, default=None, help="override svae_demo.yaml's train.max_steps")
    parser.add_argument("--psvae-steps", type=int, default=None, help="override psvae_demo.yaml's train.max_steps")
    args = parser.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    shutil.rmtree(out / "runs", ignore_errors=True)  # a fresh demo every time
    out.mkdir(parents=True, exist_ok=True)

    photos = sample_photos(SIZE)
    names = [n for n in photos if n not in HELD_OUT] + [n for n in HELD_OUT if n in photos]
    n_train = len(names) - len(HELD_OUT)
    files = [out / "photos" / ("held_out" if n in HELD_OUT else "train") / f"{n}.png" for n in names]
    shutil.rmtree(out / "photos", ignore_errors=True)
    for name, file in zip(names, files):
        file.parent.mkdir(parents=True, exist_ok=True)
        photos[name].save(file)
    # Scored on the files the runs train on, read by the trainer's one image rule.
    x = torch.stack([read_crop(file, SIZE) for file in files]).float() / 255

    common = [f"data.source={out / 'photos' / 'train'}", f"data.val_source={out / 'photos' / 'held_out'}",
              f"run.output_dir={out / 'runs'}", f"run.seed={args.seed}"]
    steps = {"svae": args.svae_steps, "psvae": args.psvae_steps}
    report: dict = {"photos": {"train": names[:n_train], "held_out": names[n_train:]}, "stages": {}, "seconds": {}}
    recon_rows, per_image = [], {}

    def config(stage, *overrides):
        max_steps = [f"train.max_steps={steps[stage.name]}"] if steps[stage.name] else []
        return load_config(stage.config_class, stage.name, str(CONFIGS / f"{stage.name}_demo.yaml"),
                           [*common, *overrides, *max_steps])

    def score(name: str, vae: PSVAE):
        report["stages"][name], per_image[name], recon = _score(vae, x, n_train)
        recon_rows.append(recon)

    def run_stage(stage, cfg) -> dict:
        t = time.time()
        summary = train(stage, cfg)
        report["seconds"][stage.name] = round(time.time() - t, 1)
        score(stage.name, PSVAE.from_file(summary["export"]))
        return summary

    cfg1 = config(SVAEStage)
    seed_everything(args.seed)  # the same initial weights the svae run starts from
    score("untrained", PSVAE(model_config(cfg1.model, "psvae")).eval())
    summary1 = run_stage(SVAEStage, cfg1)
    summary2 = run_stage(PSVAEStage, config(PSVAEStage, f"model.init_from={summary1['export']}"))
    per = per_image["psvae"]

    (out / "reconstructions").mkdir(exist_ok=True)
    for name, image in zip(names, recon_rows[-1]):
        to_pil(image).save(out / "reconstructions" / f"{name}.png")
    grid = make_grid(torch.cat([x, *recon_rows]), nrow=len(names), padding=2)
    to_pil(grid).save(out / "comparison.png")
    shutil.copyfile(summary2["export"], out / "vae.safetensors")

    report.update({
        "images": {n: {"psnr": round(p, 3), "ssim": round(s, 4), "held_out": n in HELD_OUT}
                   for n, p, s in zip(names, per["psnr"], per["ssim"])},
        "mean": {"psnr": round(float(np.mean(per["psnr"])), 3), "ssim": round(float(np.mean(per["ssim"])), 4)},
        "resolution": [SIZE, SIZE],
        "comparison_rows": ["originals", "untrained", "after svae", "after psvae"],
        "runs": {"svae": summary1["run_dir"], "psvae": summary2["run_dir"]},
        "steps": {"svae": summary1["step"], "psvae": summary2["step"]},
        "metrics": metrics.METRIC_IMPLEMENTATIONS,
    })
    report["seconds"]["total"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))

    print(f"\n{'':12s} {'train PSNR':>11s} {'SSIM':>7s} {'held-out PSNR':>14s} {'SSIM':>7s}")
    for stage, row in report["stages"].items():
        print(f"{stage:12s} {row['train']['psnr']:9.2f}dB {row['train']['ssim']:7.4f} "
              f"{row['held_out']['psnr']:12.2f}dB {row['held_out']['ssim']:7.4f}")
    print(f"wrote {out}/ (report.json, comparison.png, reconstructions/, vae.safetensors, runs/) "
          f"in {report['seconds']['total']:.0f} s")
    return report


if __name__ == "__main__":
    main()
