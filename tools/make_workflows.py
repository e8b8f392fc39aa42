"""Regenerate workflows/*.json (UI format) and their .jpg thumbnails with the real ComfyUI frontend.

    .venv/bin/python tools/make_workflows.py [NAME ...]   (needs `make comfyui browser`; no network)

With names, only those workflows are rewritten (the others stay byte for byte).

Each workflow is written here as an API prompt plus a layout. A temporary ComfyUI (the test
harness, with tiny checkpoints under the file names the workflows use) turns it into the UI format
exactly as the frontend does (app.loadApiJson + app.graphToPrompt), the layout and a Note are
applied, and the result goes through app.loadGraphData + app.graphToPrompt once more (what "Save"
writes), with a screenshot of the graph as the template-browser thumbnail.

The files are ComfyUI's template-browser examples too: ComfyUI lists <pack>/workflows/*.json
under Templates -> Extensions -> ps-vae (see tests/test_comfyui_workflows.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

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
MODELS_NOTE = (
    "Models: put the PS-VAE .safetensors files in ComfyUI/models/psvae (or in a folder named under "
    "'psvae:' in extra_model_paths.yaml) and press R in the browser to refresh the file lists. "
    "They load only from there: no download, no pickle files.")
ROUND_TRIP_NOTE = (
    "PS-VAE round trip: encode an image into PS-VAE latents and decode it back.\n\n"
    "PS-VAE Encode centre-crops the image to a square and its encoder resizes it to 224x224 px, so the "
    "latent is 16x16 and the reconstruction is 256x256 px. 'stretch' keeps the whole image instead.\n\n"
    + MODELS_NOTE)
COMPARE_NOTE = (
    "Compare reconstructions of the same image by three autoencoders: S-VAE (semantic VAE, frozen "
    "encoder), PS-VAE (semantic VAE with pixel fine-tuning; the paper's model) and RAE (the encoder "
    "features themselves as the latent). Each row loads one file; the three results are saved side by "
    "side.\n\n" + MODELS_NOTE)


GENERATE_NOTE = (
    "The generator makes latents in its VAE's latent space, so PS-VAE Loader loads the pair: the VAE and the "
    "generator trained on it (the loader refuses a pair that does not belong together and says why). "
    "The sampler returns PS-VAE latents; PS-VAE Decode turns them into a 256x256 image.\n\n"
    "Paper settings: 50 Euler steps, shift 3. The sampler node shows a progress bar and a live preview; "
    "Cancel stops it between steps. Row i of a batch uses seed + i.\n\n")
T2I_NOTE = ("PS-VAE text to image.\n\n" + GENERATE_NOTE
            + "cfg (6.5) weighs the prompt against no prompt; an empty prompt is refused.\n\n" + MODELS_NOTE)
EDIT_NOTE = (
    "PS-VAE instruction-based editing: LoadImage -> PS-VAE Edit Sampler -> Decode.\n\n" + GENERATE_NOTE
    + "The source image is centre-cropped to a square and encoded with the VAE (or connect a latent from PS-VAE "
    "Encode to source_latent instead; exactly one source). text_guidance (5.0) weighs the instruction, "
    "image_guidance (1.5) the source.\n\n" + MODELS_NOTE)
VAE_FILE = "psvae-dinov2b-96c.safetensors"
GENERATOR_FILE = "psvae-generator-653m.safetensors"


def loader(vae: str, generator: str = "none") -> dict:
    return {"class_type": "PSVAELoader", "inputs": {"vae_name": vae, "generator_name": generator, "dtype": "auto"}}


def round_trip() -> tuple[dict, dict, str]:
    api = {
        "1": loader("psvae-dinov2b-96c.safetensors"),
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "PSVAEEncode", "inputs": {"image": ["2", 0], "vae": ["1", 0], "resize": "center crop"}},
        "4": {"class_type": "PSVAEDecode", "inputs": {"latent": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "psvae/round_trip"}},
    }
    layout = {"1": (40, 60, 330, 130), "2": (40, 250, 330, 380), "3": (420, 60, 280, 80),
              "4": (740, 60, 200, 60), "5": (980, 60, 300, 320), "note": (420, 250, 520, 260)}
    return api, layout, ROUND_TRIP_NOTE


def compare() -> tuple[dict, dict, str]:
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}}}
    layout = {"1": (40, 60, 330, 380), "note": (40, 480, 330, 420)}
    rows = [("S-VAE", "svae", "svae-dinov2b-96c.safetensors"), ("PS-VAE", "psvae", "psvae-dinov2b-96c.safetensors"),
            ("RAE", "rae", "rae-dinov2b.safetensors")]
    for i, (title, short, vae) in enumerate(rows):
        ld, enc, dec, save = (str(10 * (i + 1) + k) for k in range(4))
        api[ld] = {**loader(vae), "_meta": {"title": f"{title} Loader"}}
        api[enc] = {"class_type": "PSVAEEncode", "_meta": {"title": f"{title} Encode"},
                    "inputs": {"image": ["1", 0], "vae": [ld, 0], "resize": "center crop"}}
        api[dec] = {"class_type": "PSVAEDecode", "_meta": {"title": f"{title} Decode"},
                    "inputs": {"latent": [enc, 0], "vae": [ld, 0]}}
        api[save] = {"class_type": "SaveImage", "_meta": {"title": f"{title} reconstruction"},
                     "inputs": {"images": [dec, 0], "filename_prefix": f"psvae/compare_{short}"}}
        y = 60 + 330 * i
        layout.update({ld: (420, y, 330, 130), enc: (790, y, 280, 80), dec: (1110, y, 200, 60)})
        layout[save] = (1350, y, 300, 300)
    return api, layout, COMPARE_NOTE


def text_to_image() -> tuple[dict, dict, str]:
    api = {
        "1": loader(VAE_FILE, GENERATOR_FILE),
        "2": {"class_type": "PSVAET2ISampler", "inputs": {
            "generator": ["1", 1], "vae": ["1", 0], "prompt": "a photo of a red fox sitting in the snow, golden hour",
            "seed": 0, "steps": 50, "cfg": 6.5, "shift": 3.0, "batch": 1,
            "cfg_interval_start": 0.0, "cfg_interval_end": 1.0}},
        "3": {"class_type": "PSVAEDecode", "inputs": {"latent": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "psvae/t2i"}},
    }
    layout = {"1": (40, 60, 330, 130), "2": (420, 60, 360, 440), "3": (830, 60, 200, 60),
              "4": (1080, 60, 320, 340), "note": (40, 250, 330, 420)}
    return api, layout, T2I_NOTE


def edit() -> tuple[dict, dict, str]:
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
    layout = {"1": (40, 60, 330, 130), "2": (40, 250, 330, 380), "3": (420, 60, 360, 440),
              "4": (830, 60, 200, 60), "5": (1080, 60, 320, 340), "note": (420, 560, 610, 300)}
    return api, layout, EDIT_NOTE


WORKFLOWS = {"vae_round_trip": round_trip, "vae_compare_svae_psvae_rae": compare,
             "psvae_text_to_image": text_to_image, "psvae_edit": edit}


def apply_layout(name: str, workflow: dict, layout: dict, note: str) -> dict:
    wf = json.loads(json.dumps(workflow))
    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ps-vae/workflows/{name}"))
    for node in wf["nodes"]:
        spec = layout.get(str(node["id"]))
        if spec:
            node["pos"] = [spec[0], spec[1]]
            if len(spec) == 4:
                node["size"] = [spec[2], spec[3]]
    x, y, w, h = layout["note"]
    note_id = max(n["id"] for n in wf["nodes"]) + 1
    wf["nodes"].append({"id": note_id, "type": "Note", "pos": [x, y], "size": [w, h], "flags": {},
                        "order": len(wf["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                        "title": "Read me", "properties": {}, "widgets_values": [note],
                        "color": "#432", "bgcolor": "#653"})
    wf["last_node_id"] = max(wf.get("last_node_id", 0), note_id)
    return wf


def main() -> None:
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
        wanted = sys.argv[1:] or list(WORKFLOWS)
        unknown = sorted(set(wanted) - set(WORKFLOWS))
        if unknown:
            raise SystemExit(f"unknown workflow(s) {unknown}; known: {sorted(WORKFLOWS)}")
        specs = {name: WORKFLOWS[name]() for name in wanted}
        ui = run_frontend(server, "api2ui", {"workflows": {n: s[0] for n, s in specs.items()}}, base / "browser")
        laid_out = {n: apply_layout(n, ui[n]["workflow"], specs[n][1], specs[n][2]) for n in specs}
        thumbs = base / "thumbs"
        thumbs.mkdir()
        final = run_frontend(server, "normalize", {"workflows": laid_out, "thumbnails": str(thumbs),
                                                   "viewport": {"width": 1440, "height": 900}}, base / "browser")
        OUT.mkdir(exist_ok=True)
        for name in specs:
            wf = final[name]["workflow"]
            (OUT / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
            with Image.open(thumbs / f"{name}.jpg") as im:  # rendered large for legibility, stored small
                im.convert("RGB").resize((720, 450), Image.LANCZOS).save(OUT / f"{name}.jpg", quality=85)
            print(f"wrote workflows/{name}.json ({len(wf['nodes'])} nodes) and .jpg")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
