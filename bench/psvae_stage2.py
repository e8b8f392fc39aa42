"""Stage-2 (PS-VAE) benchmark with the paper's sizes: DINOv2-B shape (random init), 96 channels,
LDM f16 decoder, batch 96, bf16, LPIPS (VGG) + PatchGAN active, through the real trainer CLI.

    python bench/psvae_stage2.py --work /tmp/psvae_bench --steps 300 --out result.json

1. writes a 400-image folder (bench/photo_set.py); 2. a short svae run makes the stage-1 export
that stage 2 starts from; 3. `python -m trainer psvae` for --steps steps; 4. reads the trainer's
metrics.jsonl (images/s, peak memory, losses) and counts the FLOPs of one stage-2 step per image
with torch's FLOP counter on a re-enactment of the step (generator and discriminator passes).
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
from bench.common import H200_BF16_PEAK, count_flops, environment, measured_matmul_peak, write_result  # noqa: E402

COMMON = ["model.encoder_weights=null", "checkpoint.every=0", "checkpoint.resume=null", "validation.every=0", "log.images_every=0",
          "log.tensorboard=false", "log.progress=false", "export.stats_images=192", "train.num_workers=12",
          "data.val_source=null", "loss.lpips_weights=null", "optim.warmup_steps=0"]


def run(args: list[str], processes: int = 1, launcher: str = "accelerate"):
    """`python -m trainer ...`, or the same under accelerate launch / torchrun with N processes."""
    if processes == 1:
        cmd = [sys.executable, "-m", "trainer", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "-m", "trainer", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
               "--mixed_precision=no", "-m", "trainer", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def step_flops_per_image() -> float:
    """FLOPs of one stage-2 training step for one 256-px image (fwd + bwd of every trained part,
    the frozen teacher's forward, LPIPS, and the discriminator's own step)."""
    from psvae_core.autoencoder import PSVAE
    from psvae_core.config import PRESETS
    from psvae_core.losses import LPIPSLoss, PatchGANDiscriminator, generator_adv_loss, hinge_d_loss, semantic_loss

    vae = PSVAE(PRESETS["paper-dinov2-b-96c"]).cuda().train()
    teacher = vae.encoder.frozen_copy()
    lpips = LPIPSLoss(net="vgg").cuda()
    disc = PatchGANDiscriminator(ndf=64, n_layers=3, norm="group").cuda()
    x = torch.rand(1, 3, 256, 256, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = vae(x)
            target = teacher(x)
            l_s = semantic_loss(out.reconstructed_features, target)[0] + semantic_loss(out.features, target)[0]
            loss = l_s + out.posterior.kl().mean() * 1e-6 + (out.images - x).abs().mean() + lpips(out.images, x).mean()
            loss = loss + 0.5 * generator_adv_loss(disc(out.images))
        loss.backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            d = hinge_d_loss(disc(x), disc(out.images.detach()))
        d.backward()

    return float(count_flops(step))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/psvae_bench")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--processes", type=int, default=1, help="GPUs (data-parallel processes); batch is global")
    p.add_argument("--launcher", default="accelerate", choices=["accelerate", "torchrun"])
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (MFU) after training")
    p.add_argument("--name", default=None, help="the stage-2 run's name (default psvae_<N>gpu_<launcher>)")
    p.add_argument("--extra", nargs="*", default=[], help="more trainer overrides for the stage-2 run, e.g. train.compile=true")
    p.add_argument("--out", default="psvae_stage2_result.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    data, runs = work / "photos", work / "runs"
    export = runs / "svae_dinov2b_96c" / "export" / "vae.safetensors"
    if not export.exists():  # the data set and the stage-1 export are shared by every run in --work
        subprocess.run([sys.executable, str(ROOT / "bench/photo_set.py"), str(data), "--count", "400"], check=True)
        run(["svae", "--config", "trainer/configs/svae_paper.yaml", f"run.output_dir={runs}", f"data.source={data}",
             "train.max_steps=10", f"train.batch_size={args.batch}", *COMMON])
    name = args.name or f"psvae_{args.processes}gpu_{args.launcher}"
    run(["psvae", "--config", "trainer/configs/psvae_paper.yaml", f"run.output_dir={runs}", f"run.name={name}",
         f"data.source={data}", f"model.init_from={export}", f"train.max_steps={args.steps}",
         f"train.batch_size={args.batch // args.processes}", "log.every=10", "gan.start_step=50",
         "gan.disc_start_step=25", *COMMON, *args.extra], args.processes, args.launcher)
    rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train" and "images_per_s" in r]
    steady = [r for r in train if r["step"] > 50] or train  # after warm-up and the GAN start
    ips = sum(r["images_per_s"] for r in steady) / len(steady)
    result = {
        "command": "python bench/psvae_stage2.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **environment(), "processes": args.processes, "launcher": args.launcher, "global_batch": args.batch,
        "overrides": args.extra,
        "steps": args.steps, "precision": "bf16 autocast, fp32 weights",
        "images_per_s": round(ips, 1), "step_s": round(args.batch / ips, 3),
        "gpu_peak_mem_gib": round(max(r.get("gpu_peak_mem_gib", 0) for r in train), 1),
        "log": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in train],
    }
    write_result(args.out, result)  # kept even if the FLOP count below is cut short
    if not args.no_flops:
        flops = step_flops_per_image()
        peak = measured_matmul_peak()
        per_gpu = flops * ips / args.processes
        result.update({"flops_per_image": flops, "mfu_vs_datasheet": round(per_gpu / H200_BF16_PEAK, 3),
                       "measured_bf16_matmul_tflops": round(peak / 1e12, 1),
                       "mfu_vs_measured_matmul": round(per_gpu / peak, 3)})
    write_result(args.out, result)


if __name__ == "__main__":
    main()
