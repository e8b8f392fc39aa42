"""Regenerate the template workflows, workflows/<Title>.json (UI format) and their .jpg thumbnails,
with the real ComfyUI frontend.

    .venv/bin/python tools/make_workflows.py [KEY ...]   (needs `make comfyui browser`; no network)

With keys (those of WORKFLOWS below), only those workflows are rewritten (the others stay byte for
byte); without, all are, and files of workflows that no longer exist are removed.

Each workflow is a Template below: an API prompt plus a layout, a title, a one-sentence description
and the text of its Read-me note. A temporary ComfyUI (the test harness, with tiny checkpoints under
the file names the workflows use) turns the prompt into the UI format exactly as the frontend does
(app.loadApiJson + app.graphToPrompt), the layout, the note and the loaders' `models` entries are
applied, and the result goes through app.loadGraphData + app.graphToPrompt once more (what "Save"
writes).

The files are ComfyUI's template-browser examples (Templates -> Custom Nodes -> ps-vae; see
tests/test_comfyui_workflows.py). ComfyUI's frontend (1.32.9) names a pack's template by its file
name and shows <name>.jpg as its card, so the file name is the Title Case title. Thumbnail: a result
of the workflow put at tools/workflow_results/<key>.png (e.g. from a scenes run) becomes the card,
square; without one the card is a screenshot of the graph. The rules every layout follows
(layout_problems: the graph fits a 1600x1000 window at 100 % beside the frontend's own panels, notes
lie beside the nodes, nothing sits where a sampler's preview grows the sampler) are checked here
before a file is written, and by the tests.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from comfy_harness import (  # noqa: E402
    TINY_GENERATOR_FILES,
    TINY_MODEL_FILES,
    ComfyServer,
    run_frontend,
    write_test_image,
    write_tiny_generator,
    write_tiny_vae,
)

OUT = REPO / "workflows"
RESULTS = REPO / "tools" / "workflow_results"  # <key>.png: a result of the workflow, its thumbnail
BUNDLED_MODELS = REPO / "models"               # files that ship with the pack: their sha256 is known
THUMBNAIL_SIZE = {"screenshot": (720, 450), "result": (512, 512)}

# ------------------------------------------------------------------------------ layout rules
# The window a template must fit at 100 % (extra.ds: scale 1, offset 0, so graph units are window
# pixels) and the frontend's panels over the canvas in it, measured in frontend 1.32.9 at 1600x1000:
# (x0, y0, x1, y1) in window pixels.
WINDOW = (0, 0, 1600, 1000)
CHROME = {
    "banner and workflow tabs": (0, 0, 1600, 80),
    "side bar": (0, 0, 60, 1000),
    "breadcrumb": (60, 80, 280, 135),
    "run button and queue": (1260, 80, 1600, 175),
    "minimap and zoom buttons": (1340, 740, 1600, 1000),
}
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
NOTE_TYPES = {"Note", "MarkdownNote"}
# Nodes whose live preview makes them taller while they run: nothing may sit below them.
GROWING_TYPES = {"PSVAET2ISampler", "PSVAEEditSampler"}


def node_rects(workflow: dict) -> list[tuple[str, str, tuple[float, float, float, float]]]:
    """(label, type, (x0, y0, x1, y1)) of each node in window pixels, title bar included."""
    ds = workflow.get("extra", {}).get("ds", {"scale": 1, "offset": [0, 0]})
    scale, (ox, oy) = ds["scale"], ds["offset"]
    out = []
    for n in workflow["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        x0, y0 = (x + ox) * scale, (y - TITLE_HEIGHT + oy) * scale
        out.append((f"{n['type']} #{n['id']}", n["type"], (x0, y0, x0 + w * scale, y0 + (h + TITLE_HEIGHT) * scale)))
    return out


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def layout_problems(rects) -> list[str]:
    """What breaks the layout rules, for node rectangles as node_rects gives them (the browser test
    passes the rectangles the frontend drew, after a run)."""
    problems = []
    for label, kind, r in rects:
        if not (WINDOW[0] <= r[0] and WINDOW[1] <= r[1] and r[2] <= WINDOW[2] and r[3] <= WINDOW[3]):
            problems.append(f"{label} {r} is not inside the {WINDOW[2]}x{WINDOW[3]} window")
        problems += [f"{label} {r} is under the frontend's {name} {c}" for name, c in CHROME.items() if _overlap(r, c)]
    for label, kind, r in rects:
        for other, other_kind, o in rects:
            if other == label:
                continue
            if kind in NOTE_TYPES and _overlap(r, o):
                problems.append(f"the note {label} lies over {other}")
            if kind in GROWING_TYPES and _overlap((r[0], r[3], r[2], WINDOW[3]), o):
                problems.append(f"{other} is below {label}, whose preview makes it taller while it runs")
    return problems


# ------------------------------------------------------------------------------ model files
DOCS_URL = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Documentation"]
MODELS_URL = DOCS_URL + "#where-the-model-files-go"
# Where model files come from, said once per workflow note for the files it names.
ORIGINS = {
    "paper": ("These are yours: no weights are published. Train them with the pack's trainer (docs/TRAINER.md, "
              "docs/TRAINER_GENERATOR.md) and copy each export (runs/<run>/export/*.safetensors) there under "
              "its name."),
    "bundled": "These ship with the pack (its models/ folder): nothing to copy.",
}
# The files the workflows name: what each is and its origin (ORIGINS key).
MODEL_FILES = {
    "psvae-dinov2b-96c.safetensors": ("the paper's PS-VAE, DINOv2-B, 96-channel 16x16 latent", "paper"),
    "svae-dinov2b-96c.safetensors": ("the S-VAE of the same DINOv2-B run (frozen encoder)", "paper"),
    "rae-dinov2b.safetensors": ("the RAE baseline, DINOv2-B features as the latent", "paper"),
    "psvae-generator-653m.safetensors": ("the paper's 653M generator, trained on psvae-dinov2b-96c", "paper"),
}
LOADER_FILE_INPUTS = ("vae_name", "generator_name")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_entry(name: str) -> dict:
    """One `models` entry as ComfyUI's frontend reads it (its Missing Models dialog lists those not in
    the folder; its schema wants a url): the sha256 where the file ships with the pack."""
    entry = {"name": name, "url": MODELS_URL, "directory": "psvae"}
    if (BUNDLED_MODELS / name).is_file():
        entry.update(hash=sha256_of(BUNDLED_MODELS / name), hash_type="sha256")
    return entry


def files_of(api: dict) -> list[str]:
    """The model files an API prompt's loaders name, in order."""
    names = [node["inputs"][k] for node in api.values() if node["class_type"] == "PSVAELoader"
             for k in LOADER_FILE_INPUTS if node["inputs"].get(k, "none") != "none"]
    return list(dict.fromkeys(names))


