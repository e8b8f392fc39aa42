"""The shipped workflows (workflows/*.json, UI format) in a real ComfyUI: they convert to API
prompts, run with tiny real checkpoints, and are ComfyUI's template-browser examples for the pack
(ComfyUI reads <pack>/workflows/ as well as example_workflows/; having both would list every
workflow twice, so there is one folder)."""
from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_harness import (PACK_NAME, REPO, TINY_GENERATOR_FILES, TINY_MODEL_FILES, output_images, ui_to_api,
                           write_tiny_generator, write_tiny_vae)

pytestmark = pytest.mark.comfyui

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
# widgets_values positions holding model file names, and the names they may hold
LOADER_FILE_WIDGETS = {"PSVAELoader": {0: set(TINY_MODEL_FILES), 1: set(TINY_GENERATOR_FILES) | {"none"}}}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_there_are_workflows_and_each_has_a_thumbnail():
    assert {"vae_round_trip", "vae_compare_svae_psvae_rae", "psvae_text_to_image", "psvae_edit"} <= set(NAMES)
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


# ---------------------------------------------------------------------------- the loader's lists

def test_each_loader_list_offers_only_files_of_its_kind(comfy_server, comfy_base):
    folder = comfy_base / "models" / "psvae"
    (folder / "unreadable.ckpt").write_bytes(b"not a safetensors file")
    flips = folder / "kind-changes.safetensors"
    write_tiny_vae(flips)

    def lists():
        spec = comfy_server.object_info("PSVAELoader")["PSVAELoader"]["input"]["required"]
        return set(spec["vae_name"][1]["options"]), set(spec["generator_name"][1]["options"])

    vaes, generators = lists()
    assert set(TINY_MODEL_FILES) | {flips.name} <= vaes
    assert set(TINY_GENERATOR_FILES) | {"none"} <= generators
    assert not vaes & set(TINY_GENERATOR_FILES)
    assert not generators & (set(TINY_MODEL_FILES) | {flips.name})
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
