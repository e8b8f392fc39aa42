"""Flow matching for the generator (docs/PAPER.md §5.2, §9.3), as pure functions.

Convention (RAE's, the paper's): x_t = (1 - t) x0 + t noise, so t = 1 is pure noise and t = 0 is
data; the model predicts the velocity v = noise - x0. Training draws t logit-normal and shifts it
towards noise by s = sqrt(C P^2 / 16); sampling integrates from t = 1 to t = 0 with Euler steps on a
grid shifted the same way (by the fixed inference shift 3). One sampler serves the ComfyUI nodes,
the trainer's previews and the benchmark outputs, through `generation.generate`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

DEFAULT_STEPS = 50  # paper §4.1: 50-step Euler, shift 3, CFG 6.5
DEFAULT_SHIFT = 3.0
DEFAULT_GUIDANCE = 6.5

# Branches a velocity function is asked for (see `euler_sample`).
COND, IMAGE, UNCOND = "cond", "image", "uncond"

VelocityFn = Callable[[torch.Tensor, torch.Tensor, Sequence[str]], Sequence[torch.Tensor]]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def shift_for_latent(channels: int, patch: int = 1, base_channels: int = 16) -> float:
    """Dimension-dependent shift s = sqrt(C P^2 / (C_base P_base^2)), P_base = 1 (docs/PAPER.md §5.2); 96c -> 2.449."""
    return math.sqrt(channels * patch**2 / base_channels)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = s t / (1 + (s - 1) t): moves time towards noise for s > 1 and keeps 0 and 1 fixed."""
    return shift * t / (1 + (shift - 1) * t)


def train_times(u: torch.Tensor, shift: float = 1.0, loc: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Training times from standard-normal draws `u`: logit-normal(loc, scale) (SD3, RAE), then
    shifted; values in (0, 1). The draws are the caller's (the trainer's are counter-seeded)."""
    return time_shift(torch.sigmoid(loc + scale * u), shift)


def sample_train_times(n: int, shift: float = 1.0, generator: Optional[torch.Generator] = None,
                       loc: float = 0.0, scale: float = 1.0, device=None) -> torch.Tensor:
    """`train_times` of n draws from `generator`; shape [n]."""
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    return train_times(torch.randn(n, generator=generator, device=device), shift, loc, scale)


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim)) if t.ndim else t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The linear path x_t = (1 - t) x0 + t noise; t is a scalar or one value per sample."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d t along the linear path."""
    return noise - x0


def flow_loss(pred_v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
              mask: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
    """Velocity MSE: the mean, or per sample [B] (reduction="none"). `mask` (broadcastable to pred_v,
    e.g. [B] or [B,1,h,w]) weights the elements of the mean, so only target samples/tokens count."""
    se = (pred_v.float() - velocity_target(x0, noise).float()) ** 2
    if reduction == "none":
        return se.flatten(1).mean(1)
    if mask is None:
        return se.mean()
    w = _bcast(mask, se).float().expand_as(se)
    return (se * w).sum() / w.sum().clamp_min(1e-12)


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean estimate implied by a velocity: x0 = x_t - t v."""
    return x_t - _bcast(t, x_t) * v


def sampling_schedule(steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, denoise: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), shifted (RAE: t_grid = shift(1 - linspace(0, 1))).

    denoise < 1 (img2img) keeps the part of that path below the unshifted time `denoise`: the grid
    starts at time_shift(denoise), where the full schedule is after a fraction 1 - denoise of its
    length, and spreads all `steps` over the rest (much as ComfyUI's KSampler treats its denoise)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    return time_shift(torch.linspace(float(denoise), 0.0, steps + 1, dtype=torch.float64), shift)


def guide(preds: Sequence[torch.Tensor], guidance: float, image_guidance: Optional[float] = None) -> torch.Tensor:
    """Combine branch predictions. (cond, uncond): classifier-free uncond + w (cond - uncond).
    (cond, image, uncond): OmniGen's dual guidance uncond + w_img (image - uncond) + w_txt (cond - image)."""
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        cond, uncond = preds
        return uncond + guidance * (cond - uncond)
    cond, image, uncond = preds
    return uncond + image_guidance * (image - uncond) + guidance * (cond - image)


def branches_for(guidance: float, image_guidance: Optional[float] = None) -> tuple[str, ...]:
    """Which predictions a step needs: none extra when guidance is off (scale 1)."""
    if image_guidance is not None:
        return (COND, IMAGE, UNCOND) if (guidance, image_guidance) != (1.0, 1.0) else (COND,)
    return (COND, UNCOND) if guidance != 1.0 else (COND,)


def make_noise(shape, seed: int | torch.Generator = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Starting noise drawn on the CPU, so one seed gives the same picture on every device."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: torch.Tensor, steps: int = DEFAULT_STEPS,
                 shift: float = DEFAULT_SHIFT, guidance: float = DEFAULT_GUIDANCE,
                 image_guidance: Optional[float] = None,
                 cfg_interval: Optional[tuple[float, float]] = None,
                 callback: Optional[Callback] = None, init: Optional[torch.Tensor] = None,
                 denoise: float = 1.0) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with `steps` Euler steps on the shifted grid.

    velocity_fn(x, t, branches) returns one prediction per requested branch name: "cond" (all
        conditions), "uncond" (none), and for dual guidance "image" (the source image, no text);
        `t` is a [B] tensor. A model batches the branches into one forward pass.
    guidance: text (classifier-free) scale; 1 = off, and then no unconditional pass is made.
    image_guidance: not None switches to dual guidance (editing, OmniGen) with this image scale.
    cfg_interval: (t_lo, t_hi); guidance only for t in that closed interval, plain "cond" elsewhere.
    callback(step, total, x, x0_pred) after every step: progress bars, previews; an interrupt is an
        exception raised there (ComfyUI's way), which stops sampling.
    init, denoise (img2img): start at t0 = `sampling_schedule(steps, shift, denoise)[0]` from
        `interpolate(init, noise, t0)`, the clean latents `init` (like noise, or a batch of one)
        noised to that time. denoise 1 starts from the noise itself, whatever `init` holds.
    Deterministic: no randomness here; draw `noise` with a seeded generator (`make_noise`).
    """
    ts = sampling_schedule(steps, shift, denoise)
    if init is None and denoise != 1.0:
        raise ValueError("denoise < 1 needs the init latents to start from")
    x = noise if init is None or denoise == 1.0 else interpolate(init.to(noise), noise, float(ts[0]))
    for i in range(steps):
        t, t_next = float(ts[i]), float(ts[i + 1])
        inside = cfg_interval is None or cfg_interval[0] <= t <= cfg_interval[1]
        branches = branches_for(guidance, image_guidance) if inside else (COND,)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        preds = velocity_fn(x, tt, branches)
        if len(preds) != len(branches):
            raise ValueError(f"velocity_fn returned {len(preds)} predictions for branches {branches}")
        v = guide(preds, guidance, image_guidance)
        x_next = x + (t_next - t) * v
        if callback is not None:
            callback(i + 1, steps, x_next, x0_from_velocity(x, v, t))
        x = x_next
    return x
