"""T2I stage (653M preset) through the real trainer CLI on 1 or 2 GPUs: throughput, memory and the
loss curve at one global batch, under accelerate launch (DDP or FSDP) or torchrun.

    python bench/t2i_multi.py --work DIR --processes 2 --launcher accelerate --steps 60 --out r.json

The first call in a --work folder writes 400 captioned photos and a randomly initialised paper-size
PS-VAE (96 channels, 16x16); training reads latents through the trainer's latent cache. Random LM
weights and a byte tokenizer (no Qwen weights exist on these machines).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import environment, write_result  # noqa: E402

WORDS = "red blue green cat dog car tree house sky water photo bright dark old new small large".split()


def prepare(work: Path) -> tuple[Path, Path]:
    data, vae_file = work / "photos", work / "vae_paper_random.safetensors"
    if not vae_file.exists():
        subprocess.run([sys.executable, str(ROOT / "bench/photo_set.py"), str(data), "--count", "400"], check=True)
        for i, image in enumerate(sorted(data.glob("*.png"))):
            words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(12)]
            image.with_suffix(".txt").write_text("a photo of " + " ".join(words))
        from psvae_core.autoencoder import PSVAE
        from psvae_core.config import PRESETS

        torch.manual_seed(0)
        PSVAE(PRESETS["paper-dinov2-b-96c"]).save(vae_file, provenance={"stage": "benchmark-random"})
    return data, vae_file


def launch(args, train_args: list[str]):
    n = args.processes
    if n == 1:
        cmd = [sys.executable, "-m", "trainer", *train_args]
    elif args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "-m", "trainer", *train_args]
    else:
        sharding = ["--use_fsdp", "--fsdp_sharding_strategy=FULL_SHARD"] if args.fsdp else ["--multi_gpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *sharding, f"--num_processes={n}",
               "--mixed_precision=no", "-m", "trainer", *train_args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--launcher", default="accelerate", choices=["accelerate", "torchrun"])
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--name", default=None)
    p.add_argument("--extra", nargs="*", default=[], help="more trainer overrides")
    p.add_argument("--out", default="t2i_result.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    data, vae_file = prepare(work)
    name = args.name or f"t2i_{args.processes}gpu_{'fsdp' if args.fsdp else args.launcher}"
    train_args = ["t2i", "--config", "trainer/configs/t2i_paper.yaml", f"run.output_dir={work / 'runs'}",
                  f"run.name={name}", f"data.source={data}", f"data.latent_cache={work / 'latents'}",
                  "data.val_count=0", f"model.vae={vae_file}", "model.tokenizer=bytes", "data.max_text_tokens=128",
                  f"train.max_steps={args.steps}", f"train.batch_size={args.batch // args.processes}",
                  "train.grad_accum=1", "train.num_workers=4", "optim.warmup_steps=0", "log.every=10",
                  "log.tensorboard=false", "log.progress=false", "log.images_every=0", "validation.every=0",
                  "checkpoint.every=0", *args.extra]
    done = launch(args, train_args)
    result = {"command": "python bench/t2i_multi.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **environment(), "processes": args.processes, "launcher": args.launcher, "fsdp": args.fsdp,
              "global_batch": args.batch, "exit_code": done.returncode}
    metrics = work / "runs" / name / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train" and "images_per_s" in r]
        steady = [r for r in train if r["step"] > 10] or train
        if steady:
            result["images_per_s"] = round(sum(r["images_per_s"] for r in steady) / len(steady), 1)
            result["gpu_peak_mem_gib"] = round(max(r.get("gpu_peak_mem_gib", 0) for r in train), 1)
        result["log"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in train]
    write_result(args.out, result)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