def models_note(files: list[str]) -> str:
    lines = [f"- {name}: {MODEL_FILES[name][0]}" for name in files]
    origins = dict.fromkeys(MODEL_FILES[name][1] for name in files)
    return "\n".join(["Model files, in ComfyUI/models/psvae (or a 'psvae:' folder of extra_model_paths.yaml; "
                      "press R to refresh the lists; nothing is downloaded):", *lines,
                      *(ORIGINS[o] for o in origins)])


# ------------------------------------------------------------------------------ the workflows
@dataclass(frozen=True)
class Template:
    title: str        # Title Case; the template browser's card title, so also the file name
    description: str  # one sentence: the Read-me note's first line
    note: str         # the rest of the note (the model files are added to it)
    build: Callable[[], tuple[dict, dict]]  # API prompt, layout {node id or "note": (x, y, w, h)}

    def note_text(self, api: dict) -> str:
        return "\n\n".join([self.description, self.note, models_note(files_of(api))])


VAE_FILE = "psvae-dinov2b-96c.safetensors"
GENERATOR_FILE = "psvae-generator-653m.safetensors"
GENERATE_NOTE = (
    "PS-VAE Loader loads the pair: the VAE and the generator trained on it (it refuses a pair that does "
    "not belong together). The sampler makes PS-VAE latents; PS-VAE Decode turns them into a 256x256 "
    "image. Paper settings: 50 Euler steps, shift 3. The sampler shows a progress bar and a live preview; "
    "Cancel stops it between steps. Row i of a batch uses seed + i.")


def loader(vae: str, generator: str = "none") -> dict:
    return {"class_type": "PSVAELoader", "inputs": {"vae_name": vae, "generator_name": generator, "dtype": "auto"}}


def round_trip() -> tuple[dict, dict]:
    api = {
        "1": loader(VAE_FILE),
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "PSVAEEncode", "inputs": {"image": ["2", 0], "vae": ["1", 0], "resize": "center crop"}},
        "4": {"class_type": "PSVAEDecode", "inputs": {"latent": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "psvae/round_trip"}},
    }
    layout = {"1": (80, 210, 330, 130), "2": (80, 390, 330, 380), "3": (450, 210, 280, 80),
              "4": (770, 210, 200, 60), "5": (1010, 210, 320, 340), "note": (450, 350, 520, 420)}
    return api, layout


