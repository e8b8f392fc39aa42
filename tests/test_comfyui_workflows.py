"""The shipped workflows (workflows/*.json, UI format) in a real ComfyUI: they convert to API
prompts, run with tiny real checkpoints, and are ComfyUI's template-browser examples for the pack
(ComfyUI reads <pack>/workflows/ as well as example_workflows/; having both would list every
workflow twice, so there is one folder).

The scenes workflows use the models bundled in the pack's models/ folder, which the server finds
with nothing copied into models/psvae; their pictures are scored by trainer/scenes/scorer.py
against the pass rates recorded next to the models (models/scenes_pass_rates.json)."""
from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_harness import (PACK_NAME, REPO, TINY_GENERATOR_FILES, TINY_MODEL_FILES, assert_node_error, output_images,
                           saved_arrays, ui_to_api, write_tiny_generator, write_tiny_vae)

pytestmark = pytest.mark.comfyui

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
# widgets_values positions holding model file names, and the names they may hold
SCENES_VAE, SCENES_GENERATORS = "scenes_psvae.safetensors", {"scenes_t2i.safetensors", "scenes_edit.safetensors"}
LOADER_FILE_WIDGETS = {"PSVAELoader": {0: set(TINY_MODEL_FILES) | {SCENES_VAE},
                                       1: set(TINY_GENERATOR_FILES) | SCENES_GENERATORS | {"none"}}}
BUNDLED = REPO / "models"
SCENES = ("scenes_text_to_image", "scenes_edit", "scenes_round_trip")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_workflows_and_each_has_a_thumbnail():
    assert {"vae_round_trip", "vae_compare_svae_psvae_rae", "psvae_text_to_image", "psvae_edit", *SCENES} <= set(NAMES)
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no .jpg thumbnail"


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_workflow_is_ui_format_and_consistent(path):
    wf = load(path)
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    ids = {n["id"] for n in wf["nodes"]}
    assert len(ids) == len(wf["nodes"]) and wf["last_node_id"] >= max(ids)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert src in ids and dst in ids
        dst_node = next(n for n in wf["nodes"] if n["id"] == dst)
        assert dst_node["inputs"][dst_slot]["link"] == link_id
    for node in wf["nodes"]:
        for pos, names in LOADER_FILE_WIDGETS.get(node["type"], {}).items():
            assert node["widgets_values"][pos] in names, "workflows use the documented file names"


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_workflow_runs_and_saves_non_constant_images_of_the_right_size(comfy_server, path):
    prompt = ui_to_api(load(path), comfy_server.object_info())
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert saves
    for k in saves:  # fresh file names, so the outputs are written by this run
        prompt[k]["inputs"]["filename_prefix"] = f"wf/{path.stem}_{uuid.uuid4().hex[:6]}"
    entry = comfy_server.run(prompt)
    arrays = []
    for k in saves:
        images = entry["outputs"][k]["images"]
        assert len(images) == 1
        img = np.asarray(Image.open(io.BytesIO(comfy_server.view(images[0]))).convert("RGB"))
        assert img.shape == (256, 256, 3)
        assert img.std() > 1.0, "constant output"
        arrays.append(img)
    assert len(output_images(entry)) == len(saves)
    if len(arrays) > 1:  # the comparison really uses different models
        assert all(np.abs(a.astype(int) - arrays[0].astype(int)).max() > 0 for a in arrays[1:])


def test_template_browser_lists_each_workflow_once_with_its_thumbnail(comfy_server):
    listed = comfy_server.get("/workflow_templates").json()
    assert sorted(listed.get(PACK_NAME, [])) == sorted(NAMES), listed  # each exactly once
    for path in WORKFLOWS:
        r = comfy_server.get(f"/api/workflow_templates/{PACK_NAME}/{path.name}")
        assert r.status_code == 200 and r.json() == load(path)
        r = comfy_server.get(f"/api/workflow_templates/{PACK_NAME}/{path.stem}.jpg")
        assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff"


# ---------------------------------------------------------------------------- the bundled scenes models

def scenes_prompt(name: str, object_info: dict) -> dict:
    return ui_to_api(load(WORKFLOW_DIR / f"{name}.json"), object_info)


def node_of(prompt: dict, class_type: str) -> dict:
    (node,) = [v for v in prompt.values() if v["class_type"] == class_type]
    return node


@pytest.mark.parametrize("name", SCENES)
def test_scenes_workflow_records_the_bundled_files_with_their_sha256(name):
    import hashlib

    wf = load(WORKFLOW_DIR / f"{name}.json")
    (loader,) = [n for n in wf["nodes"] if n["type"] == "PSVAELoader"]
    wanted = [f for f in loader["widgets_values"][:2] if f != "none"]
    models = loader["properties"]["models"]
    assert [m["name"] for m in models] == wanted
    for m in models:
        assert m["directory"] == "psvae" and m["hash_type"] == "sha256"
        assert m["hash"] == hashlib.sha256((BUNDLED / m["name"]).read_bytes()).hexdigest(), (
            f"{m['name']} changed: run make workflows NAMES=\"{' '.join(SCENES)}\"")


