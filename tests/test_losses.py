"""psvae_core.losses: exact values on hand-computed inputs; LPIPS offline with file weights."""
import logging
import math
import os
import socket

import lpips
import pytest
import torch
import torch.nn.functional as F
import torchvision

from psvae_core import losses
from psvae_core.losses import (LPIPSLoss, PatchGANDiscriminator, adaptive_gan_weight, generator_adv_loss,
                               hinge_d_loss, kl_loss, l1_loss, semantic_loss, vanilla_d_loss)


# ---------------------------------------------------------------------------------------------
# Semantic, KL, L1
# ---------------------------------------------------------------------------------------------

def test_semantic_loss_zero_on_identical_features():
    f = torch.randn(2, 8, 4, 4)
    total, parts = semantic_loss(f, f.clone())
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert parts["l2"].item() == 0.0 and parts["cos"].item() == pytest.approx(0.0, abs=1e-6)


def test_semantic_loss_hand_values_tokens():
    # token 1: orthogonal unit vectors -> squared error 2 over 3 dims, cos term 1.
    # token 2: pred = 2 * target, target = (1, 2, 2) -> squared error 9 over 3 dims, cos term 0.
    pred = torch.tensor([[[1.0, 0.0, 0.0], [2.0, 4.0, 4.0]]])
    target = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 2.0, 2.0]]])
    total, parts = semantic_loss(pred, target, l2_weight=2.0, cos_weight=3.0)
    l2, cos = (2 + 9) / 6, (1 + 0) / 2
    assert parts["l2"].item() == pytest.approx(l2, rel=1e-6)
    assert parts["cos"].item() == pytest.approx(cos, abs=1e-6)
    assert total.item() == pytest.approx(2 * l2 + 3 * cos, rel=1e-6)
    # opposite vectors: cos term 2
    assert semantic_loss(-target, target)[1]["cos"].item() == pytest.approx(2.0, abs=1e-6)


def test_semantic_loss_feature_map_equals_token_layout_and_has_gradient():
    pred = torch.randn(2, 16, 3, 3, requires_grad=True)
    target = torch.randn(2, 16, 3, 3)
    total, parts = semantic_loss(pred, target)
    tokens = lambda t: t.flatten(2).transpose(1, 2)  # [B,D,h,w] -> [B,N,D]
    total_tok, parts_tok = semantic_loss(tokens(pred), tokens(target))
    assert torch.allclose(total, total_tok, atol=1e-6)
    cos_ref = (1 - F.cosine_similarity(pred, target, dim=1)).mean()
    assert torch.allclose(parts["cos"], cos_ref.detach(), atol=1e-6)
    total.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


class _StandInPosterior:
    """Just what kl_loss reads: .kl() -> [B] summed over latent elements, and .mean."""

    def __init__(self):
        self.mean = torch.zeros(2, 4, 2, 2)  # 16 latent elements per sample

    def kl(self):
        return torch.tensor([3.0, 5.0])


def test_kl_loss_reductions():
    p = _StandInPosterior()
    assert kl_loss(p).item() == pytest.approx(4.0)                    # mean of per-sample sums
    assert kl_loss(p, reduction="mean").item() == pytest.approx(4.0 / 16)  # per element
    with pytest.raises(ValueError, match="reduction"):
        kl_loss(p, reduction="sum")


def test_l1_loss():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    assert l1_loss(x, torch.zeros(2, 2)).item() == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------
# GAN parts
# ---------------------------------------------------------------------------------------------

def test_adversarial_loss_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2  -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2    -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    zeros = torch.zeros(4)
    assert vanilla_d_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert generator_adv_loss(fake).item() == pytest.approx(1 / 3)
    assert generator_adv_loss(zeros, kind="vanilla").item() == pytest.approx(math.log(2))


def test_adaptive_gan_weight_is_the_grad_norm_ratio():
    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[3.0, 4.0]])
    out = layer(x)                    # 11
    rec = ((out - 1.0) ** 2).sum()    # d/dW = 2 * 10 * x -> norm 100
    gan = -3.0 * out.mean()           # d/dW = -3 * x     -> norm 15
    w = adaptive_gan_weight(rec, gan, layer.weight)
    assert w.item() == pytest.approx(100 / (15 + 1e-4), rel=1e-6)
    assert not w.requires_grad
    assert adaptive_gan_weight(rec, gan, layer.weight, max_weight=5.0).item() == 5.0
    (rec + w * gan).backward()        # graphs were retained for the caller
    with torch.no_grad():
        assert adaptive_gan_weight(layer(x).sum(), layer(x).sum(), layer.weight).item() == 0.0


@pytest.mark.parametrize("size, grid", [(256, 30), (64, 6)])
def test_discriminator_patch_grid(size, grid):
    d = PatchGANDiscriminator()
    assert d(torch.randn(1, 3, size, size)).shape == (1, 1, grid, grid)


