"""The VAE stages' own rules, on a stage object built in-process (no training run)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from psvae_core.autoencoder import PSVAE
from test_trainer_helpers import TINY_PSVAE, TINY_SVAE
from trainer.config import load_config
from trainer.ema import EMA
from trainer.rng import derive_seed
from trainer.stage import Context
from trainer.vae_stages import PSVAEStage, SVAEStage, VAEConfig, model_config


def context(tmp_path) -> Context:
    return Context(run_dir=tmp_path, device=torch.device("cpu"), rank=0, world_size=1, seed=0,
                   autocast_dtype=None, reduce_mean=lambda t: t, log=lambda _msg: None)


def stage_of(cls, config, tmp_path, *overrides):
    cfg = load_config(VAEConfig, cls.name, str(config), [f"data.source={tmp_path}", *overrides])
    return cls(cfg, context(tmp_path))


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory):
    """A tiny svae-stage model file, the psvae stage's starting point."""
    cfg = load_config(VAEConfig, "svae", str(TINY_SVAE), ["data.source=unused"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("init") / "vae.safetensors"
    PSVAE(model_config(cfg.model, "psvae")).save(path)
    return path


@pytest.mark.parametrize("checkpointing", [False, True])
def test_teacher_and_ema_copies_keep_their_own_weights(stage1_export, tmp_path, checkpointing):
    stage = stage_of(PSVAEStage, TINY_PSVAE, tmp_path, f"model.init_from={stage1_export}",
                     f"train.grad_checkpointing={str(checkpointing).lower()}")
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        before = stage.teacher(images)
        module = stage.build()[0].module
        ema_copy = EMA(module, decay=0.9).copy_of(module).train()
        for p in stage.vae.parameters():  # the student moves on; its copies must not follow
            p.add_(torch.randn_like(p) * 0.1)
        assert torch.equal(stage.teacher(images), before)
        clean = copy.deepcopy(PSVAE.from_file(stage1_export)).train()
    # The EMA copy holds the init weights: it must compute exactly what a clean model of them does,
    # in training mode with gradients on (where checkpointing is active).
    ema_out = ema_copy.vae.encode(images).mean
    torch.testing.assert_close(ema_out, clean.encode(images).mean, rtol=0, atol=0)
    torch.testing.assert_close(ema_copy.vae.decode(ema_out.detach()), clean.decode(ema_out.detach()), rtol=0, atol=0)


def class_folders(root, classes=4, per_class=5):
    """ImageNet's layout in small: one folder per class, each class its own colour."""
    rng = np.random.default_rng(0)
    for k in range(classes):
        (root / f"class_{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal([60 * k, 220 - 50 * k, 30 * i], 20, (128, 128, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"class_{k}" / f"{i}.png")
    return root


def test_latent_stats_come_from_a_seeded_sample_of_the_whole_set_and_are_recorded(tmp_path):
    data = class_folders(tmp_path / "data")
    stage = stage_of(SVAEStage, TINY_SVAE, tmp_path, f"data.source={data}", "export.stats_images=8", "run.seed=5")
    train, _ = stage.datasets()
    # The documented rule: the first 8 of a permutation of the 20 images seeded by (run.seed, "latent-stats").
    g = torch.Generator().manual_seed(derive_seed(5, "latent-stats"))
    sample = torch.randperm(20, generator=g)[:8].tolist()
    assert len({Path(train.names[i]).parent.name for i in sample}) >= 3  # not the first 8 = two classes
    (tmp_path / "export").mkdir()
    path = stage.export(stage.build()[0].module, tmp_path / "export", {"stage": "svae"})
    exported = PSVAE.from_file(path)
    with torch.no_grad():
        z = stage.vae.encode(torch.stack([train[i]["image"] for i in sample]).float() / 255).mode().double()
    torch.testing.assert_close(exported.latents_mean, z.mean(dim=(0, 2, 3)).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported.latents_std, z.std(dim=(0, 2, 3), correction=0).float(), rtol=1e-4, atol=1e-5)
    record = exported.provenance["latent_stats_sample"]
    assert {k: record[k] for k in ("images", "of", "seed")} == {"images": 8, "of": 20, "seed": 5}
    assert "randperm" in record["rule"] and exported.provenance["latent_stats_images"] == 8


def test_validation_lpips_auto_is_skipped_with_a_note_without_backbone_weights(tmp_path, monkeypatch, caplog):
    from psvae_core import losses
    monkeypatch.delenv(losses.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached torchvision file
    monkeypatch.setattr(losses, "_random_backbone_warned", False)
    notes, warned = [], {}
    for mode in ("auto", "on", "off"):
        cfg = load_config(VAEConfig, "svae", str(TINY_SVAE), [f"data.source={tmp_path}", f"metrics.lpips='{mode}'"])
        ctx = context(tmp_path)
        ctx.log = notes.append
        stage = SVAEStage(cfg, ctx)
        with caplog.at_level("WARNING", logger=losses.__name__):
            metric, again = stage._lpips_metric, stage._lpips_metric
        assert metric is again  # built (or skipped) once per stage
        warned[mode] = sum("RANDOM backbone" in r.getMessage() for r in caplog.records)
        if mode == "on":  # the random-backbone value, as asked
            assert isinstance(metric, losses.LPIPSLoss) and metric.backbone_source == "random"
        else:
            assert metric is None
    assert warned == {"auto": 0, "on": 1, "off": 1}  # auto: the note below instead of the library's warning
    assert [n for n in notes if "validation LPIPS skipped" in n] == [
        "note: validation LPIPS skipped: no AlexNet backbone weights here "
        "(set PSVAE_LPIPS_WEIGHTS, or metrics.lpips=on to report the random-backbone value)"]
