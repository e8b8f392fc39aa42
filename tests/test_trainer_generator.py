"""The generator stages `t2i` and `edit` (trainer/generator_stages.py) end to end through the CLI, on a
tiny PS-VAE export and the `tiny` generator preset: learning, export + provenance, exact resume, the
latent cache (same loss as on-the-fly encoding, reused), tar shards through the cache, editing with
independent text/image dropout, and the VAE/generator mismatch errors (exit 2)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from psvae_core import generation
from test_trainer_helpers import ROOT, cli, max_diff, metrics, torchrun, weights
from tiny_models import one_thread  # noqa: F401  (an autouse fixture)

T2I_TINY = ROOT / "trainer" / "configs" / "t2i_tiny.yaml"
EDIT_TINY = ROOT / "trainer" / "configs" / "edit_tiny.yaml"
STEPS = 40


def _tiny_vae(path: Path, seed: int, images: torch.Tensor | None = None) -> Path:
    """The `tiny` PS-VAE at a 112-px encoder input (16 x 8 x 8 latent, 128-px output), with latent
    stats measured on `images` (random weights: this tests plumbing, not quality)."""
    from psvae_core.autoencoder import PSVAE
    from psvae_core.config import PRESETS

    cfg = PRESETS["tiny"]
    torch.manual_seed(seed)
    vae = PSVAE(cfg.replace(encoder=cfg.encoder.replace(image_size=112))).eval()
    if images is not None:
        with torch.no_grad():
            z = vae.encode(images).mode()
        vae.set_latent_stats(z.mean((0, 2, 3)), z.std((0, 2, 3)))
    vae.save(path, provenance={"written_by": "tests/test_trainer_generator.py"})
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """photos/ (12 photos + captions), edits/ (source, flipped target, "flip" instruction), vae."""
    from PIL import Image, ImageOps

    from test_trainer_helpers import write_sample_photos
    from trainer.data import load_image

    root = tmp_path_factory.mktemp("generator")
    paths = write_sample_photos(root / "photos", 128)
    for p in paths:
        p.with_suffix(".txt").write_text(f"a photo of {p.stem.replace('_', ' ')}")
    edits = root / "edits"
    for sub in ("source", "target", "instruction"):
        (edits / sub).mkdir(parents=True)
    for p in paths:
        image = Image.open(p)
        image.save(edits / "source" / p.name)
        ImageOps.mirror(image).save(edits / "target" / p.name)
        (edits / "instruction" / f"{p.stem}.txt").write_text("flip it horizontally")
    images = torch.stack([load_image(p, 128) for p in paths])
    vae = _tiny_vae(root / "vae.safetensors", 0, images)
    return {"root": root, "photos": root / "photos", "edits": edits, "vae": vae}


def _t2i(assets, name, *extra, out=None):
    return cli("t2i", "--config", T2I_TINY, f"model.vae={assets['vae']}", f"data.source={assets['photos']}",
               f"run.output_dir={out or assets['root'] / 'runs'}", f"run.name={name}", "log.every=1", *extra)


def _losses(run_dir: Path) -> list[float]:
    return [row["generator/flow"] for row in metrics(run_dir)]


def _provenance(path: Path) -> dict:
    from psvae_core.checkpoint import read_metadata

    return json.loads(read_metadata(path)["provenance"])


def _pack_fingerprint(path: Path) -> str:
    """The VAE fingerprint the ComfyUI pack reads (psvae_core.checkpoint.fingerprint)."""
    from psvae_core.checkpoint import fingerprint

    return fingerprint(path)


@pytest.fixture(scope="module")
def t2i_run(assets):
    run = _t2i(assets, "t2i", f"train.max_steps={STEPS}", "checkpoint.every=0", "log.images_every=20",
               "data.val_count=2")
    assert run.returncode == 0, run.stderr[-4000:]
    return assets["root"] / "runs" / "t2i"


# ------------------------------------------------------------------------------------------ t2i
def test_t2i_learns_and_exports_a_generator_that_records_its_vae(assets, t2i_run):
    from psvae_core.autoencoder import PSVAE
    from psvae_core.checkpoint import read_metadata
    from psvae_core.fusion import FusionDiffuser
    from trainer.data import vae_fingerprint

    losses = _losses(t2i_run)
    assert len(losses) == STEPS
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.9 * first, f"flow loss did not go down: {first:.3f} -> {last:.3f}"
    assert (t2i_run / "samples" / "step_00000020.png").is_file()  # previews of preview.prompts
    assert metrics(t2i_run, "val")  # held-out flow loss at the end

    path = t2i_run / "export" / "generator.safetensors"
    gen = FusionDiffuser.from_file(path)
    vae = PSVAE.from_file(assets["vae"])
    assert (gen.config.latent_channels, tuple(gen.config.latent_size)) == (16, (8, 8))
    z = generation.generate(gen, ["a photo of coffee"], steps=3, guidance=3.0, seed=1)  # its own (byte) tokenizer
    assert z.shape == (1, 16, 8, 8) and torch.isfinite(z).all()
    with torch.no_grad():
        image = vae.decode(vae.denormalize_latents(z))
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()

    prov = _provenance(path)
    fingerprint = vae_fingerprint(assets["vae"])
    assert prov["stage"] == "t2i" and prov["task"] == "t2i" and prov["ema"] is True and prov["step"] == STEPS
    assert prov["vae_fingerprint"] == prov["vae"]["fingerprint"] == fingerprint == _pack_fingerprint(assets["vae"])
    assert prov["vae_sha256"] == hashlib.sha256(assets["vae"].read_bytes()).hexdigest()
    assert prov["vae_latent_channels"] == prov["vae"]["latent_channels"] == 16
    assert prov["vae_latent_grid"] == [8, 8] and prov["vae"]["file"] == "vae.safetensors"
    assert prov["vae"]["latent_stats"] == json.loads(read_metadata(assets["vae"])["latent_stats"])
    assert prov["cfg_dropout"] == {"text": 0.1} and prov["train_shift"] == pytest.approx(1.0)
    assert prov["data"]["samples"] == 10 and prov["data"]["vae_fingerprint"] == fingerprint


def test_t2i_resume_is_exact(assets, tmp_path):
    common = ["checkpoint.every=3", "checkpoint.keep_last=0", "loss.text_dropout=0.3"]
    ref = _t2i(assets, "ref", "train.max_steps=6", *common, out=tmp_path)
    assert ref.returncode == 0, ref.stderr[-4000:]
    part = _t2i(assets, "split", "train.max_steps=3", *common, out=tmp_path)
    assert part.returncode == 0, part.stderr[-4000:]
    rest = _t2i(assets, "split", "train.max_steps=6", "checkpoint.resume=latest", *common, out=tmp_path)
    assert rest.returncode == 0, rest.stderr[-4000:]
    assert "resumed from" in rest.stdout + rest.stderr
    final = "checkpoints/step_00000006"
    for name in ("generator.safetensors", "generator.ema.safetensors"):
        diff = max_diff(weights(tmp_path / "ref" / final, name), weights(tmp_path / "split" / final, name))
        assert diff <= 1e-6, f"{name}: resumed run differs by {diff:.2e}"
    assert _losses(tmp_path / "ref")[3:] == pytest.approx(_losses(tmp_path / "split")[3:], abs=1e-6)


def test_latent_cache_gives_the_on_the_fly_loss_and_is_reused(assets, t2i_run, tmp_path):
    on_the_fly = _losses(t2i_run)[0]  # same seed, data and model: only where the latents come from differs
    cache = tmp_path / "cache"
    runs = []
    for name, dtype in (("fill", "float32"), ("reuse", "float32"), ("half", "float16")):
        run = _t2i(assets, name, "train.max_steps=1", f"data.latent_cache={cache}", f"data.latent_cache_dtype={dtype}",
                   "data.val_count=2", out=tmp_path)
        assert run.returncode == 0, run.stderr[-4000:]
        runs.append(json.loads((tmp_path / name / "data_report.json").read_text())["train_cache"])
    fill, reuse, half = runs
    assert (fill["encoded"], fill["cached"]) == (12, 0)
    assert (reuse["encoded"], reuse["cached"]) == (0, 12) and reuse["folder"] == fill["folder"]
    assert half["folder"] != fill["folder"] and half["encoded"] == 12  # another storage dtype: another cache
    assert _losses(tmp_path / "fill")[0] == pytest.approx(on_the_fly, abs=1e-5)
    assert _losses(tmp_path / "reuse")[0] == pytest.approx(on_the_fly, abs=1e-5)
    assert _losses(tmp_path / "half")[0] == pytest.approx(on_the_fly, rel=1e-2)


def test_tar_shards_train_through_the_latent_cache(assets, tmp_path, capsys):
    photos = sorted(assets["photos"].glob("*.png"))
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s}.tar", "w") as tar:
            for p in photos[s::2]:
                members = ((f"{p.stem}.png", p.read_bytes()), (f"{p.stem}.txt", p.with_suffix(".txt").read_bytes()))
                for member, data in members:
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shards = f"data.source={tmp_path}/shard-{{0..1}}.tar"
    code, err = _main(capsys, "t2i", "--config", T2I_TINY, f"model.vae={assets['vae']}", shards,
                      f"run.output_dir={tmp_path}", "run.name=nocache")
    assert code == 2 and "data.latent_cache=DIR" in err  # streamed shards need the cache
    for name in ("first", "second"):
        run = _t2i(assets, name, shards, "train.max_steps=2", f"data.latent_cache={tmp_path / 'cache'}", out=tmp_path)
        assert run.returncode == 0, run.stderr[-4000:]
    first = json.loads((tmp_path / "first" / "data_report.json").read_text())
    second = json.loads((tmp_path / "second" / "data_report.json").read_text())
    assert first["train_cache"]["encoded"] == 12 and first["train_cached"]["used"] == 12
    assert second["train_cache"]["encoded"] == 0 and second["train_cached"]["used"] == 12  # table + latents reused
    assert _losses(tmp_path / "first") == pytest.approx(_losses(tmp_path / "second"), abs=1e-6)


# ------------------------------------------------------------------------------------------ edit
def test_edit_trains_on_triplets_with_independent_text_and_image_dropout(assets, t2i_run, tmp_path):
    from psvae_core.fusion import FusionDiffuser
    from trainer.generator_stages import cfg_dropout_masks

    steps, batch, p_text, p_image = 20, 4, 0.5, 0.3
    run = cli("edit", "--config", EDIT_TINY, f"model.vae={assets['vae']}", f"data.source={assets['edits']}",
              f"model.init_from={t2i_run / 'export' / 'generator.safetensors'}", f"run.output_dir={tmp_path}",
              "run.name=edit", f"train.max_steps={steps}", f"train.batch_size={batch}", "log.every=1",
              f"loss.text_dropout={p_text}", f"loss.image_dropout={p_image}", "log.images_every=10",
              "data.val_count=4")
    assert run.returncode == 0, run.stderr[-4000:]
    rows = metrics(tmp_path / "edit")
    assert len(rows) == steps and all(r["cfg/samples"] == batch for r in rows)
    totals = {k: 0 for k in ("text", "image", "both")}
    for row in rows:  # the masks the stage used are the counter-derived ones, drawn independently
        keep_text, keep_image = cfg_dropout_masks(0, row["step"] - 1, batch, p_text, p_image)
        assert row["cfg/text_dropped"] == int((~keep_text).sum())
        assert row["cfg/image_dropped"] == int((~keep_image).sum())
        assert row["cfg/both_dropped"] == int((~keep_text & ~keep_image).sum())
        totals["text"] += row["cfg/text_dropped"]
        totals["image"] += row["cfg/image_dropped"]
        totals["both"] += row["cfg/both_dropped"]
    n = steps * batch
    assert abs(totals["text"] / n - p_text) < 0.15 and abs(totals["image"] / n - p_image) < 0.15
    assert totals["both"] < min(totals["text"], totals["image"])  # not the same rows: independent draws
    assert (tmp_path / "edit" / "samples" / "step_00000010.png").is_file()  # sources / edits / targets
    assert metrics(tmp_path / "edit", "val")

    path = tmp_path / "edit" / "export" / "generator.safetensors"
    gen = FusionDiffuser.from_file(path)
    source = torch.randn(2, 16, 8, 8)
    z = generation.generate(gen, ["flip it horizontally"] * 2, source, steps=3, guidance=2.0, image_guidance=1.5,
                            seed=0)
    assert z.shape == (2, 16, 8, 8) and torch.isfinite(z).all()
    prov = _provenance(path)
    assert prov["task"] == "edit" and prov["cfg_dropout"] == {"text": p_text, "image": p_image}
    assert prov["init"]["kind"] == "file" and prov["init"]["source"].endswith("t2i/export/generator.safetensors")
    assert prov["vae_fingerprint"] == _provenance(t2i_run / "export" / "generator.safetensors")["vae_fingerprint"]


def test_edit_on_two_processes_matches_one(assets, t2i_run, tmp_path):
    """torchrun with 2 processes x batch 2 (gloo on CPU) = 1 process x batch 4: latent cache filled
    split by rank, source/text dropout and flow noise drawn for the global batch."""
    args = ["edit", "--config", EDIT_TINY, f"model.vae={assets['vae']}", f"data.source={assets['edits']}",
            f"model.init_from={t2i_run / 'export' / 'generator.safetensors'}", f"run.output_dir={tmp_path}",
            f"data.latent_cache={tmp_path / 'cache'}", "train.max_steps=3", "checkpoint.every=0", "log.every=1",
            "optim.eps=1e-5", "loss.text_dropout=0.5", "loss.image_dropout=0.5"]
    one = cli(*args, "run.name=one", "train.batch_size=4")
    assert one.returncode == 0, one.stderr[-4000:]
    two = torchrun(*args, "run.name=two", "train.batch_size=2")
    assert two.returncode == 0, two.stderr[-4000:]
    assert "global batch 4 (2 process(es))" in two.stdout + two.stderr
    final = "checkpoints/step_00000003"
    for name in ("generator.safetensors", "generator.ema.safetensors"):
        diff = max_diff(weights(tmp_path / "one" / final, name), weights(tmp_path / "two" / final, name))
        assert diff < 1e-5, f"{name}: max |one - two| = {diff:.2e}"
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        assert a["cfg/text_dropped"] == b["cfg/text_dropped"] and a["cfg/image_dropped"] == b["cfg/image_dropped"]
        assert a["generator/flow"] == pytest.approx(b["generator/flow"], abs=1e-5)


def test_fsdp_makes_every_lm_layer_and_head_block_a_unit_called_once_a_step():
    """`sharding.shard` with the generator stages' units, in a one-process gloo group: each LM decoder
    layer and each DDT head block is its own FSDP unit (nothing else but the root), each LM layer is
    called once in a training forward (one all-gather for the prefix and the target), and the loss
    and gradients equal the unsharded model's."""
    import copy
    from collections import Counter

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from psvae_core.fusion import FusionDiffuser
    from trainer import sharding
    from trainer.generator_stages import EditStage, T2IStage

    assert EditStage.shard_units == T2IStage.shard_units
    torch.manual_seed(0)
    plain = FusionDiffuser.from_preset("tiny")
    for p in plain.head.parameters():  # the zero-initialised head would hide the backbone's gradients
        torch.nn.init.normal_(p, std=0.05)
    model = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(1)
    x0, noise, src = (torch.randn(2, 8, 4, 4, generator=g) for _ in range(3))
    ids, mask = torch.randint(2, 200, (2, 6), generator=g), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    batch = dict(x0=x0, text=(ids, mask), source=src, source_keep=torch.tensor([True, False]),
                 t=torch.tensor([0.3, 0.8]), noise=noise)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        units = sharding.shard(model, T2IStage.shard_units, torch.device("cpu"))
        layers, blocks = list(model.backbone.lm.layers), list(model.head.blocks)
        assert len(layers) == 2 and len(blocks) == 1
        sharded = {id(m) for m in model.modules() if isinstance(m, FSDPModule)}
        assert sharded == {id(m) for m in [model, *layers, *blocks]}
        assert [id(u) for u in units] == [id(m) for m in layers + blocks]
        calls = Counter()
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda *_, i=i: calls.update([i]))
        loss = model.training_loss(**batch)
        loss.backward()
        assert calls == {0: 1, 1: 1}
        reference = plain.training_loss(**batch)
        reference.backward()
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
        grads = {n: sharding.full_tensor(p.grad) for n, p in model.named_parameters()}
        for name, p in plain.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


