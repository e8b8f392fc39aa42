"""The shipped workflows (workflows/*.json, UI format) in a real ComfyUI: they convert to API
prompts, run with tiny real checkpoints, and are ComfyUI's template-browser examples for the pack
(ComfyUI reads <pack>/workflows/ as well as example_workflows/; having both would list every
workflow twice, so there is one folder). Also the template conventions of tools/make_workflows.py:
Title Case names, a one-sentence description, layouts that fit the window, `models` entries."""
from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from comfy_harness import (PACK_NAME, REPO, TINY_GENERATOR_FILES, TINY_MODEL_FILES, output_images, ui_to_api,
                           write_tiny_generator, write_tiny_vae)
from tools import make_workflows

pytestmark = pytest.mark.comfyui

WORKFLOW_DIR = REPO / "workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
NAMES = [p.stem for p in WORKFLOWS]
# widgets_values positions holding model file names, and the names they may hold
LOADER_FILE_WIDGETS = {"PSVAELoader": {0: set(TINY_MODEL_FILES), 1: set(TINY_GENERATOR_FILES) | {"none"}}}
SMALL_WORDS = {"a", "an", "and", "as", "at", "by", "for", "from", "in", "into", "of", "on", "or", "the", "to",
               "vs", "with"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def note_of(wf: dict) -> str:
    notes = [n for n in wf["nodes"] if n["type"] in make_workflows.NOTE_TYPES]
    assert len(notes) == 1, "one Read-me note per workflow"
    return notes[0]["widgets_values"][0]


def test_there_are_workflows_and_each_has_a_thumbnail():
    titles = {t.title for t in make_workflows.WORKFLOWS.values()}
    assert {"PS-VAE Round Trip", "S-VAE vs PS-VAE vs RAE", "PS-VAE Text to Image",
            "PS-VAE Image Editing"} <= titles
    assert set(NAMES) == titles, "every file is a template of tools/make_workflows.py, under its title"
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no .jpg thumbnail"


def title_case_problems(title: str) -> list[str]:
    """The words that break Title Case: small words lower case inside the title, all others capitalised."""
    words = title.split(" ")
    bad = []
    for i, w in enumerate(words):
        small = w.lower() in SMALL_WORDS and 0 < i < len(words) - 1
        if not w or (w != w.lower() if small else not w[0].isupper()):
            bad.append(w)
    return bad


def test_title_case_rule_accepts_and_refuses():
    assert title_case_problems("PS-VAE Text to Image") == []
    assert title_case_problems("Compare S-VAE, PS-VAE and RAE") == title_case_problems("S-VAE vs PS-VAE vs RAE") == []
    assert title_case_problems("psvae_text_to_image") == ["psvae_text_to_image"]
    assert title_case_problems("PS-VAE text to image") == ["text", "image"]
    assert title_case_problems("PS-VAE Text To Image") == ["To"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_name_is_title_case_and_the_note_opens_with_a_one_sentence_description(path):
    assert title_case_problems(path.stem) == [], path.stem
    assert not re.search(r"[_/\\]", path.stem) and len(path.stem) <= 24, "a card title (one line of a card), not a file name"
    template = next(t for t in make_workflows.WORKFLOWS.values() if t.title == path.stem)
    first = note_of(load(path)).split("\n\n")[0]
    assert first == template.description
    assert re.fullmatch(r"[A-Z][^.!?]*[.]", first) and 20 <= len(first) <= 160, f"one sentence: {first!r}"
    assert first.lower().rstrip(".") != path.stem.lower(), "the description says more than the name"


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_graph_fits_the_window_and_notes_lie_beside_the_nodes(path):
    wf = load(path)
    assert wf["extra"]["ds"] == {"scale": 1, "offset": [0, 0]}, "opens at 100 %"
    assert make_workflows.layout_problems(make_workflows.node_rects(wf)) == []


def test_layout_rules_refuse_what_they_should():
    ok = [("Loader #1", "PSVAELoader", (80, 180, 410, 340)), ("Sampler #2", "PSVAEEditSampler", (450, 180, 810, 650)),
          ("Note #3", "Note", (850, 570, 1330, 970))]
    assert make_workflows.layout_problems(ok) == []
    over = ok + [("Note #4", "Note", (300, 300, 500, 400))]  # over the loader and the sampler
    assert [p for p in make_workflows.layout_problems(over) if "the note Note #4 lies over" in p] == [
        "the note Note #4 lies over Loader #1", "the note Note #4 lies over Sampler #2"]
    below = ok + [("Decode #5", "PSVAEDecode", (500, 700, 700, 790))]
    assert make_workflows.layout_problems(below) == [
        "Decode #5 is below Sampler #2, whose preview makes it taller while it runs"]
    outside = [("Save #6", "SaveImage", (1300, 600, 1650, 900)), ("Loader #7", "PSVAELoader", (30, 60, 300, 200))]
    problems = make_workflows.layout_problems(outside)
    assert "Save #6 (1300, 600, 1650, 900) is not inside the 1600x1000 window" in problems
    assert any(p.startswith("Save #6") and "minimap" in p for p in problems)
    assert any(p.startswith("Loader #7") and "side bar" in p for p in problems)
    assert any(p.startswith("Loader #7") and "banner and workflow tabs" in p for p in problems)


@pytest.mark.parametrize("path", WORKFLOWS, ids=NAMES)
def test_loaders_name_their_files_in_models_entries_for_the_missing_models_dialog(path):
    wf = load(path)
    loaders = [n for n in wf["nodes"] if n["type"] == "PSVAELoader"]
    assert loaders
    for node in loaders:
        files = [v for v in node["widgets_values"][:2] if v != "none"]
        entries = node["properties"]["models"]
        assert [e["name"] for e in entries] == files
        for e in entries:
            assert e["directory"] == "psvae" and re.fullmatch(r"https://\S+", e["url"]), e  # the frontend wants a url
            bundled = REPO / "models" / e["name"]
            if bundled.is_file():  # a file that ships with the pack: its sha256
                assert (e["hash_type"], e["hash"]) == ("sha256", hashlib.sha256(bundled.read_bytes()).hexdigest())
            else:  # the user's file: the note says where it comes from
                assert "hash" not in e
                assert e["name"] in note_of(wf) and "These are yours" in note_of(wf)


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
    for path in WORKFLOWS:  # the names have spaces: the frontend asks for them percent-encoded
        r = comfy_server.get(f"/api/workflow_templates/{PACK_NAME}/{quote(path.name)}")
        assert r.status_code == 200 and r.json() == load(path)
        r = comfy_server.get(f"/api/workflow_templates/{PACK_NAME}/{quote(path.stem)}.jpg")
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


def test_models_entry_has_the_sha256_of_a_file_that_ships_with_the_pack(tmp_path, monkeypatch):
    monkeypatch.setattr(make_workflows, "BUNDLED_MODELS", tmp_path)
    (tmp_path / "scenes.safetensors").write_bytes(b"weights" * 1000)
    assert make_workflows.model_entry("scenes.safetensors") == {
        "name": "scenes.safetensors", "url": make_workflows.MODELS_URL, "directory": "psvae",
        "hash": hashlib.sha256(b"weights" * 1000).hexdigest(), "hash_type": "sha256"}
    assert "hash" not in make_workflows.model_entry("psvae-dinov2b-96c.safetensors")


def test_a_result_image_becomes_the_square_thumbnail_else_the_graph_screenshot(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(make_workflows, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    shot = tmp_path / "shot.jpg"
    Image.new("RGB", (1440, 900), (40, 40, 40)).save(shot)
    make_workflows.thumbnail("round_trip", shot, tmp_path / "a.jpg")
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.size == (720, 450)
    result = np.zeros((256, 384, 3), np.uint8)
    result[:, 64:320] = (250, 10, 10)  # the centre square is red, the sides black
    Image.fromarray(result).save(tmp_path / "results" / "round_trip.png")
    make_workflows.thumbnail("round_trip", shot, tmp_path / "b.jpg")
    with Image.open(tmp_path / "b.jpg") as im:
        assert im.size == (512, 512)
        px = np.asarray(im).astype(int)
    assert np.abs(px[8:-8, 8:-8] - (250, 10, 10)).max() < 30
