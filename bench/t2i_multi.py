"""T2I stage (653M preset) through the real trainer CLI on 1 or 2 GPUs: throughput, memory and the
loss curve at one global batch, under accelerate launch (DDP or FSDP) or torchrun; checkpoints
written on one layout and resumed on another.

    python bench/t2i_multi.py --work DIR --processes 2 --batch 184 --micro 46 --steps 30 --out r.json
    python bench/t2i_multi.py --work DIR --processes 1 --batch 184 --micro 46 --steps 20 \
        --resume DIR/runs/t2i_2gpu_accelerate/checkpoints/step_00000010 --name moved --out m.json

--batch is the global batch; each process runs micro-batches of --micro and accumulates
batch / (processes x micro) of them per optimiser step, as the paper config does (46 x 2 x 8 GPUs).

The first call in a --work folder writes 400 captioned photos and a randomly initialised paper-size
PS-VAE (96 channels, 16x16); training reads latents through the trainer's latent cache. Random LM
weights and a byte tokenizer (no Qwen weights exist on these machines).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
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
        sharding = ["--use_fsdp", "--fsdp_version=2"] if args.fsdp else ["--multi_gpu"]
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
    p.add_argument("--micro", type=int, default=None, help="per-process micro-batch (default: batch / processes)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="keep checkpoints every N steps (else deleted)")
    p.add_argument("--resume", default=None, help="a checkpoint folder to continue from (another layout is fine)")
    p.add_argument("--name", default=None)
    p.add_argument("--extra", nargs="*", default=[], help="more trainer overrides")
    p.add_argument("--out", default="t2i_result.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    data, vae_file = prepare(work)
    name = args.name or f"t2i_{args.processes}gpu_{'fsdp' if args.fsdp else args.launcher}"
    micro = args.micro or args.batch // args.processes
    accum, rest = divmod(args.batch, args.processes * micro)
    if rest or accum < 1:
        p.error(f"--batch {args.batch} is not a multiple of processes x micro = {args.processes * micro}")
    train_args = ["t2i", "--config", "trainer/configs/t2i_paper.yaml", f"run.output_dir={work / 'runs'}",
                  f"run.name={name}", f"data.source={data}", f"data.latent_cache={work / 'latents'}",
                  "data.val_count=0", f"model.vae={vae_file}", "model.tokenizer=bytes", "data.max_text_tokens=128",
                  f"train.max_steps={args.steps}", f"train.batch_size={micro}", f"train.grad_accum={accum}",
                  "train.num_workers=4", "optim.warmup_steps=0", "log.every=5", "log.tensorboard=false",
                  "log.progress=false", "log.images_every=0", "validation.every=0",
                  f"checkpoint.every={args.checkpoint_every}", "checkpoint.keep_last=0",
                  f"checkpoint.resume={args.resume or 'null'}", *args.extra]
    start = time.perf_counter()
    done = launch(args, train_args)
    result = {"command": "python bench/t2i_multi.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              **environment(), "processes": args.processes, "launcher": args.launcher, "fsdp": args.fsdp,
              "global_batch": args.batch, "micro_batch": micro, "grad_accum": accum, "resumed_from": args.resume,
              "exit_code": done.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    run_dir = work / "runs" / name
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        train = [r for r in rows if r["kind"] == "train" and "images_per_s" in r]
        # Steady state: after the first window (warm-up), and no window that holds a checkpoint save.
        first = train[0]["step"] if train else 0
        saves = set(range(args.checkpoint_every, args.steps + 1, args.checkpoint_every)) if args.checkpoint_every else set()
        steady = [r for r in train if r["step"] > first and (r["step"] - 5) not in saves] or train
        if steady:
            result["images_per_s"] = round(sum(r["images_per_s"] for r in steady) / len(steady), 1)
            result["gpu_peak_mem_gib"] = round(max(r.get("gpu_peak_mem_gib", 0) for r in train), 1)
        result["log"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in train]
    if not args.checkpoint_every:  # a 653M run's checkpoint is ~10 GB: keep only those asked for
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    write_result(args.out, result)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
