"""Generator benchmark: train a FusionDiffuser preset in bf16, then sample 50 Euler steps with CFG.

    python bench/generator.py --preset paper-653m --steps 300 --batch 64 --out result.json

Random latents and random caption token ids (no weights or data are needed to measure speed).
Reports training images/s, step time, peak memory and MFU (torch's FLOP counter over one step,
against the datasheet peak and against a measured bf16 matmul), the loss curve, and sampling
time with the text prefix cached (the default) beside re-encoding the prompt at every step.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (H200_BF16_PEAK, environment, measured_matmul_peak,  # noqa: E402
                          peak_memory_gib, reset_peak_memory, synchronize, timed, write_result)
from psvae_core import flow, generation  # noqa: E402
from psvae_core.fusion import FusionDiffuser  # noqa: E402


def training_flops(model: FusionDiffuser, batch: int, text_len: int) -> float:
    """Analytic FLOPs of one training step (forward + backward = 3x forward, 2 FLOPs per MAC).

    torch's FLOP counter cannot count grouped-query SDPA, so: every LM weight (not the embedding
    table, a lookup) acts on every token, the head and image embedders on image tokens, plus
    attention scores and values (4 T_q T_k d per layer; text queries see only the causal text).
    """
    cfg, lm = model.config, model.config.lm
    img = cfg.latent_size[0] * cfg.latent_size[1]
    embed = model.backbone.lm.embed_tokens.weight.numel()
    lm_params = sum(p.numel() for p in model.backbone.parameters()) - embed
    image_params = sum(p.numel() for p in model.parameters()) - lm_params - embed
    d, layers = lm["hidden_size"], lm["num_hidden_layers"]
    attn = layers * 4 * d * (text_len * text_len / 2 + img * (text_len + img))
    hd = cfg.head_width
    head_attn = cfg.head_depth * 4 * hd * img * img if cfg.use_head else 0
    forward = 2 * (lm_params * (text_len + img) + image_params * img) + attn + head_attn
    return 3 * forward * batch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="paper-653m")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--text-len", type=int, default=128, help="caption tokens (CC12M-LLaVA captions are long)")
    p.add_argument("--sample-batch", type=int, default=16)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="generator_result.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = args.device
    # fp32 master weights under bf16 autocast: the trainer's mixed precision.
    model = FusionDiffuser.from_preset(args.preset).to(dev).train()
    cfg = model.config
    vocab = cfg.lm["vocab_size"]
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    shape = (args.batch, cfg.latent_channels, *cfg.latent_size)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batch():
        x0 = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen)
        ids = torch.randint(0, vocab, (args.batch, args.text_len), device=dev, generator=gen)
        return x0, ids

    def step():
        x0, ids = batch()
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model.training_loss(x0, ids, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    flops = training_flops(model, args.batch, args.text_len)
    for _ in range(5):
        step()
    reset_peak_memory()
    losses, r = [], {}
    with timed(r, "train_s"):
        for i in range(args.steps):
            loss = step()
            if i % 10 == 0:
                losses.append(round(loss.item(), 4))
    train_mem = peak_memory_gib()
    step_s = r["train_s"] / args.steps
    matmul_peak = measured_matmul_peak() if dev == "cuda" else float("nan")

    # Sampling: 50 Euler steps, CFG 6.5, shift 3, bf16 weights; cached prefix vs re-encoding every step.
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, vocab, (args.sample_batch, args.text_len), device=dev)
    shape = (cfg.latent_channels, *cfg.latent_size)
    noise = generation.make_noise(shape, generation.row_seeds(0, args.sample_batch), dev)
    reset_peak_memory()
    with torch.no_grad():
        for _ in range(2):  # warm-up of both paths
            generation.generate(model, ids, steps=2)
        with timed(r, "sample_cached_s"):  # the one generation path: the prefix once, 50 steps
            cached = generation.generate(model, ids, seed=0, steps=50, shift=3.0, guidance=6.5)

        def uncached(x, t, branches):  # the prompt goes through the LM again at every step
            return model.velocity_fn(model.encode_prefix(ids))(x, t, branches)

        with timed(r, "sample_uncached_s"):
            again = flow.euler_sample(uncached, noise, 50, 3.0, 6.5)
    sample_mem = peak_memory_gib()
    synchronize()
    result = {
        "command": "python bench/generator.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        **environment(),
        "preset": args.preset, "parameters": n_params, "batch": args.batch, "text_tokens": args.text_len,
        "image_tokens": cfg.latent_size[0] * cfg.latent_size[1],
        "train_steps": args.steps, "step_ms": round(step_s * 1e3, 1),
        "train_images_per_s": round(args.batch / step_s, 1),
        "train_peak_mem_gib": round(train_mem, 1),
        "flops_per_step": flops,
        "mfu_vs_datasheet": round(flops / step_s / H200_BF16_PEAK, 3),
        "measured_bf16_matmul_tflops": round(matmul_peak / 1e12, 1),
        "mfu_vs_measured_matmul": round(flops / step_s / matmul_peak, 3),
        "loss_every_10_steps": losses,
        "sample_batch": args.sample_batch, "sample_steps": 50, "cfg": 6.5, "shift": 3.0,
        "sample_cached_s": round(r["sample_cached_s"], 2), "sample_uncached_s": round(r["sample_uncached_s"], 2),
        "sample_images_per_s": round(args.sample_batch / r["sample_cached_s"], 2),
        "sample_peak_mem_gib": round(sample_mem, 1),
        "cached_equals_uncached_max_abs": float((cached.float() - again.float()).abs().max()),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
