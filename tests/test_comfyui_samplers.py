"""The T2I and Edit samplers in a real ComfyUI 0.3.75 server, with tiny real checkpoints written by
psvae_core (a 16-channel tiny VAE and a tiny FusionDiffuser on its 16x16 latent, with a word-level
tokenizer): outputs, seeds, live progress + previews, interrupt, the loader's VAE <-> generator
compatibility check, sources from another VAE, empty prompts, and widget bounds."""
from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from PIL import Image

from comfy_harness import (
    TINY_GENERATOR_FILES,
    assert_node_error,
    execution_error,
    saved_arrays,
    write_tiny_generator,
)

pytestmark = pytest.mark.comfyui

VAE = "psvae-dinov2b-96c.safetensors"  # tiny, 16 channels, 16x16 grid at 224 px
OTHER_VAE = "svae-dinov2b-96c.safetensors"  # tiny, also 16 channels, other weights and latent stats
RAE = "rae-dinov2b.safetensors"  # tiny, 64 channels
GEN = next(iter(TINY_GENERATOR_FILES))  # records VAE (fingerprint + latent stats)


def unique() -> str:
    return uuid.uuid4().hex[:8]


def loader(vae=VAE, generator=GEN, dtype="auto") -> dict:
    return {"class_type": "PSVAELoader", "inputs": {"vae_name": vae, "generator_name": generator, "dtype": dtype}}


def t2i(prompt="a red fox in the snow", seed=0, steps=6, cfg=6.5, shift=3.0, batch=1, **extra) -> dict:
    return {"class_type": "PSVAET2ISampler", "inputs": {
        "generator": ["1", 1], "vae": ["1", 0], "prompt": prompt, "seed": seed, "steps": steps, "cfg": cfg,
        "shift": shift, "batch": batch, **extra}}


def edit(instruction="make it a watercolour painting", seed=0, steps=6, source_image=None, source_latent=None,
         **extra) -> dict:
    inputs = {"generator": ["1", 1], "vae": ["1", 0], "instruction": instruction, "seed": seed, "steps": steps,
              "text_guidance": 5.0, "image_guidance": 1.5, "shift": 3.0, **extra}
    if source_image:
        inputs["source_image"] = source_image
    if source_latent:
        inputs["source_latent"] = source_latent
    return {"class_type": "PSVAEEditSampler", "inputs": inputs}


def decode_and_save(prompt: dict, latent_node: str = "2", vae_node: str = "1") -> dict:
    prompt["8"] = {"class_type": "PSVAEDecode", "inputs": {"latent": [latent_node, 0], "vae": [vae_node, 0]}}
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"s/{unique()}"}}
    return prompt


def t2i_prompt(**kw) -> dict:
    return decode_and_save({"1": loader(), "2": t2i(**kw)})


def example_image() -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": "example.png"}}


@pytest.fixture(scope="module")
def bad_generators(comfy_models, comfy_base) -> dict[str, str]:
    """Generator files that do not belong to VAE, in models/psvae."""
    folder = comfy_base / "models" / "psvae"
    vae, other = folder / VAE, folder / OTHER_VAE
    specs = {
        "channels": dict(vae_path=vae, latent_channels=8),
        "grid": dict(vae_path=vae, latent_size=(8, 8)),
        "stats": dict(vae_path=other),  # records the other VAE's latent stats and fingerprint
        "fingerprint": dict(vae_path=other, record=("fingerprint",)),
        "unrecorded": dict(vae_path=None),
        "no_tokenizer": dict(vae_path=vae, tokenizer=False),
    }
    names = {}
    for key, spec in specs.items():
        names[key] = f"gen-{key}.safetensors"
        write_tiny_generator(folder / names[key], seed=5, **spec)
    return names


# ------------------------------------------------------------------------------------------- T2I