def test_t2i_fsdp_matches_one_process_and_checkpoints_move_both_ways(assets, tmp_path):
    """FSDP2 (a unit per LM layer and head block, fused AdamW on the shards) on 2 processes x batch 1 x 2
    accumulation = 1 process x batch 4 (weights, EMA, losses, grad norms, the held-out loss and the
    exported generator, which is gathered from the shards); a sharded
    checkpoint resumes on 1 process and a 1-process one resumes sharded, both ending where the
    uninterrupted run ends."""
    from safetensors.torch import load_file

    args = ["t2i", "--config", T2I_TINY, f"model.vae={assets['vae']}", f"data.source={assets['photos']}",
            f"run.output_dir={tmp_path}", f"data.latent_cache={tmp_path / 'cache'}", "log.every=1", "optim.eps=1e-5",
            "checkpoint.every=2", "checkpoint.keep_last=0", "data.val_count=2", "validation.every=2",
            "log.images_every=2", "preview.steps=2"]
    fsdp = ["train.batch_size=1", "train.grad_accum=2", "train.fsdp=true"]  # accumulation: no reduce until the last
    ref = cli(*args, "run.name=one", "train.batch_size=4", "train.max_steps=4")
    assert ref.returncode == 0, ref.stderr[-4000:]
    sharded = torchrun(*args, "run.name=fsdp", *fsdp, "train.max_steps=4")
    assert sharded.returncode == 0, sharded.stderr[-4000:]
    assert "global batch 4 (2 process(es))" in sharded.stdout + sharded.stderr
    # One unit per LM layer and head block (the tiny preset: 2 + 1), the optimiser fused on the shards.
    assert ("FSDP: 'generator' sharded over 2 processes in 2 DecoderLayer + 1 DDTBlock units and the root, "
            "fused AdamW") in sharded.stdout + sharded.stderr
    assert (tmp_path / "fsdp" / "samples" / "step_00000002.png").is_file()

    def resumed(name: str, checkpoint: Path, *layout):
        run = (cli if not layout else torchrun)(*args, f"run.name={name}", f"checkpoint.resume={checkpoint}",
                                                 "train.max_steps=4", *(layout or ["train.batch_size=4"]))
        assert run.returncode == 0, run.stderr[-4000:]
        assert f"resuming a {1 if layout else 2}-process checkpoint" in run.stdout + run.stderr
        return tmp_path / name

    step2 = "checkpoints/step_00000002"
    runs = [tmp_path / "fsdp", resumed("fsdp_then_one", tmp_path / "fsdp" / step2),
            resumed("one_then_fsdp", tmp_path / "one" / step2, *fsdp)]
    final = "checkpoints/step_00000004"
    for run in runs:
        for name in ("generator.safetensors", "generator.ema.safetensors"):
            diff = max_diff(weights(tmp_path / "one" / final, name), weights(run / final, name))
            assert diff < 1e-5, f"{run.name} {name}: max |one - run| = {diff:.2e}"
        for a, b in zip(metrics(tmp_path / "one")[2:], metrics(run)[-2:]):
            assert a["step"] == b["step"]
            for key in ("generator/flow", "grad_norm/generator"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (run.name, key)
        assert metrics(run, "val")[-1]["flow_loss"] == pytest.approx(metrics(tmp_path / "one", "val")[-1]["flow_loss"],
                                                                     rel=1e-4)
    exported = [load_file(str(r / "export" / "generator.safetensors")) for r in (tmp_path / "one", runs[0])]
    assert max_diff(*exported) < 1e-5


# ------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("name", ["t2i_paper", "t2i_paper_1708m", "edit_paper", "t2i_tiny", "edit_tiny"])
def test_shipped_generator_configs_validate(name):
    from psvae_core.fusion import FusionDiffuser
    from trainer.config import load_config
    from trainer.generator_stages import EditConfig, T2IConfig, fusion_config

    path = T2I_TINY.with_name(f"{name}.yaml")
    stage = name.split("_")[0]
    cfg = load_config(EditConfig if stage == "edit" else T2IConfig, stage, str(path),
                      ["model.vae=/v.safetensors", "data.source=/d"])
    assert cfg.stage == stage and cfg.ema.enabled
    config = fusion_config(cfg.model)  # preset + overrides
    if "paper" in name:
        assert cfg.ema.decay == 0.9999 and cfg.optim.lr == 1e-4 and cfg.precision.mixed == "bf16"
        assert 720 <= cfg.train.batch_size * 8 * cfg.train.grad_accum <= 740  # on 8 GPUs ([paper] ~730)
        assert (config.latent_channels, tuple(config.latent_size)) == (96, (16, 16))
        total = FusionDiffuser.parameter_count(config)["total"]
        assert total == pytest.approx(1708e6 if "1708m" in name else 653e6, rel=0.01)
    elif name == "t2i_tiny":
        assert (config.latent_channels, tuple(config.latent_size)) == (16, (8, 8))  # psvae_tiny's latent
    # edit_tiny continues a t2i_tiny export (model.init_from): the file's architecture is kept


# ------------------------------------------------------------------------------------------ errors
def _main(capsys, *args) -> tuple[int, str]:
    """`python -m trainer ...` in this process (these runs stop before the first step)."""
    from trainer.__main__ import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_mismatched_vae_and_generator_exit_2(assets, t2i_run, tmp_path, capsys):
    base = ["t2i", "--config", T2I_TINY, f"model.vae={assets['vae']}", f"data.source={assets['photos']}",
            f"run.output_dir={tmp_path}"]
    code, err = _main(capsys, *base, "run.name=channels", "model.overrides.latent_channels=8")
    assert code == 2 and "16 latent channels" in err and "model.overrides.latent_channels=16" in err
    code, err = _main(capsys, *base, "run.name=grid", "model.overrides.latent_size=[4,4]")
    assert code == 2 and "8x8 grid" in err

    other = _tiny_vae(tmp_path / "other_vae.safetensors", 1)  # same shapes, other weights
    code, err = _main(capsys, "edit", "--config", EDIT_TINY, f"model.vae={other}", f"data.source={assets['edits']}",
                      f"model.init_from={t2i_run / 'export' / 'generator.safetensors'}", f"run.output_dir={tmp_path}",
                      "run.name=other")
    assert code == 2 and "another VAE" in err and "model.allow_other_vae" in err


def test_init_from_judges_the_vae_by_the_rule_the_comfyui_loader_uses(assets, tmp_path, capsys):
    """psvae_core.provenance: recorded latent stats decide, the fingerprint only without them. Before
    that rule the trainer compared fingerprints alone, so it refused a re-export of the same VAE (which
    the loader accepts) and accepted a generator whose stats name another VAE (which the loader refuses)."""
    from psvae_core.autoencoder import PSVAE
    from psvae_core.checkpoint import fingerprint, read_metadata
    from psvae_core.fusion import PRESETS, FusionDiffuser

    stats = json.loads(read_metadata(assets["vae"])["latent_stats"])
    torch.manual_seed(0)
    generator = FusionDiffuser(PRESETS["tiny"].replace(latent_channels=16, latent_size=(8, 8)))

    def edit(name: str, vae: Path, provenance: dict) -> tuple[int, str]:
        from trainer.__main__ import main

        path = tmp_path / f"{name}.safetensors"
        generator.save(path, provenance=provenance)
        code = main(["edit", "--config", str(EDIT_TINY), f"model.vae={vae}", f"data.source={assets['edits']}",
                     f"model.init_from={path}", "model.tokenizer=bytes", "train.max_steps=1", "checkpoint.every=0",
                     f"run.output_dir={tmp_path}", f"run.name={name}"])
        out = capsys.readouterr()
        return code, out.out + out.err

    bf16 = tmp_path / "vae_bf16.safetensors"  # the same VAE re-exported: another fingerprint, the same stats
    PSVAE.from_file(assets["vae"]).save(bf16, dtype=torch.bfloat16)
    assert fingerprint(bf16) != fingerprint(assets["vae"])
    record = {"vae": {"file": "vae.safetensors", "fingerprint": fingerprint(assets["vae"]), "latent_stats": stats}}
    code, err = edit("reexport", bf16, record)
    assert code == 0, err[-3000:]
    assert "same latent statistics" in err and "re-export" in err

    other = _tiny_vae(tmp_path / "other_vae.safetensors", 1)  # same shapes; stats 0/1, far from the recorded ones
    code, err = edit("stats", other, {"vae_latent_stats": stats})
    assert code == 2 and "latent statistics it records differ" in err and "model.allow_other_vae" in err
