"""The shipped workflows in ComfyUI's real frontend (headless Debian chromium + npm playwright-core):
each loads and is queued from the UI successfully, the frontend's own UI -> API conversion matches
the one the tests use, and the template browser shows each workflow once, with its thumbnail,
and loads it when clicked."""
from __future__ import annotations

import json

import pytest

from comfy_harness import PACK_NAME, REPO, browser_missing, run_frontend, ui_to_api

pytestmark = pytest.mark.comfyui

WORKFLOWS = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "workflows").glob("*.json"))}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# Short values, as the loader's widgets show them (a file name too long for the node's width is cut
# and then the frontend drops the label: docs/COMFYUI_PACK.md).
LOADER_FILES = {"vae_name": "rae-dinov2b.safetensors", "generator_name": "none"}


@pytest.fixture(scope="module")
def frontend(comfy_server, tmp_path_factory):
    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    expect = {name: sorted(n["type"] for n in wf["nodes"]) for name, wf in WORKFLOWS.items()}
    work = tmp_path_factory.mktemp("frontend")
    result = run_frontend(comfy_server, "check", {
        "workflows": WORKFLOWS, "timeout_ms": 120000, "pack": PACK_NAME, "expect": expect,
        "loader_files": LOADER_FILES,
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


def test_template_browser_shows_each_workflow_once_and_loads_it(frontend):
    tpl = frontend["templates"]
    assert sorted(tpl["listed"][PACK_NAME]) == sorted(WORKFLOWS)
    assert sorted(tpl["cards"]) == sorted(f"template-workflow-{n}" for n in WORKFLOWS), tpl["cards"]
    thumbs = {t["card"]: t for t in tpl["thumbs"]}
    fetched = {f["url"].split("?")[0].rsplit("/", 1)[-1]: f["status"] for f in tpl["fetched"]}
    for name in WORKFLOWS:
        assert fetched.get(f"{name}.jpg") == 200, f"thumbnail of {name} not fetched: {tpl['fetched']}"
        shown = thumbs[f"template-workflow-{name}"]
        assert shown["ok"] and (shown["width"], shown["height"]) == (720, 450), shown  # ours, not a placeholder
        expected = sorted(n["type"] for n in WORKFLOWS[name]["nodes"])
        assert tpl["loaded"][name] == expected, (name, tpl["loaded"][name])


def test_loader_labels_and_file_names_fit_a_new_loader(frontend):
    shown = frontend["loader_widgets"]
    assert {n: w["label"] for n, w in shown["widgets"].items()} == {"vae_name": "vae", "generator_name": "gen"}
    for name, w in shown["widgets"].items():  # drawn whole, not cut to "vae_na…"
        assert w["label"] in w["drawn"] and w["value"] in w["drawn"], (name, shown)