def test_t2i_batch_gives_different_256px_images_with_progress_and_live_previews(comfy_server):
    with comfy_server.events() as events:
        entry = comfy_server.run(t2i_prompt(batch=2, steps=5, seed=11))
        pid = next(e["data"]["prompt_id"] for e in events.events if e["type"] == "execution_start")
        ticks = [e["data"] for e in events.events if e["type"] == "progress"
                 and e["data"].get("prompt_id") == pid and e["data"]["node"] == "2"]
        previews = list(events.binary)
    imgs = saved_arrays(comfy_server, entry)
    assert len(imgs) == 2 and all(i.shape == (256, 256, 3) and i.std() > 1.0 for i in imgs)
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).max() > 10, "rows of a batch share their noise"
    assert [t["value"] for t in ticks] == [1, 2, 3, 4, 5] and {t["max"] for t in ticks} == {5}, ticks
    jpegs = [data for kind, data in previews if kind == 1 and data[:4] == b"\x00\x00\x00\x01"]
    assert len(jpegs) >= 5, [(k, d[:8]) for k, d in previews]
    shown = np.asarray(Image.open(io.BytesIO(jpegs[-1][4:])).convert("RGB"))
    # Sent at latent resolution (16x16); the server scales it to --preview-size (512 by default).
    assert shown.shape[0] == shown.shape[1] >= 16 and shown.std() > 1.0, "the preview is blank"


def test_t2i_is_deterministic_per_seed_and_batch_rows_use_consecutive_seeds(comfy_server):
    pair = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(batch=2, seed=41)))
    (single,) = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(batch=1, seed=42)))
    assert np.abs(single.astype(int) - pair[1].astype(int)).max() <= 2, "seed 42 alone != row 1 of seed 41"
    same = t2i_prompt(batch=1, seed=41, prompt="a red fox  in the snow")  # same tokens, not a cache hit
    (again,) = saved_arrays(comfy_server, comfy_server.run(same))
    assert np.abs(again.astype(int) - pair[0].astype(int)).max() <= 2, "the same seed and prompt changed"
    (other,) = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(batch=1, seed=41, prompt="a blue house")))
    assert np.abs(other.astype(int) - pair[0].astype(int)).max() > 10, "the prompt is ignored"


def test_t2i_cfg_interval_and_bf16_run(comfy_server):
    prompt = t2i_prompt(seed=3, cfg_interval_start=0.2, cfg_interval_end=0.8)
    prompt["1"] = loader(dtype="bf16")
    (img,) = saved_arrays(comfy_server, comfy_server.run(prompt))
    assert img.shape == (256, 256, 3) and img.std() > 1.0
    backwards = t2i_prompt(seed=4, cfg_interval_start=0.8, cfg_interval_end=0.2)
    assert_node_error(comfy_server, backwards, "cfg_interval_start <= cfg_interval_end")


def images_of(server, entry: dict, node: str) -> list:
    """The images that SaveImage node `node` wrote, as uint8 arrays."""
    return [np.asarray(Image.open(io.BytesIO(server.view(img))).convert("RGB"))
            for img in entry["outputs"][node]["images"]]


def encode_example(prompt: dict, node: str = "4") -> dict:
    """Adds LoadImage "3" -> PS-VAE Encode `node`, and its own decode -> SaveImage "7" (the round trip)."""
    prompt["3"] = example_image()
    prompt[node] = {"class_type": "PSVAEEncode", "inputs": {"image": ["3", 0], "vae": ["1", 0],
                                                            "resize": "center crop"}}
    prompt["6"] = {"class_type": "PSVAEDecode", "inputs": {"latent": [node, 0], "vae": ["1", 0]}}
    prompt["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"s/{unique()}"}}
    return prompt


def far(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_t2i_negative_prompt_and_img2img(comfy_server):
    (plain,) = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(seed=21)))
    (blank,) = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(seed=21, negative_prompt="  ")))
    assert np.abs(blank.astype(int) - plain.astype(int)).max() <= 2, "an empty negative prompt changed the image"
    (neg,) = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(seed=21, negative_prompt="a blue house")))
    assert np.abs(neg.astype(int) - plain.astype(int)).max() > 10, "the negative prompt is ignored"
    # img2img from an encoded image: denoise 1 is plain T2I; a small denoise stays near the image.
    entry = comfy_server.run(encode_example(t2i_prompt(seed=21, init_latent=["4", 0], denoise=1.0)))
    (full,), (round_trip,) = images_of(comfy_server, entry, "9"), images_of(comfy_server, entry, "7")
    assert np.abs(full.astype(int) - plain.astype(int)).max() <= 2, "denoise 1 is not plain T2I"
    entry = comfy_server.run(encode_example(t2i_prompt(seed=21, init_latent=["4", 0], denoise=0.05)))
    (near,) = images_of(comfy_server, entry, "9")
    # (The tiny VAE's decoder spreads any latent change over the picture, so pixels only rank; the
    # latent-space bound is in test_comfyui_runtime.py and test_fusion.py.)
    assert far(near, round_trip) < far(plain, round_trip), (far(near, round_trip), far(plain, round_trip))
    assert_node_error(comfy_server, t2i_prompt(denoise=0.5), "needs an init_latent")


