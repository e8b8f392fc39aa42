"""The VAE stages' own rules, on a stage object built in-process (no training run)."""
from __future__ import annotations

import copy

import pytest
import torch

from psvae_core.autoencoder import PSVAE
from test_trainer_helpers import TINY_PSVAE, TINY_SVAE
from trainer.config import load_config
from trainer.ema import EMA
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
