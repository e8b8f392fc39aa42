"""The main job (`make demo`): the shipped scenes models turn prompts into images and carry out edits,
on a CPU, and the scorer says whether they did (docs/SCENES.md).

    python -m trainer.scenes.demo [--models models] [--out outputs/demo]

Reads the shipped default from --models (scenes_psvae.safetensors, scenes_t2i.safetensors,
scenes_edit.safetensors: trainer/scenes/retrain.sh makes them), runs test-split prompts of the six
categories and test-split edits through the real pipeline (psvae_core.generation, the path the
ComfyUI nodes take), scores every image with trainer.scenes.scorer, and writes into --out:

    report.json        per prompt / edit: the text, each check and whether it passed; per-category
                       and overall accuracy; edit accuracy; the sampler settings; wall times
    contact_sheet.png  T2I rows (prompt under each image), then edits (source above the result);
                       a green frame = every check passed, red = not
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from psvae_core.autoencoder import PSVAE

from . import scorer, world
from .evaluate import (EDIT_SAMPLING, SAMPLING, SHIPPED, edit_cases, edit_summary, generate, load_generator,
                       score_images, t2i_prompts)

REPO = Path(__file__).resolve().parents[2]
PROMPTS_PER_CATEGORY = 2
EDITS = 6
TILE = 160


def _sheet(rows: list[list[tuple[np.ndarray, str, bool | None]]], path: Path) -> None:
    """Rows of (image, caption, passed) tiles: the caption under the image, a frame for pass/fail."""
    caption_h = 44
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (TILE + 8) + 8, len(rows) * (TILE + caption_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (image, text, passed) in enumerate(row):
            x, y = 8 + c * (TILE + 8), 8 + r * (TILE + caption_h + 8)
            if passed is not None:
                draw.rectangle([x - 4, y - 4, x + TILE + 3, y + TILE + 3], fill=(40, 170, 60) if passed else (210, 40, 40))
            sheet.paste(Image.fromarray(image).resize((TILE, TILE), Image.BICUBIC), (x, y))
            for k, line in enumerate(textwrap.wrap(text, 26)[:3]):
                draw.text((x, y + TILE + 4 + 12 * k), line, fill="black")
    sheet.save(path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=str(REPO / "models"), help="folder of the shipped scenes models")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--prompts-per-category", type=int, default=PROMPTS_PER_CATEGORY)
    p.add_argument("--edits", type=int, default=EDITS)
    a = p.parse_args(argv)
    start = time.time()
    models, out = Path(a.models), Path(a.out)
    missing = [n for n in SHIPPED if not (models / n).is_file()]
    if missing:
        sys.exit(f"{models} lacks {', '.join(missing)}: the shipped scenes models. Train them with "
                 f"trainer/scenes/retrain.sh (docs/SCENES.md), or pass --models to a folder holding them "
                 f"(a smoke run's OUT/models works, with untrained-looking results)")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    vae = PSVAE.from_file(models / "scenes_psvae.safetensors")
    t2i = load_generator(models / "scenes_t2i.safetensors")
    edit = load_generator(models / "scenes_edit.safetensors")
    loaded = time.time()

    prompts = t2i_prompts("test", a.prompts_per_category)
    images = generate(t2i, vae, [t for t, _ in prompts], SAMPLING)
    t2i_scores = score_images(images, [s for _, s in prompts], workers=1)
    generated = time.time()

    cases = edit_cases(a.edits)
    sources = torch.stack([torch.from_numpy(np.array(world.render(s))).permute(2, 0, 1) for s, _, _ in cases])
    edited = generate(edit, vae, [c[1] for c in cases], EDIT_SAMPLING, sources=sources)
    edit_scores = score_images(edited, [spec for _, _, spec in cases], workers=1, edit=True)
    done = time.time()

    hwc = lambda x: x.permute(1, 2, 0).numpy()  # noqa: E731
    per_row = 2 * 3
    rows = [[(hwc(img), text, s["passed"]) for img, (text, _), s in zip(images[k:k + per_row], prompts[k:k + per_row],
                                                                        t2i_scores[k:k + per_row])]
            for k in range(0, len(prompts), per_row)]
    rows.append([(hwc(src), "source", None) for src in sources])
    rows.append([(hwc(img), c[1], s["passed"]) for img, c, s in zip(edited, cases, edit_scores)])
    _sheet(rows, out / "contact_sheet.png")

    report = {
        "models": {n: str(models / n) for n in SHIPPED},
        "t2i": {"summary": scorer.summarise(t2i_scores),
                "prompts": [{"text": t, **s} for (t, _), s in zip(prompts, t2i_scores)]},
        "edit": {"summary": edit_summary(edit_scores),
                 "edits": [{"instruction": c[1], "kind": c[2]["kind"], **s} for c, s in zip(cases, edit_scores)]},
        "sampling": {"t2i": SAMPLING, "edit": EDIT_SAMPLING},
        "seconds": {"load": round(loaded - start, 1), "t2i": round(generated - loaded, 1),
                    "edit": round(done - generated, 1), "total": round(time.time() - start, 1)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    s = report["t2i"]["summary"]
    print(f"T2I scene-GenEval overall {s['overall']:.2f} over {s['n']} prompts: "
          + ", ".join(f"{k} {v:.2f}" for k, v in s["categories"].items()))
    print(f"edits: {json.dumps(report['edit']['summary'])}")
    print(f"wrote {out}/report.json and contact_sheet.png in {report['seconds']['total']:.0f} s")
    return report


if __name__ == "__main__":
    main()
