"""Validation of the scorer (`python -m trainer.scenes validate-scorer`; table in docs/SCENES.md).

GenEval prompts of the test split, `per_category` per category: the scorer should pass the exact
render of each (every check is true), and fail a near miss: the render of the spec changed in one
point (another shape, colour or count, the opposite relation, swapped colours). Edits, `per_kind`
per kind: the exact target should pass, the unedited source should fail "edited", and another
scene should fail "preserved". Each image is also scored after Gaussian blur (sigma 1 and 2), noise
(sigma 0.05) and JPEG (quality 30). Garbage, which must fail every prompt: blurred colour noise at
several scales, palette blobs and ellipses over a world background, and decodes of random latents
through a given PS-VAE (what an untrained generator produces).
"""
from __future__ import annotations

import io
import time
from dataclasses import replace
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from . import scorer
from .captions import CATEGORIES, prompt, scene_for
from .edits import KINDS, make_edit
from .world import COLORS, SHAPES, Scene, render, rng_for, sample_background, sample_scene

CONDITIONS = ("clean", "blur1", "blur2", "noise0.05", "jpeg30")
# Garbage: images with no well-formed object in them, as untrained generators make. Every prompt
# scored on them should fail.
NOISE_SCALES = (2, 4, 8, 16)  # Gaussian sigma (pixels) of the blurred colour noise
GARBAGE = tuple(f"noise{s}" for s in NOISE_SCALES) + ("blobs", "ellipses")


def colour_noise(rng: np.random.Generator, sigma: float, size: int = 256) -> np.ndarray:
    """Uniform colour noise blurred with `sigma` and stretched back to 0..1 per channel: smooth colour mush."""
    x = ndimage.gaussian_filter(rng.uniform(size=(size, size, 3)).astype(np.float32), (sigma, sigma, 0))
    lo, hi = x.min((0, 1)), x.max((0, 1))
    return (x - lo) / np.maximum(hi - lo, 1e-6)


def palette_blobs(rng: np.random.Generator, ellipses: bool, size: int = 256) -> np.ndarray:
    """1-4 solid palette-coloured regions over a world background: irregular blobs (thresholded smooth
    noise) or ellipses elongated 1.6-3x, of the objects' sizes, none of them a world shape."""
    img = np.asarray(render(Scene((), sample_background(rng)), size), np.float32) / 255
    yy, xx = np.mgrid[:size, :size] / size
    for _ in range(int(rng.integers(1, 5))):
        colour = np.array(COLORS[str(rng.choice(list(COLORS)))], np.float32) / 255
        cx, cy = rng.uniform(0.15, 0.85, 2)
        r = rng.uniform(0.06, 0.14)
        if ellipses:
            ratio, angle = rng.uniform(1.6, 3.0), rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            mask = (u * u * ratio + v * v / ratio) < r * r
        else:
            field = ndimage.gaussian_filter(rng.normal(size=(size, size)), 6)
            mask = (field / field.std() + 2.5 * (1 - np.hypot(xx - cx, yy - cy) / r)) > 1.5
        img[mask] = colour
    return ndimage.gaussian_filter(img, (*[rng.uniform(0, 3)] * 2, 0))  # sharp to soft edges


def garbage(kind: str, seed: int, size: int = 256) -> np.ndarray:
    """One garbage image (float RGB (size, size, 3)) of a GARBAGE kind."""
    rng = np.random.default_rng([seed, GARBAGE.index(kind)])
    if kind.startswith("noise"):
        return colour_noise(rng, float(kind[5:]), size)
    return palette_blobs(rng, kind == "ellipses", size)


def degrade(image: Image.Image, condition: str, seed: int = 0):
    if condition == "clean":
        return image
    if condition.startswith("blur"):
        return image.filter(ImageFilter.GaussianBlur(float(condition[4:])))  # radius = sigma in Pillow
    if condition.startswith("noise"):
        noise = np.random.default_rng(seed).normal(0, float(condition[5:]), (*image.size[::-1], 3))
        return np.clip(np.asarray(image, np.float32) / 255 + noise, 0, 1).astype(np.float32)
    if condition.startswith("jpeg"):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(condition[4:]))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    raise ValueError(f"unknown condition {condition!r}")