def test_discriminator_norms_and_init():
    torch.manual_seed(0)
    for norm in ("batch", "group", "none"):
        d = PatchGANDiscriminator(norm=norm, ndf=32)
        assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    d = PatchGANDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    assert convs[3].weight.std().item() == pytest.approx(0.02, rel=0.02)  # 2M weights
    assert convs[1].bias is None and convs[0].bias is not None  # no bias before a norm layer
    with pytest.raises(ValueError, match="norm"):
        PatchGANDiscriminator(norm="instance")


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: any socket connect or torch.hub download fails the test. No stray weights:
    the env var is cleared and torchvision's hub cache points at an empty folder."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.delenv(losses.LPIPS_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision VGG16 state dict with random weights, saved as torchvision saves them."""
    torch.manual_seed(1)
    model = torchvision.models.vgg16(weights=None)
    path = tmp_path_factory.mktemp("weights") / "vgg16-397923af.pth"
    torch.save(model.state_dict(), path)
    return path, model.features.eval()


def _images(seed, n=2, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def _lpips_by_hand(features, x, y):
    """LPIPS v0.1 from its definition, on torchvision's VGG16 `features` and the shipped heads."""
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"),
                       map_location="cpu", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    taps = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def activations(img):
        h, out = ((2 * img - 1) - shift) / scale, []
        for i, layer in enumerate(features[:30]):
            h = layer(h)
            if i in taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (a, b) in enumerate(zip(activations(x), activations(y))):
        weighted = F.conv2d((a - b) ** 2, heads[f"lin{k}.model.1.weight"])
        total = total + weighted.mean((1, 2, 3))
    return total


def test_lpips_random_backbone_offline_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(losses, "_random_backbone_warned", False)
    with caplog.at_level(logging.WARNING, logger=losses.__name__):
        m = LPIPSLoss(net="alex", reduction="none")
        LPIPSLoss(net="alex")
    warned = [r for r in caplog.records if "RANDOM backbone" in r.getMessage()]
    assert len(warned) == 1 and losses.LPIPS_WEIGHTS_ENV in warned[0].getMessage()
    assert m.backbone_source == "random" and not m.pretrained_backbone

    x, y = _images(0), _images(1)
    assert torch.equal(m(x, x), torch.zeros(2))
    d = m(x, y)
    assert d.shape == (2,) and (d > 0).all()
    assert m(x, y, reduction="mean").item() == pytest.approx(d.mean().item())
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training and not m.lpips.lin0.training  # heads' Dropout stays off

    x.requires_grad_(True)
    m(x, y).sum().backward()
    assert x.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_amp = m(x.detach(), y)
    assert d_amp.dtype == torch.float32 and torch.allclose(d_amp, d)


def test_lpips_loads_torchvision_backbone_file(vgg_file):
    path, features = vgg_file
    state = torch.load(path, weights_only=True)
    m = LPIPSLoss(net="vgg", backbone_weights=path, reduction="none")
    assert m.backbone_source == str(path) and m.pretrained_backbone
    backbone = m.lpips.net.state_dict()
    assert len(backbone) == 26  # 13 convs
    for name, tensor in backbone.items():
        assert torch.equal(tensor, state["features." + name.split(".", 1)[1]])

    x, y = _images(2), _images(3)
    with torch.no_grad():
        expected = _lpips_by_hand(features, x, y)
        got = m(x, y)
        random_backbone = LPIPSLoss(net="vgg", reduction="none")(x, y)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got, random_backbone, rtol=1e-2)


def test_lpips_weights_from_env_folder_and_safetensors(monkeypatch, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    state = torchvision.models.squeezenet1_1(weights=None).state_dict()
    torch.save(state, tmp_path / "squeezenet1_1-b8a52dc0.pth")
    monkeypatch.setenv(losses.LPIPS_WEIGHTS_ENV, str(tmp_path))  # a folder with torchvision's name
    m = LPIPSLoss(net="squeeze")
    assert torch.equal(getattr(m.lpips.net.slice2, "3").squeeze.weight, state["features.3.squeeze.weight"])

    st = tmp_path / "squeeze.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    m2 = LPIPSLoss(net="squeeze", backbone_weights=st)
    assert torch.equal(m2.lpips.net.slice7[0].expand3x3.weight, state["features.12.expand3x3.weight"])

    # the alexnet backbone cannot take squeezenet weights: a clear error, not a silent mix
    with pytest.raises(ValueError, match="torchvision alexnet"):
        LPIPSLoss(net="alex", backbone_weights=tmp_path / "squeezenet1_1-b8a52dc0.pth")
    with pytest.raises(FileNotFoundError, match="alexnet"):
        LPIPSLoss(net="alex")  # the env folder has no alexnet file
