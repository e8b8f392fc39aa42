"""Regional compilation (psvae_core/compile.py, `train.compile`): a compiled training step equals the
plain one in float32, gradient checkpointing still works through compiled blocks, and copies made
after compiling (EMA copies, a teacher) compute with their own weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from psvae_core import losses
from psvae_core.autoencoder import PSVAE
from psvae_core.compile import compile_blocks
from psvae_core.config import PRESETS
from psvae_core.fusion import FusionDiffuser
from test_trainer_generator import _losses, _t2i, assets  # noqa: F401  (a fixture)
from tiny_models import one_thread  # noqa: F401  (an autouse fixture)
from trainer.ema import EMA

TOL = dict(rtol=1e-5, atol=1e-5)


def small_psvae() -> PSVAE:
    """One encoder layer, one semantic block each way, a two-level pixel decoder (56 px -> a 4x4 grid -> 8 px)."""
    cfg = PRESETS["tiny"]
    enc = cfg.encoder.replace(image_size=56, hf_config={**cfg.encoder.hf_config, "num_hidden_layers": 1})
    torch.manual_seed(0)
    return PSVAE(cfg.replace(encoder=enc, pixel_decoder=cfg.pixel_decoder.replace(
        channel_mult=(1, 2), num_res_blocks=1))).train()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _step(model, loss_fn) -> tuple[torch.Tensor, dict]:
    """One SGD step of LR 1, so the update is the gradient itself (Adam's first step is g/|g|, which
    turns the rounding of a near-zero gradient into a whole LR); returns the loss and the new weights."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = loss_fn(model)
    loss.backward()
    opt.step()
    return loss.detach(), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_step(plain, compiled, loss_fn):
    loss, weights = _step(plain, loss_fn)
    loss_c, weights_c = _step(compiled, loss_fn)
    torch.testing.assert_close(loss_c, loss, **TOL)
    assert weights.keys() == weights_c.keys()  # compiling renames nothing (checkpoints keep their keys)
    for k in weights:
        torch.testing.assert_close(weights_c[k], weights[k], **TOL, msg=lambda m, k=k: f"{k}: {m}")


def test_a_compiled_t2i_step_equals_the_plain_step():
    torch.manual_seed(0)
    plain = FusionDiffuser.from_preset("tiny").train()
    for p in plain.head.parameters():  # the zero-initialised head would hide the backbone's gradients
        torch.nn.init.normal_(p, std=0.05)
    compiled = copy.deepcopy(plain)
    # The LM's 2 decoder layers (fusion_backbone.DecoderLayer) and the DDT head's block.
    assert compile_blocks(compiled) == 3
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    ids, mask = torch.randint(2, 200, (2, 6), generator=g), torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    t = torch.tensor([0.3, 0.8])
    before = _graphs()
    _assert_same_step(plain, compiled, lambda m: m.training_loss(x0, (ids, mask), t=t, noise=noise))
    assert _graphs() > before  # the compiled code ran


def _psvae_loss(images):
    def loss(model):
        out = model(images, sample=False)
        semantic, _ = losses.semantic_loss(out.reconstructed_features, out.features.detach())
        target = images[..., :out.images.shape[-2], :out.images.shape[-1]]  # 56 px in, 8 px out
        return semantic + losses.l1_loss(out.images, target) + 1e-3 * losses.kl_loss(out.posterior)
    return loss


def test_a_compiled_psvae_step_with_gradient_checkpointing_equals_the_plain_step():
    plain = small_psvae()
    plain.encoder.set_trainable(True)  # stage 2: gradients through the encoder's layers too
    compiled = copy.deepcopy(plain)
    blocks = compiled.set_grad_checkpointing(True)
    # Encoder layer, E_s and D_s blocks; the decoder: 6 ResNet blocks and 3 attention blocks.
    assert compile_blocks(compiled) == blocks == 12
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    before = _graphs()
    _assert_same_step(plain, compiled, _psvae_loss(images))
    assert _graphs() > before


def test_copies_made_after_compiling_keep_their_own_weights():
    student = small_psvae()
    clean = copy.deepcopy(student)
    compile_blocks(student)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    teacher = student.encoder.frozen_copy()
    ema_copy = EMA(student, decay=0.9).copy_of(student).train()
    with torch.no_grad():
        before = teacher(images)
        for p in student.parameters():  # the student moves on; its copies must not follow
            p.add_(torch.randn_like(p) * 0.1)
        assert not torch.allclose(student.encoder(images), before)
        torch.testing.assert_close(teacher(images), before, rtol=0, atol=0)
    # Training mode with gradients on, the way the compiled graphs were built.
    z = ema_copy.encode(images).mean
    torch.testing.assert_close(z, clean.encode(images).mean, **TOL)
    torch.testing.assert_close(ema_copy.decode(z.detach()), clean.decode(z.detach()), **TOL)


def test_compile_blocks_refuses_an_unknown_mode_and_is_idempotent():
    model = small_psvae()
    with pytest.raises(ValueError, match="compile mode must be one of"):
        compile_blocks(model, "fastest")
    assert compile_blocks(model) == compile_blocks(model) == 12
    forwards = [vars(m)["forward"] for m in model.modules() if "forward" in vars(m)]
    compile_blocks(model)
    again = [vars(m)["forward"] for m in model.modules() if "forward" in vars(m)]
    assert len(again) == len(forwards) == 12 and all(a is b for a, b in zip(again, forwards))  # not wrapped twice


@pytest.mark.slow  # two CLI runs, one compiling (about 2 min on 2 busy cores with a cold compile cache)
def test_train_compile_trains_the_t2i_stage_like_the_plain_run(assets, tmp_path):
    common = ["train.max_steps=3", "checkpoint.every=0"]
    plain = _t2i(assets, "plain", *common, out=tmp_path)
    compiled = _t2i(assets, "compiled", *common, "train.compile=true", out=tmp_path)
    assert plain.returncode == 0 and compiled.returncode == 0, compiled.stderr[-4000:]
    text = compiled.stdout + compiled.stderr
    assert "torch.compile (default) of 3 blocks of 'generator'" in text and "the first step took" in text
    assert "torch.compile" not in plain.stdout + plain.stderr
    torch.testing.assert_close(_losses(tmp_path / "compiled"), _losses(tmp_path / "plain"), **TOL)