def test_interrupt_during_sampling_stops_it_and_the_next_prompt_runs(comfy_server):
    prompt = t2i_prompt(steps=1000, seed=77)
    with comfy_server.events() as events:
        r = comfy_server.queue(prompt)
        assert r.status_code == 200, r.text
        pid = r.json()["prompt_id"]
        first = events.wait_for(lambda e: e["type"] == "progress" and e["data"].get("prompt_id") == pid
                                and e["data"]["node"] == "2")
        assert first["data"]["max"] == 1000
        comfy_server.interrupt(pid)
        events.wait_for(lambda e: e["type"] in ("execution_interrupted", "execution_success")
                        and e["data"].get("prompt_id") == pid)
        done = [e["data"]["value"] for e in events.events if e["type"] == "progress" and e["data"]["node"] == "2"
                and e["data"].get("prompt_id") == pid]
    entry = comfy_server.wait(pid)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    assert max(done) < 1000, "sampling ran to the end"
    assert not entry.get("outputs", {}).get("9"), "the interrupted run still saved images"
    (img,) = saved_arrays(comfy_server, comfy_server.run(t2i_prompt(steps=3, seed=78)))
    assert img.shape == (256, 256, 3)


# ------------------------------------------------------------------------------------------ editing

def test_edit_from_an_image_or_its_latent_gives_the_same_edit(comfy_server):
    from_image = decode_and_save({"1": loader(), "3": example_image(), "2": edit(seed=5, source_image=["3", 0])})
    (a,) = saved_arrays(comfy_server, comfy_server.run(from_image))
    assert a.shape == (256, 256, 3) and a.std() > 1.0
    # PS-VAE Encode's default centre crop is the same square crop the sampler makes.
    from_latent = decode_and_save({
        "1": loader(), "3": example_image(),
        "4": {"class_type": "PSVAEEncode", "inputs": {"image": ["3", 0], "vae": ["1", 0], "resize": "center crop"}},
        "2": edit(seed=5, source_latent=["4", 0])})
    (b,) = saved_arrays(comfy_server, comfy_server.run(from_latent))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    other = decode_and_save({"1": loader(), "3": example_image(),
                             "2": edit(seed=5, source_image=["3", 0], instruction="make it night")})
    (c,) = saved_arrays(comfy_server, comfy_server.run(other))
    assert np.abs(a.astype(int) - c.astype(int)).max() > 10, "the instruction is ignored"


def test_edit_negative_instruction_and_init_latent(comfy_server):
    def base(**extra) -> dict:
        return encode_example(decode_and_save({"1": loader(), "2": edit(seed=5, source_latent=["4", 0], **extra)}))

    entry = comfy_server.run(base())
    (plain,), (source,) = images_of(comfy_server, entry, "9"), images_of(comfy_server, entry, "7")
    (blank,) = images_of(comfy_server, comfy_server.run(base(negative_instruction="")), "9")
    assert np.abs(blank.astype(int) - plain.astype(int)).max() <= 2
    (neg,) = images_of(comfy_server, comfy_server.run(base(negative_instruction="make it night")), "9")
    assert np.abs(neg.astype(int) - plain.astype(int)).max() > 10, "the negative instruction is ignored"
    # Starting the target from the source itself at a small denoise changes little.
    (near,) = images_of(comfy_server, comfy_server.run(base(init_latent=["4", 0], denoise=0.05)), "9")
    assert far(near, source) < far(plain, source), (far(near, source), far(plain, source))


def test_edit_needs_exactly_one_source(comfy_server):
    assert_node_error(comfy_server, decode_and_save({"1": loader(), "2": edit()}), "no source", "source_image")
    both = decode_and_save({
        "1": loader(), "3": example_image(),
        "4": {"class_type": "PSVAEEncode", "inputs": {"image": ["3", 0], "vae": ["1", 0], "resize": "center crop"}},
        "2": edit(source_image=["3", 0], source_latent=["4", 0])})
    assert_node_error(comfy_server, both, "both source_image and source_latent")


