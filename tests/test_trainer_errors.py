"""Config and data errors: clear messages and a non-zero exit; data sources, reports and sampling."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from PIL import Image

from test_trainer_helpers import TINY_SVAE, cli, photos
from trainer.__main__ import main
from trainer.data import DataError, GlobalBatchSampler, build_image_dataset


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    return photos(tmp_path_factory.mktemp("photos"), 64)


def run_main(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_unknown_key_names_the_key_and_the_valid_ones(capsys, photo_dir, tmp_path):
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", "optim.lrr=1")
    assert code == 2
    assert "unknown config key 'optim.lrr'" in err and "lr, " in err and "warmup_steps" in err


def test_unknown_key_in_yaml_file(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_sise: 4\n")
    code, err = run_main(capsys, "svae", "--config", bad)
    assert code == 2 and "train.batch_sise" in err and "batch_size" in err


def test_wrong_type(capsys, photo_dir):
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", "train.batch_size=four")
    assert code == 2 and "wrong type for 'train.batch_size'" in err


def test_bad_value_and_stage_mismatch(capsys, photo_dir):
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", "optim.schedule=linear")
    assert code == 2 and "'optim.schedule'" in err and "cosine" in err
    code, err = run_main(capsys, "psvae", "--config", TINY_SVAE, f"data.source={photo_dir}")
    assert code == 2 and "stage 'svae'" in err


@pytest.mark.parametrize("override, fix", [
    ("optim.lr=nan", "a finite number > 0"), ("optim.lr=inf", "a finite number > 0"),
    ("optim.lr=-1", "a finite number > 0"), ("optim.eps=nan", "a finite number > 0"),
    ("optim.betas=[1.5,0.9]", "two numbers in [0, 1)"), ("optim.betas=[0.9]", "two numbers in [0, 1)"),
    ("optim.weight_decay=inf", "a finite number >= 0"), ("optim.min_lr_ratio=2", "in [0, 1]"),
    ("ema.every=0", "> 0"), ("ema.decay=nan", "in [0, 1)")])
def test_values_that_would_crash_later_are_refused_naming_key_and_fix(capsys, photo_dir, tmp_path, override, fix):
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}",
                         f"run.output_dir={tmp_path}", override)
    key = override.partition("=")[0]
    assert code == 2 and f"'{key}' must be {fix}" in err, err
    assert not (tmp_path / "svae_tiny").exists()


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "ABSOLUTE"])
def test_run_name_cannot_leave_the_output_dir(capsys, photo_dir, tmp_path, name):
    out = tmp_path / "deep" / "runs"
    name = str(tmp_path / "abs_run") if name == "ABSOLUTE" else name
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", f"run.output_dir={out}",
                         f"run.name={name}", "train.max_steps=1")
    assert code == 2 and "'run.name' must be one folder name" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_a_choice_key_lists_its_values_and_explains_a_bare_no(capsys, photo_dir):
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", "export.dtype=fp32")
    assert code == 2 and "'export.dtype' is 'fp32'; use one of ['float32', 'bfloat16', 'float16']" in err
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", "precision.mixed=no")
    assert code == 2 and "use one of ['no', 'bf16', 'fp16']" in err and "quote it" in err


@pytest.mark.parametrize("stage, override, message", [
    ("svae", "data.kind=zip", "'data.kind' is 'zip'; use one of ['auto', 'folder', 'manifest', 'hf']"),
    ("svae", "gan.norm=layer", "'gan.norm' is 'layer'; use one of ['group', 'none', 'batch']"),
    ("svae", "loss.kl_reduction=sum", "'loss.kl_reduction' is 'sum'; use one of ['sum_mean', 'mean']"),
    ("t2i", "data.latent_cache_dtype=int8", "'data.latent_cache_dtype' is 'int8'; use one of ['float32', 'bfloat16', "
     "'float16']"),
    ("edit", "data.format=tar", "'data.format' is 'tar'; use one of ['auto', 'folder', 'jsonl']"),
    ("t2i", "model.preset=huge", "'model.preset' is 'huge'; use one of ['paper-653m', 'paper-1708m', 'smollm2-135m', "
     "'tiny']"),
    ("svae", "model.preset=huge", "'model.preset' is 'huge'; use one of ['paper-dinov2-b-96c', "),
    ("t2i", "loss.text_dropout=1.5", "'loss.text_dropout' must be in [0, 1], got 1.5"),
    ("t2i", "loss.shift=0", "'loss.shift' must be > 0, got 0"),
    ("t2i", "data.val_count=-1", "'data.val_count' must be >= 0, got -1"),
    ("edit", "loss.image_dropout=-0.1", "'loss.image_dropout' must be in [0, 1], got -0.1")])
def test_stage_choice_keys_are_checked_by_the_schema(stage, override, message):
    """Every stage's choice keys are Literal fields and its ranges are in its schema's RANGES: refused
    when the config is read, before any file is opened, with the same message shape as the shared keys."""
    from trainer.config import ConfigError, load_config
    from trainer.generator_stages import EditConfig, T2IConfig
    from trainer.vae_stages import VAEConfig

    schema, extra = {"svae": (VAEConfig, []), "t2i": (T2IConfig, ["model.vae=v"]),
                     "edit": (EditConfig, ["model.vae=v"])}[stage]
    with pytest.raises(ConfigError) as err:
        load_config(schema, stage, None, [f"stage={stage}", "data.source=s", *extra, override])
    assert message in str(err.value)


def test_missing_data_source_and_missing_dir(capsys, tmp_path):
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE)
    assert code == 2 and "'data.source' must be set" in err
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={tmp_path / 'nope'}",
                         f"run.output_dir={tmp_path}")
    assert code == 2 and "does not exist" in err


def test_psvae_needs_a_stage1_export(capsys, photo_dir, tmp_path):
    code, err = run_main(capsys, "psvae", "--config", TINY_SVAE.with_name("psvae_tiny.yaml"),
                         f"data.source={photo_dir}", "model.init_from=null", f"run.output_dir={tmp_path}")
    assert code == 2 and "model.init_from" in err


def test_psvae_init_from_a_file_that_is_not_an_export_names_the_setting(capsys, photo_dir, tmp_path):
    bad = tmp_path / "vae.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, err = run_main(capsys, "psvae", "--config", TINY_SVAE.with_name("psvae_tiny.yaml"),
                         f"data.source={photo_dir}", f"model.init_from={bad}", f"run.output_dir={tmp_path}")
    assert code == 2 and "model.init_from:" in err and "vae.safetensors" in err


def test_every_file_corrupt_fails_loudly_with_nonzero_exit(tmp_path):
    data = tmp_path / "corrupt"
    data.mkdir()
    for i in range(5):
        (data / f"img{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * (i + 1))
    (data / "notes.pdf").write_bytes(b"%PDF-1.4")
    (data / "empty.png").write_bytes(b"")
    result = cli("svae", "--config", TINY_SVAE, f"data.source={data}", f"run.output_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stderr
    assert "no usable images" in result.stderr
    assert "5 unreadable or truncated" in result.stderr or "5 not an image" in result.stderr
    assert "1 empty file" in result.stderr and "1 not an image file type" in result.stderr


def test_dataset_smaller_than_one_batch(capsys, tmp_path):
    data = tmp_path / "few"
    photos(data, 32)
    for extra in list(data.iterdir())[3:]:
        extra.unlink()
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={data}", "train.batch_size=4",
                         f"run.output_dir={tmp_path / 'runs'}")
    assert code == 2 and "3 usable images, fewer than one optimiser step's batch" in err


def test_folder_skips_and_reports_odd_files(photo_dir, tmp_path):
    data = tmp_path / "mixed"
    (data / "sub").mkdir(parents=True)
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(data / "sub" / "transparent.png")
    Image.new("L", (50, 50), 128).save(data / "grey.jpg")
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / "caption.txt").write_text("a caption is not an image")
    (data / ".hidden.png").write_bytes(b"junk")
    ds, report = build_image_dataset(str(data), 32)
    assert len(ds) == 2 and report.found == 3 and sum(report.skipped.values()) == 1
    item = ds[[i for i, n in enumerate(ds.names) if n.endswith("transparent.png")][0]]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert item["image"].min() == 255  # transparency composited over white


def test_manifests_jsonl_and_csv(photo_dir, tmp_path):
    files = sorted(p.name for p in photo_dir.iterdir())
    jsonl = photo_dir / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps({"file_name": f}) for f in files[:5]) + "\n")
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("path,label\n" + "".join(f"{photo_dir / f},x\n" for f in files[:4]) + "missing.png,y\n")
    ds, report = build_image_dataset(str(jsonl), 32)
    assert len(ds) == 5 and report.kind == "manifest"
    ds, report = build_image_dataset(str(csv_file), 32)
    assert len(ds) == 4 and report.skipped["missing file"] == 1
    jsonl.unlink()


def test_global_sampler_matches_across_process_layouts():
    """Every split of global batch 4 (processes x batch x accumulation) sees the same samples at
    every step, across epoch boundaries; resuming at a step continues the order."""
    def steps(batch, world, accum, start=0, count=7):
        samplers = [iter(GlobalBatchSampler(10, batch, world, r, seed=3, accum=accum, start_step=start))
                    for r in range(world)]
        # A step's samples in the sampler's order: micro-batch by micro-batch, process by process.
        return [[i for _ in range(accum) for s in samplers for i in next(s)] for _ in range(count)]

    one = steps(4, 1, 1)  # 2 steps per epoch (10 items, tail of 2 dropped): crosses epoch boundaries
    assert steps(2, 2, 1) == one and steps(2, 1, 2) == one and steps(1, 2, 2) == one and steps(1, 1, 4) == one
    assert steps(4, 1, 1, start=5, count=2) == one[5:7] and steps(1, 2, 2, start=5, count=2) == one[5:7]
    with pytest.raises(DataError, match="fewer than one optimiser step's batch"):
        GlobalBatchSampler(3, 2, 2, 0, seed=0)
    with pytest.raises(DataError, match="train.grad_accum"):
        GlobalBatchSampler(7, 2, 1, 0, seed=0, accum=4)


@pytest.mark.parametrize("name", ["svae_paper", "psvae_paper", "rae_paper", "svae_tiny", "psvae_tiny",
                                  "svae_demo", "psvae_demo"])
def test_shipped_configs_validate(capsys, name):
    from trainer.config import load_config
    from trainer.vae_stages import VAEConfig, model_config

    path = TINY_SVAE.with_name(f"{name}.yaml")
    stage = path.read_text().split("stage: ", 1)[1].split()[0]
    cfg = load_config(VAEConfig, stage, str(path), ["data.source=/x", "model.init_from=/y.safetensors"])
    assert cfg.stage == stage
    model_config(cfg.model, "psvae")  # preset + overrides form a valid PSVAEConfig


def test_an_output_dir_through_a_file_or_read_only_is_refused_naming_folder_and_free_space(
        capsys, photo_dir, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}",
                         f"run.output_dir={tmp_path / 'a_file' / 'runs'}")
    assert code == 2 and f"cannot write {tmp_path / 'a_file' / 'runs' / 'svae_tiny'}" in err, err
    assert " free)" in err and "set run.output_dir to a writable folder" in err
    # Root ignores chmod: a read-only folder is simulated where the trainer creates the run folder.
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}",
                         f"run.output_dir={tmp_path / 'ro'}")
    assert code == 2 and f"cannot write {tmp_path / 'ro' / 'svae_tiny'}" in err and "Permission denied" in err, err


def test_disk_full_while_saving_says_so_and_keeps_the_previous_checkpoint(capsys, photo_dir, tmp_path, monkeypatch):
    from trainer import checkpointing

    real_save = checkpointing.save_object

    def full_at_step_4(path, obj):
        if ".step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, obj)

    monkeypatch.setattr(checkpointing, "save_object", full_at_step_4)
    code, err = run_main(capsys, "svae", "--config", TINY_SVAE, f"data.source={photo_dir}", f"run.output_dir={tmp_path}",
                         "data.image_size=64", "model.overrides.encoder.image_size=56", "train.max_steps=4",
                         "checkpoint.every=2")
    root = tmp_path / "svae_tiny" / "checkpoints"
    assert code == 2 and f"disk full while writing checkpoint step_00000004 in {root}" in err, err
    assert "checkpoint.resume=latest" in err
    assert [p.name for p in sorted(root.iterdir())] == ["step_00000002"]  # kept; the partial one removed
