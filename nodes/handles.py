"""The PS-VAE models inside ComfyUI's model management (as ComfyUI's own VAE, comfy/sd.py): each is
wrapped in a ModelPatcher, `load_models_gpu` places it (and frees other models when memory is short,
so --lowvram / --novram / --gpu-only / --cpu / --cpu-vae all apply). `ModelHandle` is the common
part; `PSVAEHandle` (here) and `generator.GeneratorHandle` add what each model tells the nodes.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

import comfy.model_management as mm
import comfy.model_patcher

from ..psvae_core.checkpoint import fingerprint as vae_fingerprint
from ..psvae_core.dtypes import SHORT_NAMES, to_dtype
from ..psvae_core.preview import latent_to_rgb

DTYPE_CHOICES = ["auto", *SHORT_NAMES]  # the loader's widget: fp32 | bf16 | fp16, as ComfyUI spells them
# Upper bound on images per batch even when memory allows more: keeps progress ticks and interrupt
# points coming on big batches.
MAX_BATCH = 16

log = logging.getLogger("PS-VAE")


def choose_dtype(choice: str, device: torch.device, auto: Callable[[], torch.dtype]) -> torch.dtype:
    """"auto" = ComfyUI's choice (honours --fp16-vae/--bf16-vae/--fp32-vae etc.); otherwise the
    named dtype, except fp16 on a CPU, which is slow and partly unsupported there: fp32 instead."""
    if choice == "auto":
        return auto()
    if choice not in SHORT_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {choice!r}")
    dtype = to_dtype(choice)
    if dtype == torch.float16 and mm.is_device_cpu(device):
        log.warning("PS-VAE: fp16 is not used on the CPU; running in fp32 instead")
        return torch.float32
    return dtype


class ModelHandle:
    """A psvae_core model inside ComfyUI's model management: the nn.Module (cast to `dtype`, eval,
    frozen) in a ModelPatcher, plus its name. The loader's `vae` and `generator` outputs are ones."""

    def __init__(self, model, name: str, dtype: torch.dtype, load_device, offload_device):
        self.model = model.to(dtype=dtype).eval().requires_grad_(False)
        self.name = name
        self.dtype = dtype
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=load_device,
                                                        offload_device=offload_device)

    @property
    def load_device(self) -> torch.device:
        return self.patcher.load_device

    def element_size(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def load(self, memory_required: int) -> torch.device:
        """Place the model (other models are unloaded to make room) and return its device. Fully
        loaded: psvae_core modules are plain torch modules without ComfyUI's cast-weight hooks, so a
        partial (lowvram) load would leave weights on the wrong device."""
        mm.load_models_gpu([self.patcher], memory_required=memory_required, force_full_load=True)
        return self.load_device


class PSVAEHandle(ModelHandle):
    """What the loader's `vae` output carries: a PSVAE, the path of its file, and float32 copies of
    its latent statistics and preview map."""

    def __init__(self, model, name: str, dtype: torch.dtype, load_device, offload_device, path: Optional[str] = None):
        stats = {k: getattr(model, k).detach().float().clone() for k in ("latents_mean", "latents_std")}
        # CPU float32 copies of the small per-channel tensors the samplers need on every step
        # (normalisation and the latent -> RGB preview), wherever the weights are at the time.
        self._small = {k: getattr(model, k).detach().float().cpu().clone()
                       for k in ("latents_mean", "latents_std", "latent_rgb_weight", "latent_rgb_bias")}
        super().__init__(model, name, dtype, load_device, offload_device)
        for k, v in stats.items():  # the latent stats stay fp32 whatever the weights are
            getattr(self.model, k).data = v
        self.path = path
        self._fingerprint: Optional[str] = None

    # --- facts about the model ---------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.model.latent_channels)

    @property
    def upsample_factor(self) -> int:
        return int(self.model.upsample_factor)

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        gh, gw = self.model.latent_grid(height, width)
        return int(gh), int(gw)

    @property
    def input_size(self) -> Optional[int]:
        """The square size every image is resized to before the encoder, or None ("native" grid)."""
        size = self.model.config.encoder.image_size
        return int(size) if size is not None else None

    @property
    def fixed_grid(self) -> Optional[tuple[int, int]]:
        """The one latent grid this VAE makes (16x16 for 224-px encoders), or None for a native grid."""
        size = self.input_size
        return self.latent_grid(size, size) if size is not None else None

    @property
    def patch_size(self) -> int:
        return int(self.model.encoder.patch_size)

    @property
    def fingerprint(self) -> Optional[str]:
        """sha256 identity of the file (psvae_core.checkpoint.fingerprint); None for a model not loaded from a file."""
        if self._fingerprint is None and self.path is not None:
            self._fingerprint = vae_fingerprint(self.path)
        return self._fingerprint

    @property
    def latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._small["latents_mean"], self._small["latents_std"]

    # --- the generator's space and the live preview (cheap; any device) ---------------------------
    def _stat(self, key: str, like: torch.Tensor) -> torch.Tensor:
        return self._small[key].to(device=like.device, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (LATENT dicts, the decoder's input) -> the generator's normalised space (float32)."""
        return (raw.float() - self._stat("latents_mean", raw)) / self._stat("latents_std", raw)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """The generator's normalised latents -> raw latents (float32)."""
        return latents.float() * self._stat("latents_std", latents) + self._stat("latents_mean", latents)

    def preview(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents [B,C,h,w] -> [B,3,h,w] colours in 0..1 (PSVAE.preview; grey when not fitted)."""
        return latent_to_rgb(raw.float(), self._small["latent_rgb_weight"], self._small["latent_rgb_bias"])

    # --- memory estimates (bytes per image; deliberately generous) ---------------------------------
    def decode_memory(self, h: int, w: int) -> int:
        f = self.upsample_factor
        cfg = self.model.config.pixel_decoder
        width = cfg.base_channels * max(cfg.channel_mult) if cfg.kind == "conv" else cfg.vit_width
        pixels = (h * f) * (w * f)
        return int(pixels * max(cfg.base_channels, 32) * 8 * self.element_size() + h * w * width * 16 * self.element_size()
                   + (h * w) ** 2 * 4 * self.element_size())

    def encode_memory(self, h: int, w: int) -> int:
        gh, gw = self.latent_grid(h, w)
        tokens = gh * gw + 8
        width = int(getattr(self.model.encoder, "hidden_size", 768))
        return int(3 * h * w * 4 * 4 + tokens * width * 24 * self.element_size() + tokens * tokens * 16 * self.element_size())

    def batch_size(self, per_item: int, total: int) -> int:
        free = mm.get_free_memory(self.load_device)
        return max(1, min(total, MAX_BATCH, int(free // max(per_item, 1))))
