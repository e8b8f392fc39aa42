"""nodes/runtime.py, handles.py and latents.py inside a real ComfyUI process, without HTTP:
out-of-memory fallbacks (smaller batches, then tiled decoding), progress ticks, interrupt, dtype
choice, the resize rule.

The checks run in a child python (ComfyUI's modules are imported there, as ComfyUI itself would,
so this pytest process stays clean): `python tests/test_comfyui_runtime.py --inside-comfyui`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.comfyui
def test_runtime_inside_comfyui(tmp_path):
    from comfy_harness import COMFY_DIR, COMFY_PYTHON, harness_missing

    missing = harness_missing()
    if missing:
        pytest.skip(missing)
    env = dict(os.environ, PSVAE_TMP=str(tmp_path), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # as the test server (comfy_harness.ComfyServer.start)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(COMFY_PYTHON), __file__, "--inside-comfyui"], cwd=COMFY_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "ALL CHECKS PASSED" in proc.stdout


# ------------------------------------------------------------------------ runs inside ComfyUI

def _expect_interrupt(work) -> None:  # pragma: no cover - executed in the child process
    """work() must stop with ComfyUI's interrupt; the interrupt flag is cleared afterwards either way."""
    import comfy.model_management as mm

    try:
        work()
    except mm.InterruptProcessingException:
        pass
    else:
        raise AssertionError("interrupt was not honoured")
    finally:
        mm.interrupt_current_processing(False)


