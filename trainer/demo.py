"""The README's main job: real photos through a small PS-VAE, with a PSNR/SSIM report.

    python -m trainer.demo --out outputs/demo

Writes into --out: reconstructions/<photo>.png, comparison.png (originals above
reconstructions), vae.safetensors (the model used) and report.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

from psvae_core import metrics
from psvae_core.autoencoder import PSVAE
from psvae_core.config import PRESETS

from .samples import sample_photos


def reconstruct_and_report(vae: PSVAE, photos: dict, out: Path, batch: int = 4) -> dict:
    names = list(photos)
    originals = torch.stack([pil_to_tensor(photos[n]) for n in names]).float() / 255
    with torch.no_grad():
        recon = torch.cat([vae.reconstruct(originals[i:i + batch]) for i in range(0, len(names), batch)])
    target = torch.nn.functional.interpolate(originals, size=recon.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
    psnr, ssim = metrics.psnr(recon, target), metrics.ssim(recon, target)
    (out / "reconstructions").mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, recon):
        to_pil_image(image).save(out / "reconstructions" / f"{name}.png")
    to_pil_image(make_grid(torch.cat([target, recon]), nrow=len(names), padding=2)).save(out / "comparison.png")
    return {
        "images": {n: {"psnr": round(p, 3), "ssim": round(s, 4)} for n, p, s in zip(names, psnr.tolist(), ssim.tolist())},
        "mean": {"psnr": round(psnr.mean().item(), 3), "ssim": round(ssim.mean().item(), 4)},
        "resolution": list(recon.shape[-2:]),
        "metrics": metrics.METRIC_IMPLEMENTATIONS,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="PS-VAE preset")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch.manual_seed(args.seed)
    vae = PSVAE(PRESETS[args.preset]).eval()
    photos = sample_photos(256)
    report = {"preset": args.preset, "trained": False, **reconstruct_and_report(vae, photos, out)}
    vae.save(out / "vae.safetensors", provenance={"stage": "demo-untrained", "seed": args.seed})
    report["seconds"] = round(time.time() - start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for name, row in report["images"].items():
        print(f"{name:22s} PSNR {row['psnr']:7.3f} dB  SSIM {row['ssim']:.4f}")
    print(f"{'mean':22s} PSNR {report['mean']['psnr']:7.3f} dB  SSIM {report['mean']['ssim']:.4f}")
    print(f"wrote {out}/ (report.json, comparison.png, reconstructions/, vae.safetensors)")
    return report


if __name__ == "__main__":
    main()
