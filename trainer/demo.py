"""The README's main job: train a small PS-VAE on real photos (svae, then psvae) and report.

    python -m trainer.demo --out outputs/demo

On a 2-core CPU in about three minutes (152 s measured on an idle machine) it trains the `tiny` preset on 9 of the 12 bundled photos
(3 are held out), with the real trainer (`trainer/configs/svae_demo.yaml`, `psvae_demo.yaml`),
and writes into --out:

    report.json          PSNR/SSIM before training, after svae and after psvae (train and
                         held-out photos), per-photo numbers, wall times, metric implementations
    comparison.png       rows: originals, untrained, after svae, after psvae (held-out photos last)
    reconstructions/     the final model's reconstruction of every photo
    vae.safetensors      the exported PS-VAE (EMA weights, latent stats, provenance)
    runs/svae, runs/psvae  the training runs (config.yaml, metrics.jsonl, TensorBoard, samples/)
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from torchvision.utils import make_grid

from psvae_core import metrics
from psvae_core.autoencoder import PSVAE

from .config import load_config
from .data import read_crop, to_pil
from .evaluate import evaluate_reconstruction
from .loop import train
from .rng import seed_everything
from .samples import sample_photos
from .vae_stages import PSVAEStage, SVAEStage, model_config

CONFIGS = Path(__file__).resolve().parent / "configs"
HELD_OUT = ("chelsea", "coffee", "motorcycle_right")  # the cat, the cup and one of the stereo pair
SIZE = 256


def _stage_report(vae: PSVAE, train_x: torch.Tensor, held_x: torch.Tensor) -> dict:
    out = {}
    for split, x in (("train", train_x), ("held_out", held_x)):
        r = evaluate_reconstruction(vae, [x], resolution=SIZE)
        out[split] = {"psnr": round(r["psnr"]["mean"], 3), "ssim": round(r["ssim"]["mean"], 4)}
    return out


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
    for split, keep in (("train", lambda n: n not in HELD_OUT), ("held_out", lambda n: n in HELD_OUT)):
        folder = out / "photos" / split
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in names:
            if keep(name):
                photos[name].save(folder / f"{name}.png")
    # Scored on the files the runs train on, read by the trainer's one image rule.
    x = torch.stack([read_crop(out / "photos" / ("held_out" if n in HELD_OUT else "train") / f"{n}.png", SIZE)
                     for n in names]).float() / 255
    n_train = len(names) - len(HELD_OUT)
    train_x, held_x = x[:n_train], x[n_train:]

    common = [f"data.source={out / 'photos' / 'train'}", f"data.val_source={out / 'photos' / 'held_out'}",
              f"run.output_dir={out / 'runs'}", f"run.seed={args.seed}"]
    cfg1 = load_config(SVAEStage.config_class, "svae", str(CONFIGS / "svae_demo.yaml"),
                       common + ([f"train.max_steps={args.svae_steps}"] if args.svae_steps else []))
    seed_everything(args.seed)  # the same initial weights the svae run starts from
    untrained = PSVAE(model_config(cfg1.model, "psvae")).eval()
    report: dict = {"photos": {"train": names[:n_train], "held_out": names[n_train:]}, "stages": {},
                    "seconds": {}}
    report["stages"]["untrained"] = _stage_report(untrained, train_x, held_x)
    recon_rows = [untrained.reconstruct(x).float()]

    t = time.time()
    summary1 = train(SVAEStage, cfg1)
    report["seconds"]["svae"] = round(time.time() - t, 1)
    svae = PSVAE.from_file(summary1["export"])
    report["stages"]["svae"] = _stage_report(svae, train_x, held_x)
    recon_rows.append(svae.reconstruct(x).float())

    cfg2 = load_config(PSVAEStage.config_class, "psvae", str(CONFIGS / "psvae_demo.yaml"),
                       common + [f"model.init_from={summary1['export']}"]
                       + ([f"train.max_steps={args.psvae_steps}"] if args.psvae_steps else []))
    t = time.time()
    summary2 = train(PSVAEStage, cfg2)
    report["seconds"]["psvae"] = round(time.time() - t, 1)
    vae = PSVAE.from_file(summary2["export"])
    report["stages"]["psvae"] = _stage_report(vae, train_x, held_x)
    final = vae.reconstruct(x).float()
    recon_rows.append(final)

    (out / "reconstructions").mkdir(exist_ok=True)
    for name, image in zip(names, final):
        to_pil(image).save(out / "reconstructions" / f"{name}.png")
    grid = make_grid(torch.cat([x, *recon_rows]), nrow=len(names), padding=2)
    to_pil(grid).save(out / "comparison.png")
    shutil.copyfile(summary2["export"], out / "vae.safetensors")

    psnr, ssim = metrics.psnr(final, x), metrics.ssim(final, x)
    report.update({
        "images": {n: {"psnr": round(p, 3), "ssim": round(s, 4), "held_out": n in HELD_OUT}
                   for n, p, s in zip(names, psnr.tolist(), ssim.tolist())},
        "mean": {"psnr": round(psnr.mean().item(), 3), "ssim": round(ssim.mean().item(), 4)},
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