def compare() -> tuple[dict, dict]:
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    layout = {"1": (70, 210, 280, 330), "note": (70, 590, 280, 380)}
    columns = [("S-VAE", "svae", "svae-dinov2b-96c.safetensors"), ("PS-VAE", "psvae", VAE_FILE),
               ("RAE", "rae", "rae-dinov2b.safetensors")]
    for i, (title, short, vae) in enumerate(columns):
        ld, enc, dec, save = (str(10 * (i + 1) + k) for k in range(4))
        api[ld] = {**loader(vae), "_meta": {"title": f"{title} Loader"}}
        api[enc] = {"class_type": "PSVAEEncode", "_meta": {"title": f"{title} Encode"},
                    "inputs": {"image": ["1", 0], "vae": [ld, 0], "resize": "center crop"}}
        api[dec] = {"class_type": "PSVAEDecode", "_meta": {"title": f"{title} Decode"},
                    "inputs": {"latent": [enc, 0], "vae": [ld, 0]}}
        api[save] = {"class_type": "SaveImage", "_meta": {"title": f"{title} reconstruction"},
                     "inputs": {"images": [dec, 0], "filename_prefix": f"psvae/compare_{short}"}}
        x = 380 + 320 * i  # one column per file; 40 px between nodes leaves room for the pack badge
        layout.update({ld: (x, 210, 300, 130), enc: (x, 410, 300, 80), dec: (x, 560, 300, 60),
                       save: (x, 690, 300, 280)})
    return api, layout


def text_to_image() -> tuple[dict, dict]:
    api = {
        "1": loader(VAE_FILE, GENERATOR_FILE),
        "2": {"class_type": "PSVAET2ISampler", "inputs": {
            "generator": ["1", 1], "vae": ["1", 0], "prompt": "a photo of a red fox sitting in the snow, golden hour",
            "seed": 0, "steps": 50, "cfg": 6.5, "shift": 3.0, "batch": 1,
            "cfg_interval_start": 0.0, "cfg_interval_end": 1.0}},
        "3": {"class_type": "PSVAEDecode", "inputs": {"latent": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "psvae/t2i"}},
    }
    layout = {"1": (80, 210, 330, 130), "2": (450, 210, 360, 440), "3": (850, 210, 200, 60),
              "4": (1090, 210, 320, 340), "note": (80, 390, 330, 570)}
    return api, layout


def edit() -> tuple[dict, dict]:
    api = {
        "1": loader(VAE_FILE, GENERATOR_FILE),
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "PSVAEEditSampler", "inputs": {
            "generator": ["1", 1], "vae": ["1", 0], "instruction": "make it a watercolour painting",
            "seed": 0, "steps": 50, "text_guidance": 5.0, "image_guidance": 1.5, "shift": 3.0,
            "source_image": ["2", 0]}},
        "4": {"class_type": "PSVAEDecode", "inputs": {"latent": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "psvae/edit"}},
    }
    layout = {"1": (80, 210, 330, 130), "2": (80, 390, 330, 380), "3": (450, 210, 360, 440),
              "4": (850, 210, 200, 60), "5": (1090, 210, 320, 340), "note": (850, 600, 480, 370)}
    return api, layout


WORKFLOWS = {
    "round_trip": Template(
        "PS-VAE Round Trip",
        "Encode an image into PS-VAE latents and decode it back, to see what the autoencoder keeps.",
        "PS-VAE Encode centre-crops the image to a square and its encoder resizes it to 224x224 px, so the "
        "latent is 16x16 and the reconstruction 256x256 px; 'stretch' keeps the whole image instead. "
        "Load Image drops alpha and turns 16-bit greyscale PNGs white: see the pack's docs/COMFYUI_PACK.md.",
        round_trip),
    "compare": Template(
        "S-VAE vs PS-VAE vs RAE",
        "Reconstruct one image with three autoencoders side by side.",
        "S-VAE: semantic VAE, frozen encoder. PS-VAE: the same with pixel fine-tuning (the paper's model). "
        "RAE: the encoder features themselves as the latent. Each column loads one file.",
        compare),
    "text_to_image": Template(
        "PS-VAE Text to Image",
        "Generate an image from a text prompt with the PS-VAE generator.",
        GENERATE_NOTE + " cfg (6.5) weighs the prompt against no prompt; an empty prompt is refused.",
        text_to_image),
    "edit": Template(
        "PS-VAE Image Editing",
        "Change an image the way a written instruction says, with the PS-VAE generator.",
        GENERATE_NOTE + " The source is centre-cropped to a square and encoded with the VAE (or connect "
        "a latent from PS-VAE Encode to source_latent; exactly one source). text_guidance (5.0) weighs "
        "the instruction, image_guidance (1.5) the source.",
        edit),
}


