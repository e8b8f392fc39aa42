"""The scenes miniature's training side (docs/SCENES.md): the toy encoder folder loads like a DINOv2
download, the linear probe measures what features hold, and every trainer/configs/scenes_*.yaml
trains a few steps on the CPU (tiny overrides: 128-px images, a 32-wide encoder, small decoder and
generator) in the order the pipeline chains them (svae -> psvae / pvae, rae; t2i -> edit)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny_models import one_thread  # noqa: F401  (an autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "trainer" / "configs"


def _tiny_encoder(folder: Path, seed: int = 0):
    from psvae_core.config import EncoderConfig
    from psvae_core.encoders import RepresentationEncoder
    from trainer.scenes.encoder import encoder_config, save_encoder

    torch.manual_seed(seed)
    enc = RepresentationEncoder(EncoderConfig(family="dinov2_reg", hf_config=encoder_config(32, 1, 2),
                                              image_size=112)).eval()
    save_encoder(enc, folder)
    return enc


def test_encoder_folder_loads_as_the_trainer_reads_dinov2(tmp_path):
    """save_encoder writes a folder RepresentationEncoder.from_pretrained (model.encoder_weights)
    reads back to the same features, as the dinov2_reg family, with the ImageNet mean/std."""
    from psvae_core.encoders import RepresentationEncoder

    enc = _tiny_encoder(tmp_path / "enc")
    loaded = RepresentationEncoder.from_pretrained(tmp_path / "enc", image_size=112).eval()
    assert loaded.config.family == "dinov2_reg"
    assert loaded.image_mean == enc.image_mean and loaded.image_std == enc.image_std
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a, b = enc(x), loaded(x)
    assert a.shape == (2, 32, 8, 8)
    torch.testing.assert_close(a, b)


def test_pretrain_writes_the_folder_and_its_probe(tmp_path):
    """The encoder command trains on dense labels (the loss falls) and reports the probe of the saved folder."""
    from trainer.scenes.encoder import pretrain

    report = pretrain(tmp_path / "enc", steps=12, batch_size=4, lr=3e-3, train_scenes=8, probe_train=4,
                      probe_test=2, workers=1, hidden=32, layers=1, heads=2, device="cpu", log_every=11)
    assert (tmp_path / "enc" / "config.json").is_file() and (tmp_path / "enc" / "model.safetensors").is_file()
    assert report["curve"][-1]["loss"] < report["curve"][0]["loss"]
    assert report["train"]["label_grid"] == 64  # 4 x 4 labelled sub-cells per patch (SUB)
    probe = report["probe"]
    assert probe["test_cells"] == 2 * 256 and probe["feature_dim"] == 32
    assert 0.0 <= probe["object_accuracy"] <= probe["accuracy"] <= 1.0  # background is the easy majority


def test_linear_probe_reads_linear_information_only():
    """Features that hold the label one-hot (plus noise) probe at ~100 %; pure noise at chance level."""
    from trainer.scenes import world
    from trainer.scenes.encoder import linear_probe

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(world.NUM_CLASSES, (40, 16, 16), generator=g)
    onehot = torch.nn.functional.one_hot(labels, world.NUM_CLASSES).permute(0, 3, 1, 2).float()
    signal = onehot + 0.1 * torch.randn(onehot.shape, generator=g)
    good = linear_probe(signal[:30], labels[:30], signal[30:], labels[30:], steps=150, lr=0.05)
    noise = torch.randn(onehot.shape, generator=g)
    bad = linear_probe(noise[:30], labels[:30], noise[30:], labels[30:], steps=150, lr=0.05)
    assert good["accuracy"] > 0.99 and good["object_balanced_accuracy"] > 0.99
    assert bad["accuracy"] < 0.1


def test_linear_probe_does_not_depend_on_the_global_rng():
    """The same features give the same probe numbers whatever torch's global seed (the head's init
    is seeded), so two evaluations of one model agree."""
    from trainer.scenes.encoder import linear_probe

    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(6, 8, 16, 16, generator=g), torch.randint(3, (6, 16, 16), generator=g)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(linear_probe(features[:4], labels[:4], features[4:], labels[4:], steps=20))
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def scenes_data(tmp_path_factory):
    """t2i/ (6 captioned scenes), val/ (2), edit/ (source, target with one object removed, instruction), encoder/."""
    import numpy as np

    from trainer.scenes import captions, world

    root = tmp_path_factory.mktemp("scenes")
    for name, split, n in (("t2i", "train", 6), ("val", "val", 2)):
        (root / name).mkdir()
        for i in range(n):
            rng = np.random.default_rng([i])
            text, spec = captions.prompt(rng, split)
            world.render(captions.scene_for(spec, rng, split)).resize((128, 128)).save(root / name / f"{i}.png")
            (root / name / f"{i}.txt").write_text(text)
    for sub in ("source", "target", "instruction"):
        (root / "edit" / sub).mkdir(parents=True)
    for i in range(4):
        scene = world.sample_scene(world.rng_for("train", i), "train", n_objects=2)
        world.render(scene, 128).save(root / "edit" / "source" / f"{i}.png")
        world.render(scene.with_objects(scene.objects[1:]), 128).save(root / "edit" / "target" / f"{i}.png")
        first = scene.objects[0]
        (root / "edit" / "instruction" / f"{i}.txt").write_text(f"remove the {first.color} {first.shape}")
    _tiny_encoder(root / "encoder")
    return root


STEPS = ["train.max_steps=2", "train.batch_size=2", "train.num_workers=0", "precision.mixed='no'",
         "export.stats_images=4", "validation.max_images=2"]
VAE_NEW = ["model.overrides.encoder.image_size=112", "model.overrides.pixel_decoder.base_channels=8"]
GEN_NEW = ["model.overrides.latent_size=[8,8]", "model.overrides.lm.hidden_size=32",
           "model.overrides.lm.num_hidden_layers=1", "model.overrides.lm.intermediate_size=64",
           "model.overrides.head_width=32", "model.overrides.head_depth=1", "checkpoint.every=1",
           "preview.steps=2"]


def _train(config: str, root: Path, extra: list[str]) -> dict:
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.stage import STAGES
    import trainer.generator_stages  # noqa: F401  (registers t2i, edit)
    import trainer.vae_stages  # noqa: F401  (registers svae, psvae, rae)

    path = CONFIGS / f"{config}.yaml"
    stage = path.read_text().split("stage: ", 1)[1].split()[0]
    cls = STAGES[stage]
    cfg = load_config(cls.config_class, stage, str(path),
                      [f"run.output_dir={root / 'runs'}", f"run.name={config}"] + STEPS + extra)
    summary = train(cls, cfg)
    assert Path(summary["export"]).is_file() and summary["step"] == 2
    return summary


@pytest.fixture(scope="module")
def vaes(scenes_data):
    root = scenes_data
    images = [f"data.source={root / 't2i'}", f"data.val_source={root / 'val'}", "data.image_size=128"]
    out = {}
    for name in ("svae", "rae"):
        out[name] = _train(f"scenes_{name}", root, images + VAE_NEW + [f"model.encoder_weights={root / 'encoder'}"])
    for name in ("psvae", "pvae"):
        out[name] = _train(f"scenes_{name}", root, images + [f"model.init_from={out['svae']['export']}"])
    return out


def test_scenes_vae_configs_train(vaes):
    """scenes_svae / _rae on the toy encoder folder, scenes_psvae / _pvae from the svae export: each
    exports a VAE of the configured kind; P-VAE differs from PS-VAE only by the semantic loss."""
    from psvae_core.autoencoder import PSVAE
    from trainer.config import load_config
    from trainer.vae_stages import VAEConfig

    loaded = {n: PSVAE.from_file(s["export"]) for n, s in vaes.items()}
    assert {n: v.latent_channels for n, v in loaded.items()} == {"svae": 96, "rae": 32, "psvae": 96, "pvae": 96}
    assert {n: v.config.mode for n, v in loaded.items()} == {"svae": "psvae", "rae": "rae", "psvae": "psvae",
                                                              "pvae": "psvae"}
    assert all(v.latents_mean.dtype == torch.float32 for v in loaded.values())
    cfg = {n: load_config(VAEConfig, "psvae", str(CONFIGS / f"scenes_{n}.yaml"), ["data.source=/x", "model.init_from=/y"])
           for n in ("psvae", "pvae")}
    assert cfg["psvae"].loss.semantic_weight > 0 and cfg["pvae"].loss.semantic_weight == 0
    differ = {k for k in cfg["psvae"].loss if cfg["psvae"].loss[k] != cfg["pvae"].loss[k]}
    assert differ == {"semantic_weight"} and cfg["psvae"].train == cfg["pvae"].train


def test_scenes_generator_configs_train(vaes, scenes_data, tmp_path):
    """scenes_t2i on the psvae and rae latents (the same generator but for the latent width), then
    scenes_edit from the t2i export; the evaluation's loader rebuilds a checkpoint's EMA model."""
    from trainer.scenes.evaluate import load_generator

    root = scenes_data
    exports = {}
    for vae, channels in (("psvae", []), ("rae", ["model.overrides.latent_channels=32"])):
        common = [f"model.vae={vaes[vae]['export']}", f"data.latent_cache={tmp_path / 'cache'}", "data.image_size=128"]
        t2i = _train("scenes_t2i", root, common + GEN_NEW + channels + [f"data.source={root / 't2i'}",
                                                                        f"run.name=t2i_{vae}"])
        exports[vae] = t2i["export"]
        edit = _train("scenes_edit", root, common + ["preview.steps=2", f"model.init_from={t2i['export']}",
                                                     f"data.source={root / 'edit'}", f"run.name=edit_{vae}"])
        assert Path(edit["export"]).is_file()
    run = Path(exports["psvae"]).parents[1]
    step1 = load_generator(Path(exports["psvae"]), run / "checkpoints" / "step_00000001")
    final = load_generator(Path(exports["psvae"]))
    differs = [k for k, v in final.state_dict().items() if not torch.equal(v, step1.state_dict()[k])]
    assert differs and "x_embedder.weight" in differs  # step 1's EMA is not the final one
    assert final.config.latent_channels == 96


# --------------------------------------------------------------------------- the retraining driver

def test_pipeline_plan_orders_every_job_after_what_it_needs(tmp_path):
    """ORDER holds every job once and after what it needs; svae and rae read one feature-cache
    folder; the steps and the T2I checkpoint spacing come from STEPS; the estimate is the critical path."""
    from trainer.scenes import pipeline

    plan = pipeline.build_plan(tmp_path / "work", tmp_path / "out", smoke=False)
    assert sorted(pipeline.ORDER) == sorted(plan.jobs) and len(set(pipeline.ORDER)) == len(pipeline.ORDER)
    for name in plan.jobs:
        assert all(pipeline.ORDER.index(d) < pipeline.ORDER.index(name) for d in pipeline.NEEDS.get(name, []))
    caches = {n: [a for a in plan.jobs[n].commands()[0] if a.startswith("data.cache_dir=")] for n in ("svae", "rae")}
    assert caches["svae"] == caches["rae"] == [f"data.cache_dir={tmp_path / 'work' / 'feature_cache'}"]
    t2i = plan.jobs["t2i_psvae"].commands()[0]
    assert f"train.max_steps={pipeline.STEPS['scenes_t2i']}" in t2i
    assert f"checkpoint.every={pipeline.T2I_CHECKPOINT_EVERY}" in t2i
    half = pipeline.build_plan(tmp_path / "work", tmp_path / "out", smoke=False, scale=0.5).jobs["t2i_psvae"].commands()[0]
    assert f"train.max_steps={pipeline.STEPS['scenes_t2i'] // 2}" in half
    chain = ["encoder", "svae", "rae", "t2i_rae", "edit_rae", "evaluate_edit", "report"]  # the longest
    assert pipeline.critical_path(plan) == pytest.approx(sum(plan.jobs[n].seconds for n in chain))


def _fake_plan(tmp_path, monkeypatch, jobs: dict, needs: dict):
    """A plan of the given python snippets (name -> (code, evaluation)), ordered as given."""
    import sys

    from trainer.scenes import pipeline

    work, out = tmp_path / "work", tmp_path / "out"
    plan = pipeline.Plan(work, out, smoke=True)
    for name, (code, evaluation) in jobs.items():
        product = work / f"{name}.bin"
        plan.jobs[name] = pipeline.Job(name, product, lambda code=code: [[sys.executable, "-c", code]],
                                       products=[(product, f"artifacts/{name}.bin")], evaluation=evaluation)
    monkeypatch.setattr(pipeline, "ORDER", list(jobs))
    monkeypatch.setattr(pipeline, "NEEDS", needs)
    return pipeline, plan


def _writes(tmp_path, name: str, text: str = "made it") -> str:
    return f"import pathlib; print({text!r}); pathlib.Path(r'{tmp_path / 'work' / name}.bin').write_bytes(b'{name}')"


def test_pipeline_skips_what_needs_a_failed_job_and_still_evaluates(tmp_path, monkeypatch):
    """A failed job's dependants are skipped, an evaluation job runs on what exists; each job's
    product reaches OUT when it ends, its log in OUT/results.tar.gz, its state in wall_times.json."""
    import tarfile

    pipeline, plan = _fake_plan(tmp_path, monkeypatch, {
        "first": (_writes(tmp_path, "first"), False),
        "second": ("import sys; print('broken'); sys.exit(3)", False),
        "third": (_writes(tmp_path, "third"), False),
        "evaluate": (_writes(tmp_path, "evaluate", "evaluated"), True)},
        {"second": ["first"], "third": ["second"], "evaluate": ["first", "third"]})
    state = pipeline.run(plan, pipeline.ORDER)
    assert state == {"first": "done", "second": "failed", "third": "skipped", "evaluate": "done"}
    assert (plan.out / "artifacts" / "first.bin").read_bytes() == b"first"
    assert not (plan.out / "artifacts" / "third.bin").exists()
    with tarfile.open(plan.out / "results.tar.gz") as tar:
        logs = {m: tar.extractfile(m).read().decode() for m in ("logs/first.log", "logs/second.log")}
        record = json.loads(tar.extractfile("wall_times.json").read())["runs"][-1]
    assert logs == {"logs/first.log": "made it\n", "logs/second.log": "broken\n"}
    assert record["state"] == state and set(record["seconds"]) == {"first", "second", "evaluate"}
    assert pipeline.run(plan, pipeline.ORDER)["first"] == "done"  # started again: done jobs are not rerun
    assert (plan.work / "logs" / "first.log").read_text() == "made it\n"


def test_pipeline_deadline_stops_training_and_evaluates_what_exists(tmp_path, monkeypatch):
    """WRAP_UP before the deadline the training still running is stopped and the evaluation runs."""
    pipeline, plan = _fake_plan(tmp_path, monkeypatch, {
        "quick": (_writes(tmp_path, "quick"), False),
        "slow": ("import time; print('step 1', flush=True); time.sleep(60)", False),
        "after_slow": (_writes(tmp_path, "after_slow"), False),
        "evaluate": (_writes(tmp_path, "evaluate"), True)},
        {"after_slow": ["slow"], "evaluate": ["quick", "after_slow"]})
    monkeypatch.setattr(pipeline, "WRAP_UP", 0)
    state = pipeline.run(plan, pipeline.ORDER, deadline=3)
    assert state == {"quick": "done", "slow": "stopped", "after_slow": "skipped", "evaluate": "done"}
    assert (plan.work / "logs" / "slow.log").read_text() == "step 1\n"


def test_pipeline_packs_out_when_stopped_by_sigterm(tmp_path):
    """SIGTERM ends the running job and still writes OUT/results.tar.gz with the log so far."""
    import os
    import signal
    import subprocess
    import sys
    import tarfile
    import time

    script = tmp_path / "driver.py"
    script.write_text(f"""
