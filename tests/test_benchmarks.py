"""Benchmark generation (trainer/benchmarks.py): exact GenEval / DPG-Bench / GEdit layouts, resume
without regenerating, per-image seeds, and the CLI, with a tiny VAE + generator pair."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psvae_core.autoencoder import PSVAE
from psvae_core.config import PRESETS
from psvae_core.fusion import FusionDiffuser
from trainer import benchmarks as bm
from trainer.rng import derive_seed
from test_trainer_helpers import write_sample_photos

from tiny_models import one_thread, word_tokenizer  # noqa: F401  (one_thread: an autouse fixture)

WORDS = "a photo of the red blue green cat dog two on left right make it snowy remove background".split()
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cat"},
]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny PS-VAE (16 ch, 16x16 latent, 256 px out) and a tiny generator on that latent."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vae = PSVAE(PRESETS["tiny"])
    gen = FusionDiffuser.from_preset("tiny", latent_channels=vae.latent_channels, latent_size=(16, 16))
    gen.tokenizer = word_tokenizer(WORDS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # wake the zero-initialised head so text and source matter
        for p in gen.head.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    vae.save(folder / "vae.safetensors")
    gen.save(folder / "generator.safetensors")
    return folder / "vae.safetensors", folder / "generator.safetensors"


def make_sampler(model_files, **settings):
    settings = {"steps": 2, "batch_size": 4, **settings}
    return bm.BenchmarkSampler.from_files(*model_files, bm.SamplingSettings(**settings))


@pytest.fixture(scope="module")
def sampler(model_files):
    return make_sampler(model_files)


@pytest.fixture
def geneval_prompts(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in GENEVAL) + "\n")
    return path


def files_under(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def nearly_same(a: Path, b: Path) -> bool:
    """Same picture up to float batching effects: a few values off by one level of 255."""
    x, y = (torch.from_numpy(np.array(Image.open(p).convert("RGB"))).int() for p in (a, b))
    diff = (x - y).abs()
    return diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


# ================================================================================== GenEval
def test_geneval_layout_resume_and_seeds(sampler, model_files, geneval_prompts, tmp_path):
    out = tmp_path / "geneval"
    logs = []
    summary = bm.run_geneval(sampler, geneval_prompts, out, samples=4, log=logs.append)
    assert summary == {"prompts": 3, "generated": 12, "kept": 0}
    expected = {f"{i:05d}/metadata.jsonl" for i in range(3)} | {
        f"{i:05d}/samples/{k:04d}.png" for i in range(3) for k in range(4)}
    first = files_under(out)
    assert set(first) == expected
    lines = geneval_prompts.read_text().splitlines()
    for i in range(3):
        assert json.loads((out / f"{i:05d}" / "metadata.jsonl").read_text()) == GENEVAL[i]  # the scorer json.load()s it
        assert (out / f"{i:05d}" / "metadata.jsonl").read_text() == lines[i] + "\n"
        with Image.open(out / f"{i:05d}" / "samples" / "0000.png") as im:
            assert im.size == (256, 256) and im.mode == "RGB"
            info = json.loads(im.info["psvae"])
            assert info["prompt"] == GENEVAL[i]["prompt"] and info["seed"] == derive_seed(0, i, 0)
    images = png_bytes(out)
    assert len(set(images.values())) == 12  # every (prompt, sample) has its own seed
    assert any("evaluate_images.py" in line and str(out.resolve()) in line for line in logs)

    # Resume: nothing is regenerated, nothing rewritten.
    batches = sampler.batches
    assert bm.run_geneval(sampler, geneval_prompts, out, log=logs.append)["generated"] == 0
    assert sampler.batches == batches
    assert files_under(out) == first

    # A lost image is remade alone; its seed does not depend on its batch, so it is the same picture.
    lost = out / "00001" / "samples" / "0002.png"
    kept = lost.rename(tmp_path / "lost.png")
    assert bm.run_geneval(sampler, geneval_prompts, out, log=logs.append)["generated"] == 1
    assert sampler.batches == batches + 1
    assert nearly_same(lost, kept)

    # Same seed and settings elsewhere: identical PNGs; another batch size: the same pictures;
    # another seed: different ones.
    again = tmp_path / "again"
    bm.run_geneval(make_sampler(model_files), geneval_prompts, again, log=logs.append)
    assert png_bytes(again) == images
    rebatched = tmp_path / "rebatched"
    bm.run_geneval(make_sampler(model_files, batch_size=3), geneval_prompts, rebatched, log=logs.append)
    assert all(nearly_same(rebatched / name, again / name) for name in images)
    other = tmp_path / "other"
    bm.run_geneval(make_sampler(model_files, seed=1), geneval_prompts, other, samples=1, limit=1, log=logs.append)
    assert png_bytes(other)["00000/samples/0000.png"] != images["00000/samples/0000.png"]

    # Resuming with other settings is refused; another prompt file too.
    with pytest.raises(bm.BenchmarkError, match="steps: 2 -> 3"):
        bm.run_geneval(make_sampler(model_files, steps=3), geneval_prompts, out, log=logs.append)
    changed = tmp_path / "changed.jsonl"
    changed.write_text(json.dumps({"prompt": "a photo of a dog", "tag": "single_object"}) + "\n")
    with pytest.raises(bm.BenchmarkError, match="another prompt"):
        bm.run_geneval(sampler, changed, out, log=logs.append)


def test_geneval_shards_split_the_prompts(sampler, geneval_prompts, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    bm.run_geneval(sampler, geneval_prompts, whole, samples=1, log=lambda _: None)
    made = [bm.run_geneval(sampler, geneval_prompts, split, samples=1, shard=(r, 2), log=lambda _: None)["generated"]
            for r in range(2)]
    assert made == [2, 1]
    assert set(png_bytes(split)) == set(png_bytes(whole))
    assert all(nearly_same(split / name, whole / name) for name in png_bytes(whole))


# ================================================================================== DPG-Bench
def test_dpg_grids_and_resume(sampler, tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts12.txt").write_text("a photo of a blue cat on the left of a dog\n")
    (prompts / "whoops7.txt").write_text("a photo of two green dog")
    out = tmp_path / "dpg"
    logs = []
    assert bm.run_dpg(sampler, prompts, out, samples=4, log=logs.append)["generated"] == 8
    assert sorted(files_under(out)) == ["partiprompts12.png", "whoops7.png"]  # nothing else: the scorer reads all
    with Image.open(out / "whoops7.png") as grid:
        assert grid.size == (512, 512)
        grid = grid.convert("RGB")
        tiles = [grid.crop((x, y, x + 256, y + 256)).tobytes() for x, y in [(0, 0), (256, 0), (0, 256), (256, 256)]]
    assert len(set(tiles)) == 4
    assert any("compute_dpg_bench.py" in line and "--resolution 256 --pic-num 4" in line for line in logs)
    before, batches = files_under(out), sampler.batches
    assert bm.run_dpg(sampler, prompts, out, log=logs.append)["generated"] == 0
    assert files_under(out) == before and sampler.batches == batches


# ================================================================================== GEdit
def test_gedit_layout_and_resume(sampler, tmp_path):
    photos = write_sample_photos(tmp_path / "inputs", size=200, names=("astronaut", "chelsea"))
    rows = [
        {"key": "a1b2", "source": "inputs/astronaut.png", "instruction": "make it snowy",
         "task_type": "background_change", "language": "en"},
        {"key": "c3d4", "source": str(photos[1]), "instruction": "remove the cat", "task_type": "subject-remove",
         "instruction_language": "en"},
    ]
    (tmp_path / "gedit.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "results" / "psvae" / "fullset"
    logs = []
    assert bm.run_gedit(sampler, tmp_path / "gedit.jsonl", out, log=logs.append)["generated"] == 2
    assert sorted(files_under(out)) == ["background_change/en/a1b2.png", "subject-remove/en/c3d4.png"]
    with Image.open(out / "background_change/en/a1b2.png") as im:
        assert im.size == (256, 256)
        assert json.loads(im.info["psvae"])["run"]["image_cfg"] == 1.5
    command = next(line for line in logs if "test_gedit_score.py" in line)
    assert f"--model_name psvae --save_path {(tmp_path / 'results').resolve()}" in command
    before, batches = files_under(out), sampler.batches
    assert bm.run_gedit(sampler, tmp_path / "gedit.jsonl", out, log=logs.append)["generated"] == 0
    assert files_under(out) == before and sampler.batches == batches

    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "source": "inputs/none.png"}))
    with pytest.raises(bm.BenchmarkError, match="does not exist"):
        bm.run_gedit(sampler, tmp_path / "bad.jsonl", out, log=logs.append)


# ================================================================================== CLI
def test_cli_runs_and_prints_the_scorer_command(model_files, geneval_prompts, tmp_path, capsys):
    vae, gen = model_files
    out = tmp_path / "cli"
    args = ["geneval", "--vae", str(vae), "--generator", str(gen), "--prompts", str(geneval_prompts), "--out", str(out),
            "--samples", "2", "--steps", "1", "--batch-size", "3", "--device", "cpu", "--limit", "2", "--seed", "5"]
    assert bm.main(args)["generated"] == 4
    assert sorted(files_under(out)) == ["00000/metadata.jsonl", "00000/samples/0000.png", "00000/samples/0001.png",
                                        "00001/metadata.jsonl", "00001/samples/0000.png", "00001/samples/0001.png"]
    printed = capsys.readouterr().out
    assert "evaluation/evaluate_images.py" in printed and "summary_scores.py" in printed
    with pytest.raises(SystemExit):
        bm.main(args[:-2] + ["--seed", "6"])  # settings differ from the outputs there
    assert "other settings" in capsys.readouterr().err


def test_benchmark_images_are_the_library_generation_of_their_seeds(sampler):
    """The benchmark outputs are `generation.generate` with one seed per row, decoded by the VAE:
    the same images a batch of one at that seed makes (the nodes' and previews' rule)."""
    from psvae_core import generation

    images = sampler.generate(["a photo of a cat", "a red dog"], [11, 12])
    alone = generation.generate(sampler.generator, ["a red dog"], seed=12, steps=2, vae=sampler.vae)
    torch.testing.assert_close(images[1:], alone, atol=1e-5, rtol=0)
    latents = generation.generate(sampler.generator, ["a photo of a cat"], seed=11, steps=2)
    torch.testing.assert_close(images[:1], generation.decode(sampler.vae, latents), atol=1e-5, rtol=0)


def test_cli_bad_shard_is_a_usage_error(model_files, geneval_prompts, tmp_path, capsys):
    vae, gen = model_files
    with pytest.raises(SystemExit) as exit_info:
        bm.main(["geneval", "--vae", str(vae), "--generator", str(gen), "--prompts", str(geneval_prompts),
                 "--out", str(tmp_path / "out"), "--shard", "one-of-eight"])
    assert exit_info.value.code == 2 and "--shard takes RANK/WORLD" in capsys.readouterr().err