@pytest.mark.parametrize("encoder_vae,needles", [
    (OTHER_VAE, ("made with the VAE " + OTHER_VAE, "another VAE")),
    (RAE, ("64 channels", "takes 16")),
], ids=["same-channels-other-vae", "other-channels"])
def test_edit_refuses_a_latent_from_another_vae(comfy_server, encoder_vae, needles):
    prompt = decode_and_save({
        "1": loader(), "3": example_image(), "5": loader(vae=encoder_vae, generator="none"),
        "4": {"class_type": "PSVAEEncode", "inputs": {"image": ["3", 0], "vae": ["5", 0], "resize": "center crop"}},
        "2": edit(source_latent=["4", 0])})
    text = assert_node_error(comfy_server, prompt, *needles)
    assert "PS-VAE Edit Sampler" in text


# -------------------------------------------------------------------------------- compatibility

@pytest.mark.parametrize("key,needles", [
    ("channels", ("8-channel latents", "16-channel latents")),
    ("grid", ("8x8 latents", "224 px", "16x16 latent grid")),
    ("stats", ("latent statistics", "trained with " + OTHER_VAE)),
    ("fingerprint", ("another VAE file", "fingerprint", OTHER_VAE)),
    ("no_tokenizer", ("no tokenizer",)),
])
def test_loader_refuses_a_generator_that_does_not_belong_to_the_vae(comfy_server, bad_generators, key, needles):
    prompt = t2i_prompt()
    prompt["1"] = loader(generator=bad_generators[key])
    text = assert_node_error(comfy_server, prompt, *needles)
    assert "PS-VAE Loader" in text


def test_a_generator_that_records_no_vae_is_checked_by_channels_and_grid_only(comfy_server, bad_generators):
    prompt = t2i_prompt(steps=2)
    prompt["1"] = loader(vae=OTHER_VAE, generator=bad_generators["unrecorded"])
    (img,) = saved_arrays(comfy_server, comfy_server.run(prompt))
    assert img.shape == (256, 256, 3)
    assert "records no training VAE" in comfy_server.log_text()


def test_sampler_rechecks_a_vae_from_another_loader(comfy_server):
    prompt = t2i_prompt()
    prompt["5"] = loader(vae=OTHER_VAE, generator="none")
    prompt["2"]["inputs"]["vae"] = ["5", 0]
    text = assert_node_error(comfy_server, prompt, "do not belong together", "latent statistics")
    assert "PS-VAE T2I Sampler" in text
    prompt["5"] = loader(vae=RAE, generator="none")
    assert_node_error(comfy_server, prompt, "64-channel latents")


def test_a_loader_without_generator_gives_a_sampler_error(comfy_server):
    prompt = t2i_prompt()
    prompt["1"] = loader(generator="none")
    assert_node_error(comfy_server, prompt, "generator_name is 'none'")


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("text", ["", "   \n\t"], ids=["empty", "whitespace"])
def test_empty_prompt_or_instruction_is_a_node_error(comfy_server, text):
    r = comfy_server.queue(t2i_prompt(prompt=text))
    assert r.status_code == 400, r.text
    errors = r.json()["node_errors"]["2"]["errors"]
    assert errors[0]["type"] == "custom_validation_failed" and "prompt is empty" in errors[0]["details"], errors
    r = comfy_server.queue(decode_and_save({"1": loader(), "3": example_image(),
                                            "2": edit(instruction=text, source_image=["3", 0])}))
    assert r.status_code == 400 and "instruction is empty" in r.text, r.text
    assert "write what to change in the source image" in r.text and "should show" not in r.text, r.text


def test_absurd_steps_and_batch_are_refused_by_the_widget_bounds(comfy_server):
    for inputs, kind in [({"steps": 0}, "value_smaller_than_min"), ({"steps": 100000}, "value_bigger_than_max"),
                         ({"batch": 0}, "value_smaller_than_min"), ({"batch": 1000}, "value_bigger_than_max"),
                         ({"seed": -1}, "value_smaller_than_min")]:
        r = comfy_server.queue(t2i_prompt(**inputs))
        assert r.status_code == 400, (inputs, r.text)
        assert kind in r.text, (inputs, r.text)
    # ... and the server still samples.
    entry = comfy_server.run(t2i_prompt(steps=2, seed=99))
    assert execution_error(entry) is None