def decoded_noise(vae_path: str, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` decodes of random normal latents through the PS-VAE file at `vae_path`: what a
    generator that has learnt nothing hands its decoder."""
    import torch

    from psvae_core.autoencoder import PSVAE
    from psvae_core.generation import decode, encode_source

    vae = PSVAE.from_file(vae_path).eval()
    with torch.no_grad():
        shape = encode_source(vae, torch.zeros(1, 3, 256, 256)).shape[1:]
        latents = torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))
        images = torch.cat([decode(vae, latents[i:i + 8]) for i in range(0, count, 8)])
    return [scorer.as_array(x.permute(1, 2, 0).numpy()) for x in images]


def _garbage_case(args) -> dict:
    """One garbage image scored against a test prompt of every category: {category: passed}, detections."""
    seed, index, kind, image = args
    image = garbage(kind, seed * 1_000_003 + index) if image is None else image
    found = scorer.detect(image)
    passed = {}
    for c, category in enumerate(CATEGORIES):
        _, spec = prompt(rng_for("test", seed, 2_000_000 + 6 * index + c), "test", category)
        passed[category] = all(scorer.check(found, spec).values())
    return {"kind": kind, "passed": passed, "detections": len(found)}


def near_miss(spec: dict, rng: np.random.Generator) -> dict:
    """`spec` changed in one point, so that its exact render fails the original spec."""
    spec = {**spec, "objects": [dict(g) for g in spec["objects"]]}
    groups, category = spec["objects"], spec["category"]
    used = {g["shape"] for g in groups}
    g = groups[rng.integers(len(groups))]
    if category == "position":
        spec["relation"] = {"left": "right", "right": "left", "above": "below", "below": "above"}[spec["relation"]]
    elif category == "counting":
        g["count"] = int(rng.choice([n for n in range(1, 5) if n != g["count"]]))
    elif category == "color_attr" and rng.integers(2):
        groups[0]["color"], groups[1]["color"] = groups[1]["color"], groups[0]["color"]
    elif category in ("colors", "color_attr"):
        taken = {x["color"] for x in groups}
        g["color"] = str(rng.choice([c for c in COLORS if c not in taken]))
    else:  # single_object, two_object: another shape
        g["shape"] = str(rng.choice([s for s in SHAPES if s not in used]))
    return spec


def _geneval_case(args) -> dict:
    seed, index, category, degraded = args
    rng = rng_for("test", seed, index)
    _, spec = prompt(rng, "test", category)
    right = render(scene_for(spec, rng, "test"))
    wrong_scene = scene_for(near_miss(spec, rng), rng, "val")
    wrong = render(wrong_scene)
    truth_wrong = scorer.check(wrong_scene.objects, spec)
    out = {"category": category, "truth_wrong": truth_wrong, "right": {}}
    for cond in CONDITIONS if degraded else ("clean",):
        start = time.process_time()
        found = scorer.detect(degrade(right, cond, index))
        if cond == "clean":
            out["cpu_s"] = time.process_time() - start
        out["right"][cond] = scorer.check(found, spec)
    out["wrong"] = scorer.check(scorer.detect(wrong), spec)  # clean only
    return out


def _edit_case(args) -> dict:
    seed, index, kind = args
    rng = rng_for("test", seed, 1_000_000 + index)
    while True:
        try:
            _, target, spec = make_edit(sample_scene(rng, "test"), rng, "test", kind=kind)
            break
        except ValueError:  # this kind does not apply to that scene: draw another
            continue
    source = render(Scene.from_dict(spec["source"]))
    right = render(target)
    renders = (scorer.as_array(source), scorer.as_array(right))
    out = {"kind": kind, "right": {}}
    for cond in CONDITIONS:
        r = scorer.score_edit(degrade(right, cond, index), spec, renders)
        out["right"][cond] = {"checks": r["checks"], "psnr": r["pooled_psnr"]}
    # Wrong images, clean: the unedited source, another scene of the split, and the target over
    # another background (all but the background edits, whose preserved part is the objects).
    wrong = {"undone": source, "other": render(sample_scene(rng, "test"))}
    if kind != "background":
        bg = replace(sample_background(rng), seed=target.background.seed, light=target.background.light)
        wrong["other_background"] = render(replace(target, background=bg))
    for name, image in wrong.items():
        r = scorer.score_edit(image, spec, renders)
        out[name] = {"checks": r["checks"], "psnr": r["pooled_psnr"]}
    return out


def _rate(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def validate_scorer(per_category: int = 500, seed: int = 0, workers: int = 1, per_kind: int | None = None,
                    degraded_per_category: int | None = None, garbage_per_kind: int = 0,
                    garbage_vae: str | None = None) -> dict:
    """The table: GenEval prompts clean (`per_category` each) and degraded (the first
    `degraded_per_category` of them), edits (`per_kind` each, clean and degraded), and
    `garbage_per_kind` garbage images of each GARBAGE kind (and decodes of random latents through
    the PS-VAE file `garbage_vae`, when given), each scored against a prompt of every category."""
    per_kind = per_category if per_kind is None else per_kind
    degraded = per_category if degraded_per_category is None else min(degraded_per_category, per_category)
    geneval_jobs = [(seed, c * per_category + i, cat, i < degraded)
                    for c, cat in enumerate(CATEGORIES) for i in range(per_category)]
    edit_jobs = [(seed, k * per_kind + i, kind) for k, kind in enumerate(KINDS) for i in range(per_kind)]
    garbage_jobs = [(seed, i, kind, None) for kind in GARBAGE for i in range(garbage_per_kind)]
    if garbage_vae and garbage_per_kind:
        garbage_jobs += [(seed, i, "decoded", image)
                         for i, image in enumerate(decoded_noise(garbage_vae, garbage_per_kind, seed))]
    start = time.perf_counter()
    if workers <= 1:
        g_cases, e_cases = list(map(_geneval_case, geneval_jobs)), list(map(_edit_case, edit_jobs))
        x_cases = list(map(_garbage_case, garbage_jobs))
    else:
        with get_context("spawn").Pool(workers) as pool:
            g_cases = pool.map(_geneval_case, geneval_jobs, chunksize=8)
            e_cases = pool.map(_edit_case, edit_jobs, chunksize=8)
            x_cases = pool.map(_garbage_case, garbage_jobs, chunksize=8)
    table = {"per_category": per_category, "degraded_per_category": degraded, "per_kind": per_kind,
             "seed": seed, "split": "test",
             "wall_s": round(time.perf_counter() - start, 1),
             "detect_cpu_ms_mean": round(1000 * _rate(c["cpu_s"] for c in g_cases), 1),
             "geneval": {}, "edits": {}, "garbage": {}, "garbage_per_kind": garbage_per_kind}
    truly_wrong = [c for c in g_cases if not all(c["truth_wrong"].values())]
    for cond in CONDITIONS:
        cases = [c for c in g_cases if cond in c["right"]]
        right = [c["right"][cond] for c in cases]
        per_cat = {cat: _rate(all(c["right"][cond].values()) for c in cases if c["category"] == cat)
                   for cat in CATEGORIES}
        table["geneval"][cond] = {
            "check_accuracy": _rate(v for r in right for v in r.values()),
            "categories": per_cat,
            "overall": _rate(per_cat.values()),
            "prompts": len(cases),
        }
    table["geneval"]["near_miss"] = {
        "false_pass": _rate(all(c["wrong"].values()) for c in truly_wrong),
        "check_agreement": _rate(c["wrong"][k] == v for c in g_cases for k, v in c["truth_wrong"].items()),
        "count": len(truly_wrong),
    }
    for cond in CONDITIONS:
        per_k = {k: _rate(all(c["right"][cond]["checks"].values()) for c in e_cases if c["kind"] == k) for k in KINDS}
        psnrs = np.array([c["right"][cond]["psnr"] for c in e_cases])
        table["edits"][cond] = {
            "check_accuracy": _rate(v for c in e_cases for v in c["right"][cond]["checks"].values()),
            "kinds": per_k,
            "overall": _rate(per_k.values()),
            "psnr_min": float(psnrs.min()),
            "psnr_p5": float(np.percentile(psnrs, 5)) if np.isfinite(psnrs).all() else float("inf"),
        }
    table["edits"]["wrong"] = {
        "undone_false_pass": _rate(all(c["undone"]["checks"].values()) for c in e_cases),
        "other_image_false_pass": _rate(all(c["other"]["checks"].values()) for c in e_cases),
        "other_image_psnr_max": max(c["other"]["psnr"] for c in e_cases),
        "other_background_false_pass": _rate(all(c["other_background"]["checks"].values())
                                             for c in e_cases if "other_background" in c),
        "other_background_psnr_median": float(np.median([c["other_background"]["psnr"]
                                                         for c in e_cases if "other_background" in c])),
    }
    for kind in dict.fromkeys(c["kind"] for c in x_cases):
        cases = [c for c in x_cases if c["kind"] == kind]
        per_cat = {cat: _rate(c["passed"][cat] for c in cases) for cat in CATEGORIES}
        table["garbage"][kind] = {"false_pass": per_cat, "overall": _rate(per_cat.values()), "images": len(cases),
                                  "detections_mean": _rate(c["detections"] for c in cases)}
    return table


def format_table(table: dict) -> str:
    """The validation table as Markdown (docs/SCENES.md)."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Scorer validation: test split, {table['per_category']} prompts per GenEval category clean and the "
             f"first {table['degraded_per_category']} of them degraded, {table['per_kind']} edits per kind, seed "
             f"{table['seed']}; detect {table['detect_cpu_ms_mean']} ms CPU per image (mean); {table['wall_s']} s wall.",
             "", "| condition | prompts | check acc. | " + " | ".join(CATEGORIES) + " | overall |",
             "|---" * (len(CATEGORIES) + 4) + "|"]
    for cond in CONDITIONS:
        row = table["geneval"][cond]
        lines.append(f"| {cond} | {row['prompts']} | {pct(row['check_accuracy'])} | "
                     + " | ".join(pct(row["categories"][c]) for c in CATEGORIES) + f" | {pct(row['overall'])} |")
    miss = table["geneval"]["near_miss"]
    lines += ["", f"Near misses (clean renders of the spec changed in one point, {miss['count']} truly wrong): "
              f"false pass {pct(miss['false_pass'])} %, per-check agreement with the truth {pct(miss['check_agreement'])} %."]
    lines += ["", "| condition | check acc. | " + " | ".join(KINDS) + " | overall | pooled PSNR min / p5 (dB) |",
              "|---" * (len(KINDS) + 4) + "|"]
    for cond in CONDITIONS:
        row = table["edits"][cond]
        lines.append(f"| {cond} | {pct(row['check_accuracy'])} | " + " | ".join(pct(row["kinds"][k]) for k in KINDS)
                     + f" | {pct(row['overall'])} | {row['psnr_min']:.1f} / {row['psnr_p5']:.1f} |")
    wrong = table["edits"]["wrong"]
    lines += ["", f"Edits, wrong images (clean): the unedited source passes {pct(wrong['undone_false_pass'])} %; "
              f"another scene {pct(wrong['other_image_false_pass'])} % (pooled PSNR at most "
              f"{wrong['other_image_psnr_max']:.1f} dB); the target over another background "
              f"{pct(wrong['other_background_false_pass'])} % (median {wrong['other_background_psnr_median']:.1f} dB). "
              f"Preservation threshold: pooled PSNR >= {scorer.PRESERVE_PSNR} dB."]
    if table["garbage"]:
        lines += ["", "Garbage (no object in them; each image scored against a prompt of every category): false pass %.",
                  "", "| garbage | images | detections / image | " + " | ".join(CATEGORIES) + " | overall |",
                  "|---" * (len(CATEGORIES) + 4) + "|"]
        for kind, row in table["garbage"].items():
            lines.append(f"| {kind} | {row['images']} | {row['detections_mean']:.2f} | "
                         + " | ".join(pct(row["false_pass"][c]) for c in CATEGORIES) + f" | {pct(row['overall'])} |")
    return "\n".join(lines)
