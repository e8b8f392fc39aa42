"""The pack's nodes in a real ComfyUI 0.3.75 server (API prompts): schema, round trip, bad input."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from comfy_harness import EXTRA_FOLDER_FILE, assert_node_error, saved_arrays, write_tiny_vae

pytestmark = pytest.mark.comfyui

PSVAE = "psvae-dinov2b-96c.safetensors"  # tiny, 16 latent channels
RAE = "rae-dinov2b.safetensors"  # tiny, RAE mode: 64 latent channels (the encoder width)

# Stable workflow identity: node ids, input names in order (widgets only ever appended), outputs.
EXPECTED = {
    "PSVAELoader": (["vae_name", "generator_name", "dtype"], ["PSVAE_VAE", "PSVAE_GENERATOR"]),
    "PSVAEEncode": (["image", "vae", "resize"], ["LATENT"]),
    "PSVAEDecode": (["latent", "vae"], ["IMAGE"]),
    "PSVAET2ISampler": (["generator", "vae", "prompt", "seed", "steps", "cfg", "shift", "batch",
                         "cfg_interval_start", "cfg_interval_end", "negative_prompt", "init_latent", "denoise"],
                        ["LATENT"]),
    "PSVAEEditSampler": (["generator", "vae", "instruction", "seed", "steps", "text_guidance", "image_guidance",
                          "shift", "source_image", "source_latent", "negative_instruction", "init_latent", "denoise"],
                         ["LATENT"]),
}


def unique() -> str:
    return uuid.uuid4().hex[:8]


def loader(vae=PSVAE, generator="none", dtype="auto") -> dict:
    return {"class_type": "PSVAELoader", "inputs": {"vae_name": vae, "generator_name": generator, "dtype": dtype}}


def round_trip_prompt(image_node: dict, vae=PSVAE, resize="center crop", decode_vae=None) -> dict:
    prompt = {
        "1": loader(vae),
        "2": image_node,
        "3": {"class_type": "PSVAEEncode", "inputs": {"image": ["2", 0], "vae": ["1", 0], "resize": resize}},
        "4": {"class_type": "PSVAEDecode", "inputs": {"latent": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": f"t/{unique()}"}},
    }
    if decode_vae:
        prompt["6"] = loader(decode_vae)
        prompt["4"]["inputs"]["vae"] = ["6", 0]
    return prompt


def empty_image(width, height, batch=1, color=0x3366CC) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch, "color": color}}


# ------------------------------------------------------------------------------------------ schema

def test_object_info_lists_the_nodes_with_tooltips_and_descriptions(comfy_server):
    info = comfy_server.object_info()
    assert sorted(k for k, v in info.items() if v["python_module"] == "custom_nodes.ps-vae") == sorted(EXPECTED)
    for node_id, (inputs, outputs) in EXPECTED.items():
        assert node_id in info, f"{node_id} missing: the pack did not import? see the server log"
        node = info[node_id]
        assert node["category"] == "PS-VAE"
        assert node["python_module"] == "custom_nodes.ps-vae"
        assert node["display_name"].startswith("PS-VAE ")
        assert len(node["description"]) > 40
        order = node["input_order"]["required"] + node["input_order"].get("optional", [])
        assert order == inputs
        for name in order:
            spec = node["input"]["required"].get(name) or node["input"]["optional"][name]
            assert len(spec[1].get("tooltip", "")) > 15, f"{node_id}.{name} has no tooltip"
        assert node["output"] == outputs
        assert all(len(t) > 15 for t in node["output_tooltips"]), node["output_tooltips"]
    assert "center crop" in info["PSVAEEncode"]["input"]["required"]["resize"][1]["tooltip"]


def test_model_folder_lists_files_from_models_psvae_and_extra_model_paths(comfy_server, comfy_base):
    (comfy_base / "models" / "psvae" / "README.txt").write_text("not a model")
    listed = comfy_server.get("/models/psvae").json()
    assert PSVAE in listed and RAE in listed and EXTRA_FOLDER_FILE in listed
    assert "README.txt" not in listed
    options = comfy_server.object_info("PSVAELoader")["PSVAELoader"]["input"]["required"]["vae_name"][1]["options"]
    assert EXTRA_FOLDER_FILE in options and "README.txt" not in options


# -------------------------------------------------------------------------------------- round trip

def test_round_trip_from_an_odd_sized_image_gives_256px_non_constant_images(comfy_server):
    entry = comfy_server.run(round_trip_prompt({"class_type": "LoadImage", "inputs": {"image": "example.png"}}))
    (img,) = saved_arrays(comfy_server, entry)
    assert img.shape == (256, 256, 3)  # 320x240 -> centre crop 240x240 -> 224 px -> 16x16 latent -> 256 px
    assert img.std() > 1.0


def test_round_trip_batch_and_stretch(comfy_server):
    entry = comfy_server.run(round_trip_prompt(empty_image(96, 40, batch=3), resize="stretch"))
    imgs = saved_arrays(comfy_server, entry)
    assert len(imgs) == 3 and all(i.shape == (256, 256, 3) and i.std() > 1.0 for i in imgs)


def test_vae_from_the_extra_model_paths_folder_runs(comfy_server):
    entry = comfy_server.run(round_trip_prompt(empty_image(64, 64), vae=EXTRA_FOLDER_FILE))
    (img,) = saved_arrays(comfy_server, entry)
    assert img.shape == (256, 256, 3)


# ------------------------------------------------------------------------------------------ bad input

def test_wrong_file_kinds_give_node_errors(comfy_server, comfy_base):
    folder = comfy_base / "models" / "psvae"
    torch.save({"weight": torch.zeros(2)}, folder / "pickled.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(folder / "foreign.safetensors"), metadata={"modelspec.architecture": "sdxl"})
    from psvae_core import checkpoint

    checkpoint.save_component(folder / "a-generator.safetensors", kind="generator", config={}, tensors={"w": torch.zeros(1)})

    image = empty_image(64, 64)
    assert_node_error(comfy_server, round_trip_prompt(image, vae="pickled.pt"), "pickle")
    assert_node_error(comfy_server, round_trip_prompt(image, vae="foreign.safetensors"), "not a PS-VAE file")
    assert_node_error(comfy_server, round_trip_prompt(image, vae="a-generator.safetensors"),
                      "generator file", "needs a vae file")
    assert_node_error(comfy_server, round_trip_prompt(image, vae="no-such-file.safetensors"), "not found", "psvae")
    bad_generator = round_trip_prompt(image)
    bad_generator["1"]["inputs"]["generator_name"] = RAE
    assert_node_error(comfy_server, bad_generator, "vae file", "needs a generator file")


def test_truncated_checkpoint_gives_a_node_error(comfy_server, comfy_base):
    folder = comfy_base / "models" / "psvae"
    data = (folder / PSVAE).read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    assert_node_error(comfy_server, round_trip_prompt(empty_image(64, 64), vae="truncated.safetensors"), "incomplete")


def test_latent_from_another_vae_is_refused_with_the_channel_counts(comfy_server):
    text = assert_node_error(comfy_server, round_trip_prompt(empty_image(64, 64), vae=RAE, decode_vae=PSVAE),
                             "64 channels", "takes 16")
    assert "another VAE" in text
    core_latent = {
        "1": loader(),
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "3": {"class_type": "PSVAEDecode", "inputs": {"latent": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    assert_node_error(comfy_server, core_latent, "4 channels", "takes 16")


def test_absurd_sizes_give_node_errors_and_the_server_keeps_running(comfy_server):
    assert_node_error(comfy_server, round_trip_prompt(empty_image(8200, 8)), "outside the supported",
                      "8200x8 (width x height)")
    assert_node_error(comfy_server, round_trip_prompt(empty_image(4, 4)), "outside the supported")
    huge = round_trip_prompt(empty_image(64, 64))
    huge["7"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 8.0}}
    huge["8"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["7", 0], "upscale_method": "nearest-exact", "scale_by": 8.0}}
    huge["4"]["inputs"]["latent"] = ["8", 0]
    assert_node_error(comfy_server, huge, "16384x16384", "limit")
    # ... and a good prompt still runs afterwards.
    entry = comfy_server.run(round_trip_prompt(empty_image(48, 48)))
    assert saved_arrays(comfy_server, entry)[0].shape == (256, 256, 3)


def test_file_replaced_in_place_is_reloaded(comfy_server, comfy_base):
    path = comfy_base / "models" / "psvae" / "replaced.safetensors"
    write_tiny_vae(path, seed=10)
    prompt = round_trip_prompt(empty_image(64, 64), vae="replaced.safetensors")
    prompt["5"]["inputs"]["filename_prefix"] = "t/replaced_a"
    first = saved_arrays(comfy_server, comfy_server.run(prompt))[0]
    write_tiny_vae(path, seed=11)
    prompt["5"]["inputs"]["filename_prefix"] = "t/replaced_b"
    second = saved_arrays(comfy_server, comfy_server.run(prompt))[0]
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0, "the loader kept the old weights"


def test_interrupt_stops_a_run_between_batches_and_the_next_prompt_runs(comfy_server):
    prompt = round_trip_prompt(empty_image(64, 64, batch=64, color=0x10A050))
    with comfy_server.events() as events:
        r = comfy_server.queue(prompt)
        assert r.status_code == 200, r.text
        pid = r.json()["prompt_id"]
        first = events.wait_for(lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == pid
                                and e["data"]["node"] in ("3", "4"))
        assert first["data"]["max"] == 64  # one progress bar over the batch, ticking per batch of images
        comfy_server.interrupt(pid)
        events.wait_for(lambda e: e["type"] in ("execution_interrupted", "execution_success")
                        and e["data"].get("prompt_id") == pid)
    entry = comfy_server.wait(pid)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert not entry.get("outputs", {}).get("5"), "the interrupted run still saved images"
    after = comfy_server.run(round_trip_prompt(empty_image(64, 64, batch=2, color=0x10A050)))
    assert len(saved_arrays(comfy_server, after)) == 2


# ------------------------------------------------- ComfyUI's Load Image (docs/COMFYUI_PACK.md)

def test_load_image_drops_alpha_and_join_image_with_alpha_brings_it_back(comfy_server, comfy_base):
    from PIL import Image

    rgba = np.zeros((96, 128, 4), np.uint8)  # transparent pixels store black, as most editors write them
    rgba[24:72, 32:96] = (20, 120, 220, 255)
    Image.fromarray(rgba, "RGBA").save(comfy_base / "input" / "alpha.png")
    over_white = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    Image.fromarray(over_white, "RGB").save(comfy_base / "input" / "alpha_over_white.png")

    def decoded(prompt):
        return saved_arrays(comfy_server, comfy_server.run(prompt))[0].astype(int)

    load = lambda name: {"class_type": "LoadImage", "inputs": {"image": name}}  # noqa: E731
    expected = decoded(round_trip_prompt(load("alpha_over_white.png")))
    dropped = decoded(round_trip_prompt(load("alpha.png")))  # Load Image's IMAGE: RGB, the background black
    joined = round_trip_prompt(load("alpha.png"))
    joined["6"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["2", 0], "alpha": ["2", 1]}}
    joined["3"]["inputs"]["image"] = ["6", 0]  # RGBA again: the pack composites it over white
    assert np.abs(decoded(joined) - expected).max() <= 2
    assert np.abs(dropped - expected).mean() > 10


def test_load_image_turns_a_16_bit_grey_png_white_and_an_8_bit_copy_loads(comfy_server, comfy_base):
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (32, 1))
    Image.fromarray(ramp).save(comfy_base / "input" / "grey16.png")
    assert Image.open(comfy_base / "input" / "grey16.png").mode == "I;16"
    # The conversion docs/COMFYUI_PACK.md gives.
    a = np.asarray(Image.open(comfy_base / "input" / "grey16.png"))
    Image.fromarray((a / 257).round().astype(np.uint8)).save(comfy_base / "input" / "grey8.png")

    def loaded(name):
        save = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": f"t/{unique()}"}}
        prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": name}}, "2": save}
        return saved_arrays(comfy_server, comfy_server.run(prompt))[0][..., 0].astype(int)

    assert (loaded("grey16.png") == 255).mean() > 0.9  # all but the darkest ~1/256 of the ramp
    assert np.abs(loaded("grey8.png") - (ramp / 257).round()).max() == 0
