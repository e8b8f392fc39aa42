"""Training losses of PS-VAE (docs/PAPER.md §2-§4).

- L_s, the semantic reconstruction loss: L2 + cosine on representation features.
- L_KL: the diagonal-Gaussian KL to N(0, I), reduced as in LDM.
- L_P, the pixel loss "following LDM": L1 + LPIPS + a PatchGAN (hinge loss) whose weight is set
  by LDM's adaptive grad-norm ratio.

The trainer imports these; nothing else in the project may redefine them.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LPIPS_WEIGHTS_ENV = "PSVAE_LPIPS_WEIGHTS"

# lpips net name -> (torchvision architecture, file name of torchvision's ImageNet weights).
LPIPS_BACKBONES = {
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
}

_random_backbone_warned = False


# ---------------------------------------------------------------------------------------------
# Semantic, KL and L1
# ---------------------------------------------------------------------------------------------

def semantic_loss(pred: torch.Tensor, target: torch.Tensor, l2_weight: float = 1.0,
                  cos_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_s = l2_weight * L2 + cos_weight * (1 - cos), between reconstructed and target features.

    Layouts: `[B, D, h, w]` feature maps (the feature dim is dim 1) or `[B, N, D]` / `[B, D]`
    tokens (the feature dim is the last one).

    Reduction (the paper leaves it open, docs/PAPER.md §2):
    - "l2":  mean squared error over *all* elements (B, D and tokens), i.e. per-element MSE.
    - "cos": cosine similarity per token along the feature dim, then the mean of (1 - cos) over
      all B x tokens. It lies in [0, 2]; 1 for orthogonal features.
    Computed in float32. Gradients reach both inputs: detach `target` if it is a teacher output.
    Returns `(total, {"l2": ..., "cos": ...})`; the parts are detached, for logging.
    """
    if pred.shape != target.shape:
        raise ValueError(f"semantic_loss: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} must have the same shape")
    if pred.dim() not in (2, 3, 4):
        raise ValueError(f"semantic_loss: expected [B,D,h,w], [B,N,D] or [B,D], got {tuple(pred.shape)}")
    feature_dim = 1 if pred.dim() == 4 else -1
    pred, target = pred.float(), target.float()
    l2 = F.mse_loss(pred, target)
    cos = (1.0 - F.cosine_similarity(pred, target, dim=feature_dim)).mean()
    total = l2_weight * l2 + cos_weight * cos
    return total, {"l2": l2.detach(), "cos": cos.detach()}


def kl_loss(posterior, reduction: str = "sum_mean") -> torch.Tensor:
    """KL(posterior || N(0, I)) from `posterior.kl()`, the per-sample KL `[B]` summed over latent
    elements (`DiagonalGaussian`).

    reduction:
    - "sum_mean": mean over the batch of the per-sample sums, as in LDM (its kl_weight 1e-6
      assumes this scale).
    - "mean": per latent element, i.e. "sum_mean" divided by C*h*w (read from `posterior.mean`).
    """
    kl = posterior.kl()
    if reduction == "sum_mean":
        return kl.mean()
    if reduction == "mean":
        return kl.mean() / posterior.mean[0].numel()
    raise ValueError(f"kl_loss: reduction must be 'sum_mean' or 'mean', got {reduction!r}")