def apply_layout(key: str, workflow: dict, layout: dict, note: str, files: list[str]) -> dict:
    wf = json.loads(json.dumps(workflow))
    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ps-vae/workflows/{key}"))
    wf.setdefault("extra", {})["ds"] = {"scale": 1, "offset": [0, 0]}  # 100 %, graph units = window pixels
    for node in wf["nodes"]:
        spec = layout.get(str(node["id"]))
        if spec:
            node["pos"] = [spec[0], spec[1]]
            if len(spec) == 4:
                node["size"] = [spec[2], spec[3]]
        if node["type"] == "PSVAELoader":  # the files this loader's widgets name
            named = [v for v in node["widgets_values"] if v in files]
            node.setdefault("properties", {})["models"] = [model_entry(name) for name in named]
    x, y, w, h = layout["note"]
    note_id = max(n["id"] for n in wf["nodes"]) + 1
    wf["nodes"].append({"id": note_id, "type": "Note", "pos": [x, y], "size": [w, h], "flags": {},
                        "order": len(wf["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                        "title": "Read me", "properties": {}, "widgets_values": [note],
                        "color": "#432", "bgcolor": "#653"})
    wf["last_node_id"] = max(wf.get("last_node_id", 0), note_id)
    problems = layout_problems(node_rects(wf))
    if problems:
        raise SystemExit(f"workflow {key!r} breaks the layout rules:\n  " + "\n  ".join(problems))
    return wf


def thumbnail(key: str, screenshot: Path, dest: Path) -> None:
    """The template card: the workflow's result when tools/workflow_results has one, else the graph."""
    result = RESULTS / f"{key}.png"
    with Image.open(result if result.is_file() else screenshot) as im:
        if result.is_file():  # the card is square and shows the whole image
            side = min(im.size)
            box = ((im.width - side) // 2, (im.height - side) // 2)
            im = im.crop((*box, box[0] + side, box[1] + side)).resize(THUMBNAIL_SIZE["result"], Image.LANCZOS)
        else:  # rendered large for legibility, stored small
            im = im.resize(THUMBNAIL_SIZE["screenshot"], Image.LANCZOS)
        im.convert("RGB").save(dest, quality=85)


def main() -> None:
    wanted = sys.argv[1:] or list(WORKFLOWS)
    unknown = sorted(set(wanted) - set(WORKFLOWS))
    if unknown:
        raise SystemExit(f"unknown workflow(s) {unknown}; known: {sorted(WORKFLOWS)}")
    base = Path(tempfile.mkdtemp(prefix="psvae_wf_"))
    server = ComfyServer(base)
    server.prepare()
    folder = base / "models" / "psvae"
    for file, spec in TINY_MODEL_FILES.items():
        write_tiny_vae(folder / file, **spec)
    for file, spec in TINY_GENERATOR_FILES.items():
        write_tiny_generator(folder / file, vae_path=folder / spec["vae"], seed=spec["seed"])
    write_test_image(base / "input" / "example.png")
    server.start()
    try:
        built = {key: WORKFLOWS[key].build() for key in wanted}
        ui = run_frontend(server, "api2ui", {"workflows": {k: api for k, (api, _) in built.items()}}, base / "browser")
        laid_out = {k: apply_layout(k, ui[k]["workflow"], layout, WORKFLOWS[k].note_text(api), files_of(api))
                    for k, (api, layout) in built.items()}
        shots = base / "thumbs"
        shots.mkdir()
        final = run_frontend(server, "normalize", {"workflows": laid_out, "thumbnails": str(shots),
                                                   "viewport": {"width": 1440, "height": 900}}, base / "browser")
        OUT.mkdir(exist_ok=True)
        for key in wanted:
            wf, title = final[key]["workflow"], WORKFLOWS[key].title
            (OUT / f"{title}.json").write_text(json.dumps(wf, indent=2) + "\n")
            thumbnail(key, shots / f"{key}.jpg", OUT / f"{title}.jpg")
            print(f"wrote workflows/{title}.json ({len(wf['nodes'])} nodes) and .jpg")
        if not sys.argv[1:]:  # files of workflows that were renamed or removed
            titles = {t.title for t in WORKFLOWS.values()}
            for path in sorted(OUT.glob("*.json")) + sorted(OUT.glob("*.jpg")):
                if path.stem not in titles:
                    path.unlink()
                    print(f"removed workflows/{path.name}")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