def test_scenes_models_come_from_the_pack_not_from_models_psvae(comfy_server, comfy_base):
    user_folder = comfy_base / "models" / "psvae"
    for name in {SCENES_VAE} | SCENES_GENERATORS:
        assert (BUNDLED / name).is_file() and not (user_folder / name).exists()
    assert {SCENES_VAE} | SCENES_GENERATORS <= set(comfy_server.get("/models/psvae").json())


def test_a_file_in_models_psvae_wins_over_the_bundled_one_of_the_same_name(comfy_server, comfy_base):
    from safetensors.torch import save_file
    import torch

    shadow = comfy_base / "models" / "psvae" / SCENES_VAE
    save_file({"w": torch.zeros(2)}, str(shadow), metadata={"modelspec.architecture": "sdxl"})
    try:
        prompt = scenes_prompt("scenes_round_trip", comfy_server.object_info())
        assert_node_error(comfy_server, prompt, "not a PS-VAE file")  # the user's (foreign) file was taken
    finally:
        shadow.unlink()
    comfy_server.run(scenes_prompt("scenes_round_trip", comfy_server.object_info()))  # the bundled one again


def test_each_loader_list_offers_only_files_of_its_kind(comfy_server, comfy_base):
    folder = comfy_base / "models" / "psvae"
    (folder / "unreadable.ckpt").write_bytes(b"not a safetensors file")
    flips = folder / "kind-changes.safetensors"
    write_tiny_vae(flips)

    def lists():
        spec = comfy_server.object_info("PSVAELoader")["PSVAELoader"]["input"]["required"]
        return set(spec["vae_name"][1]["options"]), set(spec["generator_name"][1]["options"])

    vaes, generators = lists()
    assert set(TINY_MODEL_FILES) | {SCENES_VAE, flips.name} <= vaes
    assert set(TINY_GENERATOR_FILES) | SCENES_GENERATORS | {"none"} <= generators
    assert not vaes & (set(TINY_GENERATOR_FILES) | SCENES_GENERATORS)
    assert not generators & (set(TINY_MODEL_FILES) | {SCENES_VAE, flips.name})
    # A file whose kind cannot be read is offered in both, so picking it says why it cannot load.
    assert "unreadable.ckpt" in vaes and "unreadable.ckpt" in generators
    # The kind is cached per path, size and mtime: a file rewritten in place moves to the other list.
    write_tiny_generator(flips, vae_path=folder / next(iter(TINY_MODEL_FILES)))
    vaes, generators = lists()
    assert flips.name in generators and flips.name not in vaes
    flips.unlink()
    (folder / "unreadable.ckpt").unlink()


def test_labels_are_short_enough_for_the_default_node_width(comfy_server):
    spec = comfy_server.object_info("PSVAELoader")["PSVAELoader"]["input"]["required"]
    assert spec["vae_name"][1]["display_name"] == "vae"
    assert spec["generator_name"][1]["display_name"] == "gen"


def pass_rates() -> dict:
    return json.loads((BUNDLED / "scenes_pass_rates.json").read_text())


def run_seeds(server, prompt: dict, sampler: str) -> list[np.ndarray]:
    images = []
    for seed in range(pass_rates()["seeds"]):
        node_of(prompt, sampler)["inputs"]["seed"] = seed
        node_of(prompt, "SaveImage")["inputs"]["filename_prefix"] = f"wf/scenes_{uuid.uuid4().hex[:6]}"
        (img,) = saved_arrays(server, server.run(prompt, timeout=600))
        assert img.shape == (256, 256, 3)
        images.append(img)
    return images


def test_scenes_text_to_image_passes_the_scorer_at_the_documented_rate(comfy_server):
    from trainer.scenes import scorer
    from trainer.scenes.evaluate import t2i_prompts

    prompt = scenes_prompt("scenes_text_to_image", comfy_server.object_info())
    text = node_of(prompt, "PSVAET2ISampler")["inputs"]["prompt"]
    (spec,) = [s for t, s in t2i_prompts("test", 1) if t == text]  # a test-split prompt, with its spec
    results = [scorer.score(img, spec) for img in run_seeds(comfy_server, prompt, "PSVAET2ISampler")]
    rate = sum(r["passed"] for r in results) / len(results)
    assert rate >= pass_rates()["scenes_text_to_image"], results


def test_scenes_edit_passes_the_scorer_at_the_documented_rate(comfy_server):
    from trainer.scenes import scorer, world
    from trainer.scenes.evaluate import edit_cases

    prompt = scenes_prompt("scenes_edit", comfy_server.object_info())
    (source, instruction, spec), = edit_cases(1)
    assert node_of(prompt, "PSVAEEditSampler")["inputs"]["instruction"] == instruction
    shipped = np.asarray(Image.open(WORKFLOW_DIR / "input" / node_of(prompt, "LoadImage")["inputs"]["image"]))
    assert np.array_equal(shipped, np.asarray(world.render(source))), "the shipped source is the edit's scene"
    results = [scorer.score_edit(img, spec) for img in run_seeds(comfy_server, prompt, "PSVAEEditSampler")]
    rate = sum(r["passed"] for r in results) / len(results)
    assert rate >= pass_rates()["scenes_edit"], results
