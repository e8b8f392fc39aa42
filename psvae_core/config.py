"""Configs of the autoencoder half, as plain dataclasses that round-trip through JSON.

A checkpoint stores `PSVAEConfig.to_dict()` in its metadata, so a file rebuilds its model with no
other file. Presets are data (`PRESETS`), not code.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

ENCODER_FAMILIES = ("dinov2", "dinov2_reg", "dinov3", "siglip", "siglip2", "clip")
FEATURE_NORMS = ("layernorm", "affine", "none")


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass `cls` from a dict, refusing unknown keys (a typo must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        sub = _NESTED.get((cls.__name__, f.name))
        if sub is not None and isinstance(value, dict):
            value = sub.from_dict(value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


class _Serialisable:
    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return _from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EncoderConfig(_Serialisable):
    """Which representation encoder, and how its features are read (docs/PAPER.md §1).

    family: one of ENCODER_FAMILIES ("dinov2_reg" = DINOv2 with registers, the paper's default).
    hf_config: the full transformers config dict; it alone rebuilds the architecture.
    source: hub id or local folder the weights first came from (provenance only).
    image_size: every input is resized (bicubic) to this square size before the encoder; 224 with
        patch 14 gives the 16x16 grid. None = "native": each side is rounded to the nearest multiple
        of the patch size, so a 448-px input gives a 32x32 grid.
    feature_norm: "layernorm" = final LayerNorm without affine (RAE), "affine" = the model's own
        final norm, "none" = the raw last hidden state.
    image_mean / image_std: None = the family's (or the folder's preprocessor_config.json) values.
    """

    family: str = "dinov2_reg"
    hf_config: Optional[dict] = None
    source: Optional[str] = None
    image_size: Optional[int] = 224
    feature_norm: str = "layernorm"
    image_mean: Optional[tuple] = None
    image_std: Optional[tuple] = None

    def __post_init__(self):
        if self.family not in ENCODER_FAMILIES:
            raise ValueError(f"encoder family {self.family!r} is not supported; use one of {ENCODER_FAMILIES}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm {self.feature_norm!r} is not one of {FEATURE_NORMS}")


@dataclass(frozen=True)
class SemanticConfig(_Serialisable):
    """E_s / D_s (docs/PAPER.md §2): `depth` transformer blocks at the encoder width plus an MLP.

    block_init: "copy" = the blocks are copies of the encoder's last `depth` blocks (weights
        included: the literal reading of "inherited from the encoder", the default);
        "fresh" = blocks of the same design, freshly initialised.
    proj_hidden: hidden width of the projection MLP (None = the encoder width).
    """

    depth: int = 3
    block_init: str = "copy"
    proj_hidden: Optional[int] = None

    def __post_init__(self):
        if self.block_init not in ("copy", "fresh"):
            raise ValueError(f"semantic.block_init must be 'copy' or 'fresh', not {self.block_init!r}")
        if self.depth < 0:
            raise ValueError("semantic.depth must be >= 0")


@dataclass(frozen=True)
class PixelDecoderConfig(_Serialisable):
    """Pixel decoder (docs/PAPER.md §3). kind="conv": LDM-style ResNet decoder, x2**(len(channel_mult)-1)
    upsampling (x16 by default: 16x16 latent -> 256 px). kind="vit": RAE-style ViT decoder whose
    tokens are unpatchified with patch `vit_patch` (16 -> x16)."""

    kind: str = "conv"
    base_channels: int = 128
    channel_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attention: bool = True  # self-attention in the middle block and at the latent resolution (LDM f16)
    vit_width: int = 768
    vit_depth: int = 12
    vit_heads: int = 12
    vit_patch: int = 16

    def __post_init__(self):
        if self.kind not in ("conv", "vit"):
            raise ValueError(f"pixel_decoder.kind must be 'conv' or 'vit', not {self.kind!r}")

    @property
    def upsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1) if self.kind == "conv" else self.vit_patch


@dataclass(frozen=True)
class PSVAEConfig(_Serialisable):
    """The whole autoencoder. mode="psvae": E_s/D_s + KL latent of `latent_channels`;
    mode="rae": the encoder features themselves are the latent (RAE baseline)."""

    mode: str = "psvae"
    latent_channels: int = 96
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)

    def __post_init__(self):
        if self.mode not in ("psvae", "rae"):
            raise ValueError(f"mode must be 'psvae' or 'rae', not {self.mode!r}")
        if self.mode == "psvae" and not (1 <= self.latent_channels <= 4096):
            raise ValueError(f"latent_channels must be a positive channel count, got {self.latent_channels}")


_NESTED = {
    ("PSVAEConfig", "encoder"): EncoderConfig,
    ("PSVAEConfig", "semantic"): SemanticConfig,
    ("PSVAEConfig", "pixel_decoder"): PixelDecoderConfig,
}

# transformers configs of the encoders the presets use (architecture only; weights come from the user).
DINOV2_B_REG = dict(
    model_type="dinov2_with_registers", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, patch_size=14, image_size=518, num_register_tokens=4, layerscale_value=1.0,
)
TINY_DINOV2_REG = dict(
    model_type="dinov2_with_registers", hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
    intermediate_size=128, patch_size=14, image_size=224, num_register_tokens=4, layerscale_value=1.0,
)

PRESETS: dict[str, PSVAEConfig] = {
    # The paper's model: DINOv2-B with registers, 96 channels, LDM f16 decoder.
    "paper-dinov2-b-96c": PSVAEConfig(
        encoder=EncoderConfig(family="dinov2_reg", hf_config=DINOV2_B_REG,
                              source="facebook/dinov2-with-registers-base"),
    ),
    # Small enough to train on a 2-core CPU in minutes (demo, tests).
    "tiny": PSVAEConfig(
        latent_channels=16,
        encoder=EncoderConfig(family="dinov2_reg", hf_config=TINY_DINOV2_REG),
        semantic=SemanticConfig(depth=1),
        pixel_decoder=PixelDecoderConfig(base_channels=16, channel_mult=(1, 1, 2, 2, 2), num_res_blocks=1),
    ),
}