def _inside_comfyui() -> None:  # pragma: no cover - executed in the child process
    import importlib.util

    sys.path.insert(0, os.getcwd())
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    import comfy.model_management as mm
    import comfy.utils

    spec = importlib.util.spec_from_file_location("psvae_pack", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["psvae_pack"] = pack
    spec.loader.exec_module(pack)
    from psvae_pack.nodes import handles, runtime
    from psvae_pack.psvae_core.autoencoder import PSVAE
    from psvae_pack.psvae_core.config import PRESETS

    ticks = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    handle = handles.PSVAEHandle(PSVAE(PRESETS["tiny"]), "tiny.safetensors", torch.float32, cpu, cpu)
    z = torch.randn(4, handle.latent_channels, 16, 16)
    full = runtime.decode_latents(handle, {"samples": z})
    assert full.shape == (4, 256, 256, 3) and full.dtype == torch.float32 and full.device == mm.intermediate_device()
    assert 0 <= full.min() and full.max() <= 1 and full.std() > 0
    assert ticks and ticks[-1] == (4, 4), ticks
    print("plain decode ok")

    real_decode = handle.model.decode
    calls = []

    def oom_when(pred):
        def decode(latents):
            calls.append(tuple(latents.shape))
            if pred(latents):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real_decode(latents)
        return decode

    # 1. batches of more than one image run out of memory -> one image at a time, same result.
    handle.model.decode = oom_when(lambda x: x.shape[0] > 1)
    ticks.clear()
    halved = runtime.decode_latents(handle, {"samples": z})
    assert torch.allclose(halved, full, atol=1e-5), (halved - full).abs().max()
    assert [c[0] for c in calls][-4:] == [1, 1, 1, 1], calls
    assert ticks[-1] == (4, 4) and len(ticks) == 4, ticks
    print("batch halving ok", calls)

    # 2. even one whole image runs out of memory -> overlapping tiles, blended without seams.
    calls.clear()
    handle.model.decode = oom_when(lambda x: x.shape[-1] * x.shape[-2] > 64)
    tiled = runtime.decode_latents(handle, {"samples": z[:1]})
    assert tiled.shape == (1, 256, 256, 3) and torch.isfinite(tiled).all()
    assert any(c[-1] == 8 for c in calls), calls
    corr = torch.corrcoef(torch.stack([tiled.flatten(), full[:1].flatten()]))[0, 1]
    # GroupNorm and attention see one tile at a time, so tiles are not bit-equal to the full decode
    # (as with ComfyUI's own tiled VAE decode); seams are covered exactly by check 3.
    assert corr > 0.5, f"tiled decode differs too much from the full decode (correlation {corr:.3f})"
    print(f"tiled fallback ok (correlation with the full decode {corr:.3f})")

    # 3. tiling itself, with an exact (pointwise) decoder: tiles + blend reproduce it exactly.
    pointwise = lambda t: t[:, :3].repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    x = torch.randn(2, 5, 13, 10)
    assert torch.allclose(runtime.decode_tiled(pointwise, x, 4, tile=4, overlap=1), pointwise(x), atol=1e-6)
    print("tile blending exact")

    # 4. nothing fits -> a clear MemoryError, not a crash.
    handle.model.decode = oom_when(lambda x: True)
    try:
        runtime.decode_latents(handle, {"samples": z[:1]})
    except MemoryError as err:
        assert "even with tiled decoding" in str(err)
    else:
        raise AssertionError("expected MemoryError")
    handle.model.decode = real_decode
    # ... and a non-memory error is not swallowed.
    handle.model.decode = lambda latents: (_ for _ in ()).throw(RuntimeError("shape mismatch"))
    try:
        runtime.decode_latents(handle, {"samples": z[:1]})
    except RuntimeError as err:
        assert "shape mismatch" in str(err)
    handle.model.decode = real_decode
    print("oom errors ok")

    # 5. encode: batches, and OOM -> smaller batches with the same latents.
    images = torch.rand(3, 120, 200, 3)
    lat = runtime.encode_images(handle, images, "center crop")
    assert lat.shape == (3, handle.latent_channels, 16, 16) and lat.dtype == torch.float32
    real_encode = handle.model.encode

    def enc(x):
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("out of memory")
        return real_encode(x)

    handle.model.encode = enc
    assert torch.allclose(runtime.encode_images(handle, images, "center crop"), lat, atol=1e-5)
    handle.model.encode = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory"))
    try:
        runtime.encode_images(handle, images, "center crop")
    except MemoryError as err:
        assert "PS-VAE Encode: out of memory on a single image" in str(err), err
    else:
        raise AssertionError("expected MemoryError")
    handle.model.encode = real_encode
    crop = runtime.crop_to_aspect(torch.zeros(1, 3, 120, 200), (16, 16))
    assert crop.shape[-2:] == (120, 120)
    assert runtime.crop_to_aspect(torch.zeros(1, 3, 300, 100), (16, 16)).shape[-2:] == (100, 100)
    stretched = runtime.encode_images(handle, images, "stretch")
    assert not torch.allclose(stretched, lat)
    print("encode ok")

    # 6. interrupt between batches.
    mm.interrupt_current_processing(True)
    _expect_interrupt(lambda: runtime.decode_latents(handle, {"samples": z}))
    print("interrupt ok")

    # 7. dtypes: auto on the CPU = fp32; fp16 never on the CPU; bf16 runs and returns float32 images.
    assert handles.choose_dtype("auto", cpu, lambda: mm.vae_dtype(cpu, [torch.bfloat16, torch.float32])) == torch.float32
    assert handles.choose_dtype("fp16", cpu, lambda: None) == torch.float32
    assert handles.choose_dtype("bf16", cpu, lambda: None) == torch.bfloat16
    bf = handles.PSVAEHandle(PSVAE(PRESETS["tiny"]), "bf16", torch.bfloat16, cpu, cpu)
    assert bf.model.latents_mean.dtype == torch.float32
    out = runtime.decode_latents(bf, {"samples": z[:1]})
    assert out.dtype == torch.float32 and out.shape == (1, 256, 256, 3)
    print("dtypes ok")
    _sampler_checks()
    print("ALL CHECKS PASSED")


def _sampler_checks() -> None:  # pragma: no cover - executed in the child process
    """nodes/sampling.py and nodes/generator.py without HTTP: previews through the progress hook,
    seeds, interrupt between steps, the compatibility rules (incl. a native-grid VAE), provenance
    layouts, dtypes."""
    import torch

    import comfy.model_management as mm
    import comfy.utils
    from psvae_pack.nodes import generator as gen_mod
    from psvae_pack.nodes import handles, runtime, sampling
    from psvae_pack.psvae_core import generation, provenance
    from psvae_pack.psvae_core.autoencoder import PSVAE
    from psvae_pack.psvae_core.config import PRESETS
    from psvae_pack.psvae_core.fusion import PRESETS as GEN_PRESETS
    from psvae_pack.psvae_core.fusion import FusionDiffuser

    sys.path.insert(0, str(REPO / "tests"))
    from comfy_harness import tiny_tokenizer

    cpu = torch.device("cpu")
    torch.manual_seed(0)
    vae_model = PSVAE(PRESETS["tiny"])
    vae_model.set_latent_stats(torch.randn(16) * 0.2, torch.rand(16) + 0.5)
    vae = handles.PSVAEHandle(vae_model, "tiny-vae", torch.float32, cpu, cpu)
    model = FusionDiffuser(GEN_PRESETS["tiny"].replace(latent_channels=16, latent_size=(16, 16)),
                           tokenizer=tiny_tokenizer())
    gen = gen_mod.GeneratorHandle(model, "tiny-gen", torch.float32, cpu, cpu, {})
    assert gen_mod.pair_problems(gen, vae) == []

    # 1. progress ticks carry JPEG previews of the current estimate; previews follow the VAE's map.
    ticks = []
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: ticks.append((value, total, preview)))
    settings = sampling.Settings(seed=7, steps=4, shift=3.0, guidance=6.5)
    out = sampling.run(gen, vae, "a red fox", "prompt", settings, 2, None, "T2I")
    assert out["samples"].shape == (2, 16, 16, 16) and out["samples"].dtype == torch.float32
    assert [t[:2] for t in ticks] == [(1, 4), (2, 4), (3, 4), (4, 4)], [t[:2] for t in ticks]
    kind, image, size = ticks[-1][2]
    assert kind == "JPEG" and image.size == (16, 16) and size > 0
    print("t2i progress + previews ok")

    # 2. raw latents = denormalised generator output; row i = seed + i.
    alone = sampling.run(gen, vae, "a red fox", "prompt", sampling.Settings(8, 4, 3.0, 6.5), 1, None, "T2I")
    assert torch.allclose(alone["samples"][0], out["samples"][1], atol=1e-4), "row 1 of seed 7 != seed 8 alone"
    assert torch.allclose(vae.normalize(vae.denormalize(out["samples"])), out["samples"], atol=1e-5)
    ids, mask = sampling.tokenize(gen, "a red fox", "prompt", "T2I")
    library = generation.generate(gen.model, (ids, mask), seed=7, batch_size=2, steps=4, shift=3.0, guidance=6.5)
    assert torch.allclose(out["samples"], vae.denormalize(library), atol=1e-6), "the node and the library differ"
    print("seeds ok")
    for text, needle in (("a " * 600, "600 tokens long"), ("  ", "prompt is empty")):
        try:
            sampling.tokenize(gen, text, "prompt", "T2I")
        except ValueError as err:
            assert needle in str(err), err
        else:
            raise AssertionError(f"{text[:10]!r}... was accepted")

    # 3. interrupt between steps.
    ticks.clear()
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: (
        ticks.append(value), mm.interrupt_current_processing(True) if value == 2 else None))
    _expect_interrupt(lambda: sampling.run(gen, vae, "a red fox", "prompt", sampling.Settings(1, 50, 3.0, 6.5), 1,
                                           None, "T2I"))
    assert ticks == [1, 2], ticks
    comfy.utils.set_progress_bar_global_hook(None)
    print("interrupt ok")

    # 4. editing: an image source is cropped square and encoded; a native-grid VAE is resized to the grid.
    image = torch.rand(1, 120, 200, 3)
    src = sampling.source_latents(gen, vae, image, None, "Edit")
    assert src.shape == (1, 16, 16, 16)
    enc = PRESETS["tiny"].encoder.replace(image_size=None)
    native = handles.PSVAEHandle(PSVAE(PRESETS["tiny"].replace(encoder=enc)), "native", torch.float32, cpu, cpu)
    assert native.fixed_grid is None and gen_mod.pair_problems(gen, native) == []
    assert sampling.source_latents(gen, native, image, None, "Edit").shape == (1, 16, 16, 16)
    small = FusionDiffuser(GEN_PRESETS["tiny"].replace(latent_channels=16, latent_size=(8, 8)),
                           tokenizer=tiny_tokenizer())
    small = gen_mod.GeneratorHandle(small, "small", torch.float32, cpu, cpu, {})
    assert gen_mod.pair_problems(small, native) == [] and "224 px" in gen_mod.pair_problems(small, vae)[0]
    assert sampling.source_latents(small, native, image, None, "Edit").shape == (1, 16, 8, 8)
    edit = sampling.run(gen, vae, "make it red", "instruction",
                        sampling.Settings(1, 3, 3.0, 5.0, image_guidance=1.5), 1, src, "Edit")
    assert edit["samples"].shape == (1, 16, 16, 16) and torch.isfinite(edit["samples"]).all()
    print("edit sources ok")

    # 5. provenance layouts the compatibility check reads; stats stored in bf16 still match.
    mean, std = vae.latent_stats
    stats = {"mean": mean.tolist(), "std": std.tolist()}
    assert provenance.recorded_vae({"vae": {"file": "v", "fingerprint": "ab", "latent_stats": stats}}) == \
        provenance.VAERecord("v", "ab", stats)
    assert provenance.recorded_vae({"data": {"vae_fingerprint": "cd"}}).fingerprint == "cd"
    assert provenance.recorded_vae({"vae_fingerprint": "ef", "vae_latent_stats": stats}).latent_stats == stats
    assert provenance.recorded_vae({"vae": {"latent_stats": {"mean": 1}}}).latent_stats is None
    assert provenance.recorded_vae("junk") == provenance.VAERecord() and provenance.VAERecord().empty
    bf16_stats = {k: torch.tensor(v).bfloat16().float().tolist() for k, v in stats.items()}
    close = gen_mod.GeneratorHandle(model, "g", torch.float32, cpu, cpu, {"vae": {"latent_stats": stats}})
    assert gen_mod.pair_problems(close, vae) == []
    shifted = {"mean": (mean + 0.05).tolist(), "std": std.tolist()}
    far = gen_mod.GeneratorHandle(model, "g", torch.float32, cpu, cpu, {"vae": {"file": "x", "latent_stats": shifted}})
    assert "latent statistics" in gen_mod.pair_problems(far, vae)[0]
    assert provenance.stats_differ(bf16_stats, *vae.latent_stats) is None
    # psvae_core.provenance's rule, as the trainer applies it: the same stats under another
    # fingerprint is a re-export (accepted); a fingerprint alone must match.
    vae._fingerprint = "a" * 64  # as if loaded from a file
    reexport = gen_mod.GeneratorHandle(model, "g", torch.float32, cpu, cpu,
                                       {"vae": {"fingerprint": "b" * 64, "latent_stats": stats}})
    assert gen_mod.pair_problems(reexport, vae) == []
    by_file = gen_mod.GeneratorHandle(model, "g", torch.float32, cpu, cpu, {"vae_fingerprint": "b" * 64})
    assert "another VAE file" in gen_mod.pair_problems(by_file, vae)[0]
    vae._fingerprint = None
    print("provenance ok")

    # 6. dtypes: auto on the CPU = fp32; bf16 samples and returns float32 raw latents.
    assert gen_mod.auto_dtype(cpu) == torch.float32
    bf = gen_mod.GeneratorHandle(FusionDiffuser(GEN_PRESETS["tiny"].replace(latent_channels=16, latent_size=(16, 16)),
                                                tokenizer=tiny_tokenizer()), "bf", torch.bfloat16, cpu, cpu, {})
    lat = sampling.run(bf, vae, "a cat", "prompt", sampling.Settings(0, 2, 3.0, 1.0), 1, None, "T2I")["samples"]
    assert lat.dtype == torch.float32 and torch.isfinite(lat).all()
    # The Euler state stays float32 under bf16 weights: the library's float32 path, to float rounding.
    ids, mask = sampling.tokenize(bf, "a cat", "prompt", "T2I")
    library = vae.denormalize(generation.generate(bf.model, (ids, mask), seed=0, steps=2, shift=3.0, guidance=1.0))
    assert torch.allclose(lat, library, atol=1e-6), f"bf16 node state: {(lat - library).abs().max()}"
    assert gen.memory_required(4, 20, 512, 3) > gen.memory_required(1, 20, 256, 2) > 0
    print("generator dtypes ok")

    # 7. negative prompt and img2img through sampling.sample (the nodes' one entry), against the library.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # fill the zero-initialised head, which would otherwise hide every condition
        for p in gen.model.head.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)

    def node(text="a red fox", what="prompt", s=sampling.Settings(7, 3, 3.0, 6.5), **kw):
        return sampling.sample("T2I", gen, vae, text, what, s, **kw)["samples"]

    plain = node(batch=2)
    assert torch.equal(node(batch=2, negative=" \n"), plain), "a blank negative prompt changed the result"
    neg = node(batch=2, negative="a blue house")
    ids, mask = sampling.tokenize(gen, "a red fox", "prompt", "T2I")
    library = generation.generate(gen.model, (ids, mask), seed=7, batch_size=2, steps=3, shift=3.0, guidance=6.5,
                                  negative=sampling.tokenize(gen, "a blue house", "prompt", "T2I"))
    assert torch.allclose(neg, vae.denormalize(library), atol=1e-6) and (neg - plain).abs().max() > 1e-3
    init = {"samples": plain[:1].clone()}
    one = sampling.Settings(7, 3, 3.0, 6.5, denoise=1.0)
    assert torch.equal(node(s=one, batch=2, init_latent=init), plain), "denoise 1 is not plain sampling"
    near = node(s=sampling.Settings(7, 3, 3.0, 6.5, denoise=0.05), batch=2, init_latent=init)
    assert (near - init["samples"]).abs().mean() < 0.25 * (plain[1:] - init["samples"]).abs().mean()
    pair = {"samples": plain.clone()}
    assert node(s=one, init_latent=pair).shape[0] == 2  # batch 1 + two init latents: one image per latent
    for kw, needle in ((dict(s=sampling.Settings(7, 3, 3.0, 6.5, denoise=0.5)), "needs an init_latent"),
                       (dict(s=one, batch=3, init_latent=pair), "set batch to 1"),
                       (dict(s=one, init_latent={"samples": plain[:, :, :8]}), "a 16x8 latent"),
                       (dict(text=" ", what="instruction"), "write what to change in the source image")):
        try:
            node(**kw)
        except ValueError as err:
            assert needle in str(err), err
        else:
            raise AssertionError(f"{kw} was accepted")
    edit_neg = sampling.sample("Edit", gen, vae, "make it red", "instruction", sampling.Settings(1, 3, 3.0, 5.0, 1.5),
                               negative="make it blue", sources=(None, {"samples": plain[:1]}))["samples"]
    assert edit_neg.shape == (1, 16, 16, 16) and torch.isfinite(edit_neg).all()
    print("negative prompt + img2img ok")


if __name__ == "__main__" and "--inside-comfyui" in sys.argv:
    _inside_comfyui()
