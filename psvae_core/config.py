"""Configs of the autoencoder half, as plain dataclasses that round-trip through JSON.

A checkpoint stores `PSVAEConfig.to_dict()` in its metadata, so a file rebuilds its model with no
other file. Presets are data (`PRESETS`), not code.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

ENCODER_FAMILIES = ("dinov2", "dinov2_reg", "dinov3", "siglip", "siglip2", "clip")
FEATURE_NORMS = ("layernorm", "affine", "none")
# Sane upper bounds: far above any real model, low enough that a typo or a hostile file cannot make
# a loader build (or allocate) something absurd before the weights are even compared.
MAX_LAYERS = 1024
MAX_WIDTH = 65536
MAX_CHANNELS = 4096


def check_int(owner: str, name: str, value, lo: int = 1, hi: int = MAX_WIDTH) -> int:
    """`value` if it is an int (not a bool, not a float) in lo..hi, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{owner}.{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def check_transformer(owner: str, cfg: dict, *, layers: str = "num_hidden_layers") -> None:
    """The sizes a transformers config of a ViT/LM must have to build: positive, bounded, heads dividing the width."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{owner} must be a dict (a transformers config), got {type(cfg).__name__}")
    width = check_int(owner, "hidden_size", cfg.get("hidden_size"))
    check_int(owner, layers, cfg.get(layers), 1, MAX_LAYERS)
    heads = check_int(owner, "num_attention_heads", cfg.get("num_attention_heads"), 1, width)
    if width % heads:
        raise ValueError(f"{owner}.hidden_size {width} must be divisible by num_attention_heads {heads}")
    if "intermediate_size" in cfg:
        check_int(owner, "intermediate_size", cfg["intermediate_size"], 1, 16 * MAX_WIDTH)


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
    resize_antialias: that resize antialiased (default); False resizes as RAE does (plain bicubic,
        torch's antialias=False), so RAE's released decoders and statistics see the pixels they
        were trained on.
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
    resize_antialias: bool = True

    def __post_init__(self):
        if self.family not in ENCODER_FAMILIES:
            raise ValueError(f"encoder family {self.family!r} is not supported; use one of {ENCODER_FAMILIES}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm {self.feature_norm!r} is not one of {FEATURE_NORMS}")
        if self.hf_config is not None:
            check_transformer("encoder.hf_config", self.hf_config)
            check_int("encoder.hf_config", "patch_size", self.hf_config.get("patch_size"), 1, 1024)
            if "num_register_tokens" in self.hf_config:
                check_int("encoder.hf_config", "num_register_tokens", self.hf_config["num_register_tokens"], 0, 1024)
        if self.image_size is not None:
            check_int("encoder", "image_size", self.image_size, 1, 8192)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and not (len(value) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                raise ValueError(f"encoder.{name} must be None or 3 finite numbers, got {value!r}")
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"encoder.image_std must be positive, got {self.image_std!r}")

    @property
    def num_layers(self) -> Optional[int]:
        return None if self.hf_config is None else self.hf_config["num_hidden_layers"]


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
        check_int("semantic", "depth", self.depth, 0, MAX_LAYERS)
        if self.proj_hidden is not None:
            check_int("semantic", "proj_hidden", self.proj_hidden)


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
        check_int("pixel_decoder", "base_channels", self.base_channels, 1, MAX_CHANNELS)
        if not (isinstance(self.channel_mult, (tuple, list)) and 1 <= len(self.channel_mult) <= 8):
            raise ValueError(f"pixel_decoder.channel_mult must be a list of 1..8 multipliers, got {self.channel_mult!r}")
        for m in self.channel_mult:
            check_int("pixel_decoder", "channel_mult entry", m, 1, 64)
        check_int("pixel_decoder", "num_res_blocks", self.num_res_blocks, 1, 64)
        check_int("pixel_decoder", "vit_width", self.vit_width)
        check_int("pixel_decoder", "vit_depth", self.vit_depth, 1, MAX_LAYERS)
        check_int("pixel_decoder", "vit_heads", self.vit_heads, 1, self.vit_width)
        check_int("pixel_decoder", "vit_patch", self.vit_patch, 1, 256)
        if self.vit_width % self.vit_heads:
            raise ValueError(f"pixel_decoder.vit_width {self.vit_width} must be divisible by vit_heads {self.vit_heads}")

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
        if self.mode == "psvae":
            check_int("config", "latent_channels", self.latent_channels, 1, MAX_CHANNELS)
            layers = self.encoder.num_layers
            if layers is not None and self.semantic.depth > layers:
                raise ValueError(f"semantic.depth {self.semantic.depth} is larger than the encoder's {layers} blocks; "
                                 f"use a depth in 0..{layers}")


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