import sys, pytest
from trainer.scenes import pipeline
mp = pytest.MonkeyPatch()
plan = pipeline.Plan(pipeline.Path(r"{tmp_path / 'work'}"), pipeline.Path(r"{tmp_path / 'out'}"), smoke=True)
code = "import time; print('step 1', flush=True); time.sleep(60)"
plan.jobs["slow"] = pipeline.Job("slow", plan.work / "slow.bin", lambda: [[sys.executable, "-c", code]])
mp.setattr(pipeline, "ORDER", ["slow"])
mp.setattr(pipeline, "build_plan", lambda *a: plan)
pipeline.main(["all", "--out", str(plan.out)])
""")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "work" / "logs" / "slow.log"
    while proc.poll() is None and not (log.is_file() and log.read_text()):  # until the job's first line
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert tar.extractfile("logs/slow.log").read() == b"step 1\n"
        record = json.loads(tar.extractfile("wall_times.json").read())["runs"][-1]
    assert record["state"] == {"slow": "stopped"} and record["seconds"]["slow"].startswith("stopped after")


def test_report_merges_the_parts_and_the_rfid_computed_apart(tmp_path):
    """evaluate --only report: the parts' files into one table; rFID from rfid_results.json (a CPU
    run where the GPU machine lacked the Inception weights) fills the reconstruction rows."""
    from trainer.scenes import evaluate

    out, work = tmp_path / "out", tmp_path / "work"
    (out / "plots").mkdir(parents=True)
    work.mkdir()
    row = {"rfid": None, "psnr": 30.5, "ssim": 0.84, "n_images": 2000, "fid_note": "", "latent": [96, 16, 16]}
    (out / "vae_results.json").write_text(json.dumps({"reconstruction": {"psvae": row}, "seconds": 9.0}))
    (out / "rfid_results.json").write_text(json.dumps(
        {"rfid": {"psvae": {**row, "rfid": 12.345, "n_images": 500, "fid_note": "few images"}}, "seconds": 7.0}))
    results = evaluate.report(work, out)
    assert results["reconstruction"]["psvae"]["rfid"] == 12.345
    assert results["reconstruction"]["psvae"]["rfid_images"] == 500
    assert results["reconstruction"]["psvae"]["psnr"] == 30.5  # the GPU part's numbers stay
    assert results["seconds"] == {"vae": 9.0, "rfid": 7.0}
    assert results["trained"] == {"vae": [], "t2i": [], "edit": []} and results["shipped_bytes"] == {}
    assert "| PS-VAE | 96 | 12.35 | 30.50 | 0.840 | n/a | n/a | n/a |" in (out / "results.md").read_text()
