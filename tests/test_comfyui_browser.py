"""The shipped workflows in ComfyUI's real frontend (headless Debian chromium + npm playwright-core):
each loads and is queued from the UI successfully, the frontend's own UI -> API conversion matches
the one the tests use, what the frontend drew in a 1600x1000 window after the run (the samplers'
previews grown) keeps the layout rules of tools/make_workflows.py, the template browser shows each
workflow once, under its title, with its thumbnail, and loads it when clicked, and a missing model
file is listed by the frontend's Missing Models dialog."""
from __future__ import annotations

import copy
import json
from urllib.parse import unquote

import pytest
from PIL import Image

from comfy_harness import PACK_NAME, REPO, browser_missing, run_frontend, ui_to_api
from tools.make_workflows import layout_problems

pytestmark = pytest.mark.comfyui

WORKFLOWS = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "workflows").glob("*.json"))}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Short values, as the loader's widgets show them (a file name too long for the node's width is cut
# and then the frontend drops the label: docs/COMFYUI_PACK.md).
LOADER_FILES = {"vae_name": "rae-dinov2b.safetensors", "generator_name": "none"}
WINDOW = {"width": 1600, "height": 1000}
MISSING_FILE = "not-in-the-folder.safetensors"


def with_missing_file(wf: dict) -> dict:
    """The workflow with its first loader's VAE file (widget and `models` entry) renamed to a file
    the server does not have."""
    wf = copy.deepcopy(wf)
    node = next(n for n in wf["nodes"] if n["type"] == "PSVAELoader")
    node["properties"]["models"][0]["name"] = node["widgets_values"][0] = MISSING_FILE
    return wf


@pytest.fixture(scope="module")
def frontend(comfy_server, tmp_path_factory):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    expect = {name: sorted(n["type"] for n in wf["nodes"]) for name, wf in WORKFLOWS.items()}
    work = tmp_path_factory.mktemp("frontend")
    result = run_frontend(comfy_server, "check", {
        "workflows": WORKFLOWS, "timeout_ms": 120000, "pack": PACK_NAME, "expect": expect,
        "loader_files": LOADER_FILES, "viewport": WINDOW,
        "missing_models": {"missing": with_missing_file(next(iter(WORKFLOWS.values())))},
        "screenshot": str(work / "templates.png")}, work)
    print("frontend timings (s): open", result.get("__open_seconds"), result.get("__seconds"),
          {name: res.get("seconds") for name, res in result["queue"].items()})
    return result


def test_frontend_queues_every_workflow_successfully(frontend, comfy_server):
    info = comfy_server.object_info()
    for name, wf in WORKFLOWS.items():
        res = frontend["queue"][name]
        assert res["http_status"] == 200 and res["prompt_id"], res
        assert res["status"] != "timeout" and res["status"]["status_str"] == "success", res["status"]
        assert res["error_dialog"] is None, res["error_dialog"]
        saves = [k for k, v in res["output"].items() if v["class_type"] == "SaveImage"]
        assert saves and all(res["outputs"][k]["images"] for k in saves)
        # The tests' converter agrees with the frontend's own graphToPrompt.
        ours = ui_to_api(wf, info)
        strip = lambda p: {k: (v["class_type"], v["inputs"]) for k, v in p.items()}  # noqa: E731
        assert strip(ours) == strip(res["output"]), name


def window_rects(layout: dict) -> list:
    """The frontend's node rectangles ([x, y, w, h] in graph units) as window pixels, for layout_problems."""
    vx, vy = layout["visible"][:2]
    s = layout["scale"]
    return [(f"{n['type']} #{n['id']}", n["type"],
             ((x - vx) * s, (y - vy) * s, (x + w - vx) * s, (y + h - vy) * s))
            for n in layout["nodes"] for x, y, w, h in [n["rect"]]]


def test_what_the_frontend_draws_after_a_run_keeps_the_layout_rules(frontend):
    for name in WORKFLOWS:
        drawn = frontend["queue"][name]["layout"]
        assert drawn["loaded"]["canvas"] == [0, 0, WINDOW["width"], WINDOW["height"]] and drawn["ran"]["scale"] == 1
        for when in ("loaded", "ran"):  # "ran": the samplers have grown by their previews
            assert layout_problems(window_rects(drawn[when])) == [], (name, when)
        notes = [n for n in drawn["ran"]["nodes"] if n["type"] == "Note"]
        assert notes and not any(n["text_overflows"] for n in notes), f"{name}: the note's text needs a scroll bar"


def test_missing_model_file_is_listed_by_the_missing_models_dialog(frontend):
    for name in WORKFLOWS:
        assert frontend["queue"][name]["error_dialog"] is None  # every file there: no dialog
    text = frontend["missing_models"]["missing"]
    assert text and f"psvae / {MISSING_FILE}" in text, text


def test_template_browser_shows_each_workflow_once_and_loads_it(frontend):
    tpl = frontend["templates"]
    assert sorted(tpl["listed"][PACK_NAME]) == sorted(WORKFLOWS)
    assert sorted(tpl["cards"]) == sorted(f"template-workflow-{n}" for n in WORKFLOWS), tpl["cards"]
    assert sorted(t["text"] for t in tpl["titles"]) == sorted(WORKFLOWS), "the card title is the Title Case file name"
    assert not [t["text"] for t in tpl["titles"] if t["cut"]], "a card title is cut short"
    thumbs = {t["card"]: t for t in tpl["thumbs"]}
    fetched = {unquote(f["url"].split("?")[0].rsplit("/", 1)[-1]): f["status"] for f in tpl["fetched"]}
    for name in WORKFLOWS:
        assert fetched.get(f"{name}.jpg") == 200, f"thumbnail of {name} not fetched: {tpl['fetched']}"
        shown = thumbs[f"template-workflow-{name}"]
        with Image.open(REPO / "workflows" / f"{name}.jpg") as jpg:
            assert shown["ok"] and (shown["width"], shown["height"]) == jpg.size, shown  # ours, not a placeholder
        expected = sorted(n["type"] for n in WORKFLOWS[name]["nodes"])
        assert tpl["loaded"][name] == expected, (name, tpl["loaded"][name])


def test_loader_labels_and_file_names_fit_a_new_loader(frontend):
    shown = frontend["loader_widgets"]
    assert {n: w["label"] for n, w in shown["widgets"].items()} == {"vae_name": "vae", "generator_name": "gen"}
    for name, w in shown["widgets"].items():  # drawn whole, not cut to "vae_na…"
        assert w["label"] in w["drawn"] and w["value"] in w["drawn"], (name, shown)