def l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements (per-element mean, not LDM's per-sample sum)."""
    return F.l1_loss(x.float(), y.float())


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

def resolve_lpips_weights(net: str, backbone_weights) -> Optional[str]:
    """The argument, else $PSVAE_LPIPS_WEIGHTS (a file, or a folder holding torchvision's file
    name), else torchvision's own download cache if the file is already there. Never downloads."""
    file_name = LPIPS_BACKBONES[net][1]
    path = os.fspath(backbone_weights) if backbone_weights else os.environ.get(LPIPS_WEIGHTS_ENV) or None
    if path is None:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
        return cached if os.path.isfile(cached) else None
    if os.path.isdir(path):
        path = os.path.join(path, file_name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LPIPS backbone weights for net={net!r} not found at {path!r} "
                                f"(a torchvision {LPIPS_BACKBONES[net][0]} state dict, e.g. {file_name})")
    return path


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_backbone(backbone: nn.Module, net: str, path: str) -> None:
    """Copy a torchvision state dict into lpips' backbone.

    lpips splits torchvision's `features` Sequential into `slice1..sliceK` but keeps each layer's
    index as its name, so lpips' `sliceK.<i>.<rest>` is torchvision's `features.<i>.<rest>`.
    A features-only state dict (keys `<i>.<rest>`) is accepted too; other keys are ignored.
    """
    state = _load_state_dict_file(path)
    mapped, missing = {}, []
    for name in backbone.state_dict():
        layer_key = name.split(".", 1)[1]
        for key in ("features." + layer_key, layer_key):
            if key in state:
                mapped[name] = state[key]
                break
        else:
            missing.append("features." + layer_key)
    arch = LPIPS_BACKBONES[net][0]
    if missing:
        raise ValueError(f"{path!r} is not a torchvision {arch} state dict (needed by LPIPS "
                         f"net={net!r}): missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    try:
        backbone.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path!r} does not fit a torchvision {arch} (LPIPS net={net!r}): {err}") from err


class LPIPSLoss(nn.Module):
    """LPIPS (lpips package, v0.1 linear heads) on images in 0..1, frozen, always in float32.

    net: "vgg" (LDM's choice, the default), "alex" (the usual metric) or "squeeze".
    backbone_weights: a torchvision ImageNet state dict of the backbone (alexnet / vgg16 /
    squeezenet1_1; `.pth` or `.safetensors`). If None: $PSVAE_LPIPS_WEIGHTS (file, or a folder
    with torchvision's file names), else torchvision's hub cache if the file is there. Without
    weights the backbone stays random: usable for plumbing, but values are not meaningful (a
    warning says so once). `backbone_source` records what was used, for reports.

    Returns per-sample `[B]` (reduction="none") or the batch mean ("mean"). Gradients flow to the
    inputs, never into the LPIPS weights.
    """

    def __init__(self, net: str = "vgg", backbone_weights: Optional[str | os.PathLike] = None,
                 reduction: str = "mean"):
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPSLoss: net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"LPIPSLoss: reduction must be 'mean' or 'none', got {reduction!r}")
        import lpips

        self.net_name, self.reduction = net, reduction
        with warnings.catch_warnings():
            # torchvision's deprecation notes about lpips' `pretrained=` argument.
            warnings.simplefilter("ignore", UserWarning)
            # pnet_rand=True: build the backbone without torchvision's download;
            # pretrained=True: the linear heads that ship inside the lpips wheel.
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        path = resolve_lpips_weights(net, backbone_weights)
        if path is not None:
            _load_backbone(self.lpips.net, net, path)
        else:
            _warn_random_backbone(net)
        self.backbone_source = path or "random"
        self.requires_grad_(False)
        self.eval()

    @property
    def pretrained_backbone(self) -> bool:
        return self.backbone_source != "random"

    def train(self, mode: bool = True):
        # Stays in eval mode (the heads contain Dropout) when a parent module calls .train().
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: Optional[str] = None) -> torch.Tensor:
        # float32 even under autocast: LPIPS unit-normalises activations (eps 1e-10, below fp16
        # resolution) and squares them (VGG activations reach ~1e3, whose squares overflow fp16).
        with torch.autocast(device_type=x.device.type, enabled=False):
            d = self.lpips(x.float(), y.float(), normalize=True)  # normalize: 0..1 -> [-1, 1]
        d = d.reshape(d.shape[0])
        return d.mean() if (reduction or self.reduction) == "mean" else d


def _warn_random_backbone(net: str) -> None:
    global _random_backbone_warned
    if _random_backbone_warned:
        return
    _random_backbone_warned = True
    arch, file_name = LPIPS_BACKBONES[net]
    logger.warning(
        "LPIPS (net=%r) has a RANDOM backbone: its values are not meaningful (plumbing only). "
        "Pass backbone_weights= or set %s to torchvision's %s ImageNet weights (%s, a file or the "
        "folder holding it); they cannot be downloaded here.", net, LPIPS_WEIGHTS_ENV, arch, file_name)


# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator and adversarial losses
# ---------------------------------------------------------------------------------------------

def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(32, channels)
    return nn.Identity()


class PatchGANDiscriminator(nn.Module):
    """pix2pix / LDM `NLayerDiscriminator`: 4x4 convs, LeakyReLU 0.2, `n_layers` stride-2 stages
    then two stride-1 convs, one logit per patch (70x70 receptive field for n_layers=3).

    Output `[B, 1, h, w]`: 30x30 for a 256-px input and 6x6 for 64 px (n_layers=3).
    norm: "batch" (LDM), "group" (32 groups; batch-size independent) or "none".
    Feed images in [-1, 1] as LDM does. Init: conv weights N(0, 0.02), norm weights N(1, 0.02).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"PatchGANDiscriminator: norm must be 'batch', 'group' or 'none', got {norm!r}")
        use_bias = norm == "none"  # a norm layer's affine shift makes a conv bias redundant
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=use_bias),
                       _norm_layer(norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - D(real))) + mean(relu(1 + D(fake))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating BCE: 0.5 * (mean(softplus(-D(real))) + mean(softplus(D(fake))))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator side: "hinge" = -mean(D(fake)) (LDM); "vanilla" = mean(softplus(-D(fake))) (RAE)."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"generator_adv_loss: kind must be 'hinge' or 'vanilla', got {kind!r}")


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                        max_weight: float = 1e4, eps: float = 1e-4, grad_reduce=None) -> torch.Tensor:
    """LDM's adaptive weight: ||d rec / d W|| / (||d gan / d W|| + eps), W the decoder's last layer
    weight, clamped to [0, max_weight] and detached. The caller multiplies by its disc_weight.

    The graphs are kept (retain_graph) for the caller's backward. Outside training (a loss with
    no graph, e.g. under no_grad) it returns 0, as LDM does in validation.
    `grad_reduce` (optional) maps each gradient before its norm is taken; data-parallel training
    passes a cross-process mean so every process uses the global-batch weight.
    """
    if not (rec_loss.requires_grad and gan_loss.requires_grad):
        return torch.zeros((), device=rec_loss.device)
    rec_grad, = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    if grad_reduce is not None:
        rec_grad, gan_grad = grad_reduce(rec_grad), grad_reduce(gan_grad)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
