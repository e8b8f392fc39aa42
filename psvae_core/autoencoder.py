"""PSVAE: the autoencoder, shaped like diffusers' AutoencoderKL (encode returns a posterior).

    image -> RepresentationEncoder -> f_h [B,D,16,16]
          -> E_s -> posterior over z [B,C,16,16]   (mode "psvae"; in mode "rae" z = f_h)
    z -> PixelDecoder -> image [B,3,256,256]
    z -> D_s -> f_h'' (semantic reconstruction, trained against the frozen encoder)

The generator works on normalised latents (`normalize_latents`); the pixel decoder on raw ones.
The per-channel latent stats are buffers, so they travel inside every checkpoint.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from . import checkpoint
from .config import PSVAEConfig
from .distributions import DiagonalGaussian
from .encoders import RepresentationEncoder, file_names
from .images import to_model_images
from .pixel_decoder import build_pixel_decoder
from .preview import fit_latent_to_rgb, latent_to_rgb
from .semantic import SemanticDecoder, SemanticEncoder

CHECKPOINT_KIND = "vae"


@dataclass
class AutoencoderOutput:
    """Everything one training step needs from a forward pass."""

    features: torch.Tensor  # f_h from the (possibly trainable) encoder
    posterior: DiagonalGaussian
    latents: torch.Tensor  # z fed to the decoders
    images: torch.Tensor  # pixel reconstruction, 0..1 space, not clamped
    reconstructed_features: Optional[torch.Tensor]  # D_s(z); None in RAE mode


class PSVAE(nn.Module):
    def __init__(self, config: PSVAEConfig, encoder: Optional[RepresentationEncoder] = None):
        super().__init__()
        self.encoder = encoder if encoder is not None else RepresentationEncoder(config.encoder)
        self.config = config.replace(encoder=self.encoder.config)
        width = self.encoder.hidden_size
        self.semantic_encoder = self.semantic_decoder = None
        if config.mode == "psvae":
            sem = config.semantic
            self.semantic_encoder = SemanticEncoder(
                width, config.latent_channels, self.encoder.make_blocks(sem.depth, sem.block_init), sem.proj_hidden)
            self.semantic_decoder = SemanticDecoder(
                width, config.latent_channels, self.encoder.make_blocks(sem.depth, sem.block_init), sem.proj_hidden)
        channels = self.latent_channels
        self.pixel_decoder = build_pixel_decoder(config.pixel_decoder, channels)
        self.register_buffer("latents_mean", torch.zeros(channels))
        self.register_buffer("latents_std", torch.ones(channels))
        # Live-preview colours (psvae_core.preview), fitted by the trainer at export; grey until then.
        self.register_buffer("latent_rgb_weight", torch.zeros(3, channels))
        self.register_buffer("latent_rgb_bias", torch.full((3,), 0.5))

    @classmethod
    def from_pretrained_encoder(cls, config: PSVAEConfig, source: str) -> "PSVAE":
        """A new autoencoder around real encoder weights (hub id or local folder). The encoder
        settings of `config` apply; image_mean/image_std left None come from the folder."""
        enc = config.encoder
        settings = dict(image_size=enc.image_size, feature_norm=enc.feature_norm, resize_antialias=enc.resize_antialias)
        settings.update({k: v for k, v in (("image_mean", enc.image_mean), ("image_std", enc.image_std)) if v is not None})
        encoder = RepresentationEncoder.from_pretrained(source, family=enc.family, **settings)
        return cls(config, encoder=encoder)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels if self.config.mode == "psvae" else self.encoder.hidden_size

    @property
    def upsample_factor(self) -> int:
        return self.config.pixel_decoder.upsample_factor

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        return self.encoder.grid_size(height, width)

    # --- the AutoencoderKL-shaped API -------------------------------------------------------
    def semantic_features(self, images) -> torch.Tensor:
        return self.encoder(to_model_images(images))

    def posterior_from_features(self, features: torch.Tensor) -> DiagonalGaussian:
        if self.semantic_encoder is None:
            return DiagonalGaussian(features)  # RAE: the features are the latent
        return self.semantic_encoder(features)

    def encode(self, images) -> DiagonalGaussian:
        """Images ([B,3,H,W] 0..1, or anything `to_model_images` takes) -> posterior over z."""
        return self.posterior_from_features(self.semantic_features(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images in 0..1 space (not clamped, so losses see the true output)."""
        self._check_latents(latents)
        return self.pixel_decoder(latents) * 0.5 + 0.5

    def decode_features(self, latents: torch.Tensor) -> torch.Tensor:
        """D_s: latents -> reconstructed encoder features."""
        if self.semantic_decoder is None:
            return latents
        return self.semantic_decoder(latents)

    @torch.no_grad()
    def reconstruct(self, images, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        posterior = self.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z).clamp(0.0, 1.0)

    def forward(self, images=None, sample: bool = True, generator: Optional[torch.Generator] = None,
                detach_pixel_input: bool = False, *, features: Optional[torch.Tensor] = None,
                latent_noise: Optional[torch.Tensor] = None,
                decoder_noise: Optional[torch.Tensor] = None) -> AutoencoderOutput:
        """One full pass, the one training uses: features -> posterior -> z -> D_s(z), pixels(z).

        features: the encoder's features of `images` when already computed (a frozen encoder, a
            feature cache); `images` is then not read.
        sample: z is drawn from the posterior (with `latent_noise` when given, else from
            `generator`); False: z is the posterior mode.
        detach_pixel_input: stage 1's `f_l.detach()` (docs/PAPER.md §2): L_P does not reach E_s.
        decoder_noise: added to the pixel decoder's input (RAE's noise augmentation).
        """
        if features is None:
            features = self.semantic_features(images)
        posterior = self.posterior_from_features(features)
        z = posterior.sample(generator, noise=latent_noise) if sample else posterior.mode()
        recon_features = self.semantic_decoder(z) if self.semantic_decoder is not None else None
        pixel_in = z.detach() if detach_pixel_input else z
        if decoder_noise is not None:
            pixel_in = pixel_in + decoder_noise
        return AutoencoderOutput(features, posterior, z, self.decode(pixel_in), recon_features)

    def set_grad_checkpointing(self, enabled: bool = True) -> int:
        """Recompute block activations in the backward pass (less memory); returns the block count.

        transformers' convention, which the pixel-decoder blocks share: each layer reads
        `gradient_checkpointing` in its own call (in training mode only), so deep copies made
        later (the teacher, EMA copies) keep computing with their own weights.
        """
        run = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        blocks = [m for m in self.modules() if isinstance(m, GradientCheckpointingLayer)]
        for block in blocks:
            block.gradient_checkpointing, block._gradient_checkpointing_func = enabled, run
        return len(blocks)

    # --- latent normalisation (the generator's space) ---------------------------------------
    def _stats(self, latents):
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        return (self.latents_mean.view(shape).to(latents.dtype), self.latents_std.view(shape).to(latents.dtype))

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return latents * std + mean

    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.latents_mean.shape or std.shape != self.latents_std.shape:
            raise ValueError(f"latent stats must have shape [{self.latent_channels}]")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("latent stats must be finite with a positive std")
        self.latents_mean.copy_(mean)
        self.latents_std.copy_(std)

    @torch.no_grad()
    def fit_preview(self, latents: torch.Tensor, images: torch.Tensor) -> None:
        """Fit the latent -> RGB preview map on raw latents and the images they came from."""
        self.set_preview(*fit_latent_to_rgb(latents, images))

    @torch.no_grad()
    def set_preview(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Store a fitted preview map (weight [3,C], bias [3]; `psvae_core.preview`)."""
        self.latent_rgb_weight.copy_(weight)
        self.latent_rgb_bias.copy_(bias)

    def preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> a [B,3,h,w] colour preview (one tiny matmul, no decoder)."""
        return latent_to_rgb(latents, self.latent_rgb_weight, self.latent_rgb_bias)

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"this VAE takes latents [B,{self.latent_channels},h,w]; got {tuple(latents.shape)}. "
                "The latent was probably made by another VAE: encode with this one.")

    # --- files -------------------------------------------------------------------------------
    def save(self, path, provenance: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> None:
        """Tensors go under their names in files (`encoders.file_names`), whatever transformers is installed."""
        name = file_names(self)
        tensors = {name(k): (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                   for k, v in self.state_dict().items()}
        stats = {"mean": self.latents_mean.tolist(), "std": self.latents_std.tolist()}
        checkpoint.save_component(path, kind=CHECKPOINT_KIND, config=self.config.to_dict(), tensors=tensors,
                                  latent_stats=stats, provenance=provenance)

    @classmethod
    def from_file(cls, path, device="cpu") -> "PSVAE":
        """Load an exported VAE file straight onto `device` (float32, as built; the latent stats stay
        exact whatever the weights are cast to later); every problem raises `checkpoint.CheckpointError`."""
        component = checkpoint.load_component(path, expected_kind=CHECKPOINT_KIND, read_tensors=False)
        try:
            config = PSVAEConfig.from_dict(component.config)
            if config.encoder.hf_config is None:
                raise ValueError("it has no encoder.hf_config")
        except (TypeError, ValueError) as err:
            raise checkpoint.CheckpointError(f"{path}: the stored config is not valid ({err}); re-export the file") from err
        model = checkpoint.build_checked(path, component, lambda: cls(config), names=file_names, device=device)
        std = model.latents_std
        if not (std > 0).all():
            raise checkpoint.CheckpointError(f"{path}: its latents_std holds {int((std <= 0).sum())} zero or negative "
                                             "value(s), so every normalised latent would be Inf/NaN; re-export it")
        model.provenance = component.provenance
        return model.eval()
