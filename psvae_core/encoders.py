"""`RepresentationEncoder`: a transformers vision tower read as a feature map (docs/PAPER.md §1).

images [B,3,H,W] in 0..1 -> bicubic resize to the patch grid -> mean/std -> the model -> last hidden
state BEFORE the final norm -> `feature_norm` -> prefix tokens dropped -> features [B,D,h,w].

What differs between families is data (`FAMILIES`), not code paths. Module locations are found by
role (the one ModuleList of `num_hidden_layers` blocks, the final norm by attribute name) because
transformers moved them between versions (e.g. `vision_model.post_layernorm` in 4.x is
`post_layernorm` in 5.x). Consequence: the wrapped model's state-dict keys depend on the
transformers version. Files store them under fixed names instead (`file_names`, docs/CHECKPOINTS.md).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig

from .config import EncoderConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    """What one encoder family needs, as data."""

    model_class: str  # transformers class
    model_types: tuple  # config.json model_type values this family loads
    final_norm: str  # attribute name of the final LayerNorm
    cls_tokens: int  # prefix tokens = cls_tokens + config.num_register_tokens (when it has registers)
    mean: tuple
    std: tuple
    config_overrides: dict = field(default_factory=dict)
    forward_kwargs: dict = field(default_factory=dict)
    rope: Optional[str] = None  # attribute of the RoPE module whose output the blocks need
    naflex: bool = False  # pixels enter as patches + attention mask + spatial shapes


_FIXED_POSITIONS = {"interpolate_pos_encoding": True}  # learned position table for one size: resample it
FAMILIES: dict[str, Family] = {
    "dinov2": Family("Dinov2Model", ("dinov2",), "layernorm", 1, IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_reg": Family("Dinov2WithRegistersModel", ("dinov2_with_registers",), "layernorm", 1,
                         IMAGENET_MEAN, IMAGENET_STD),
    # RoPE jitter/rescale is a pretraining augmentation; off, so features do not depend on train/eval mode.
    "dinov3": Family("DINOv3ViTModel", ("dinov3_vit",), "norm", 1, IMAGENET_MEAN, IMAGENET_STD,
                     config_overrides={"pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": None},
                     rope="rope_embeddings"),
    "siglip": Family("SiglipVisionModel", ("siglip", "siglip_vision_model"), "post_layernorm", 0,
                     SIGLIP_MEAN, SIGLIP_STD, config_overrides={"vision_use_head": False},
                     forward_kwargs=_FIXED_POSITIONS),
    "siglip2": Family("Siglip2VisionModel", ("siglip2", "siglip2_vision_model"), "post_layernorm", 0,
                      SIGLIP_MEAN, SIGLIP_STD, config_overrides={"vision_use_head": False}, naflex=True),
    "clip": Family("CLIPVisionModel", ("clip", "clip_vision_model"), "post_layernorm", 1, CLIP_MEAN, CLIP_STD,
                   forward_kwargs=_FIXED_POSITIONS),
}


# Tensor names in files are the ones transformers 4.57 gives (docs/CHECKPOINTS.md, "Tensor names").
# Per family, the renamings of later versions, undone: (regex over a name relative to a
# RepresentationEncoder or a TokenBlocks, replacement). Each leaves 4.57 names unchanged.
_DINOV2_ATTENTION = (  # transformers 5.18: attention.attention.query -> attention.q_proj, output.dense -> o_proj
    re.compile(r"^((?:model\.encoder\.layer|layers)\.\d+\.attention\.)([qkvo])_proj\."),
    lambda m: m[1] + {"q": "attention.query", "k": "attention.key", "v": "attention.value", "o": "output.dense"}[m[2]] + ".")
_VISION_MODEL = (re.compile(r"^model\.(?!vision_model\.)"), "model.vision_model.")  # 5.x: no vision_model level
_RENAMES: dict[str, tuple] = {
    "dinov2": (_DINOV2_ATTENTION,),
    "dinov2_reg": (_DINOV2_ATTENTION,),
    "dinov3": ((re.compile(r"^model\.model\.layer\."), "model.layer."),),  # 5.x: layers under .model
    "siglip": (_VISION_MODEL,),
    "siglip2": (_VISION_MODEL,),
    "clip": (_VISION_MODEL,),
}


def file_names(module: nn.Module) -> Callable[[str], str]:
    """`name -> name in files` for `module`'s state-dict keys, whatever the installed transformers
    calls them: names under a RepresentationEncoder or TokenBlocks lose later transformers renamings,
    all others stay. Applied to a file's own names it migrates files written under transformers 5.x."""
    roots = [(f"{path}." if path else "", m.family) for path, m in module.named_modules()
             if isinstance(m, (RepresentationEncoder, TokenBlocks)) and m.family is not None]

    def name(key: str) -> str:
        for root, family in roots:
            if key.startswith(root):
                rest = key[len(root):]
                for pattern, replacement in _RENAMES[family]:
                    rest = pattern.sub(replacement, rest)
                return root + rest
        return key
    return name


def _check_family(family: str, model_type: Optional[str]) -> Family:
    spec = FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"encoder family {family!r} is not supported; use one of {tuple(FAMILIES)}")
    if model_type not in spec.model_types:
        raise ValueError(f"encoder family {family!r} expects a config with model_type in {spec.model_types}, "
                         f"got {model_type!r}; pass the matching family (or family=None to infer it)")
    return spec


def _family_of(model_type: str) -> str:
    for name, spec in FAMILIES.items():
        if model_type in spec.model_types:
            return name
    known = sorted(t for spec in FAMILIES.values() for t in spec.model_types)
    raise ValueError(f"model_type {model_type!r} is not a supported representation encoder; "
                     f"use a checkpoint whose model_type is one of {known}")


def _build_model(spec: Family, hf_config: dict, **changes) -> nn.Module:
    """A randomly initialised model (torch's global RNG) from a config dict."""
    merged = {**hf_config, **spec.config_overrides, **changes, "attn_implementation": "sdpa"}
    return getattr(transformers, spec.model_class)(AutoConfig.for_model(**merged))


def _config_dict(config) -> dict:
    return json.loads(config.to_json_string(use_diff=False))


def _layer_stack(model: nn.Module, num_layers: int) -> nn.ModuleList:
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(stacks) != 1:
        raise RuntimeError(f"found {len(stacks)} block lists of length {num_layers} in {type(model).__name__}; "
                           f"this transformers version lays the model out differently: update encoders.py")
    return stacks[0]


def _detach_final_norm(model: nn.Module, name: str) -> nn.LayerNorm:
    """Swap the final norm for an Identity (so last_hidden_state is pre-norm) and return it."""
    paths = [path for path, _ in model.named_modules() if path.rsplit(".", 1)[-1] == name]
    if len(paths) != 1:
        raise RuntimeError(f"found {len(paths)} modules named {name!r} in {type(model).__name__}; "
                           f"this transformers version lays the model out differently: update encoders.py")
    parent_path, _, attr = paths[0].rpartition(".")
    parent = model.get_submodule(parent_path)
    norm = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return norm


def _hub_offline() -> bool:
    import huggingface_hub.constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return env or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _local_folder(source: str) -> Path:
    """`source` as a local model folder; a hub id is downloaded (config + safetensors) unless offline."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source:
        raise FileNotFoundError(f"encoder folder {source!r} does not exist; pass a folder holding config.json "
                                f"and the safetensors weights, or a hub id such as 'facebook/dinov2-with-registers-base'")
    if _hub_offline():
        raise FileNotFoundError(
            f"cannot fetch hub id {source!r}: HF_HUB_OFFLINE is set and no folder of that name exists. On a "
            f"connected machine run `huggingface-cli download {source} --local-dir DIR`, copy DIR here and pass "
            f"DIR instead of the hub id")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))


def _preprocessor_stats(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {key: tuple(value) if isinstance(value, list) else (value,)
            for key, value in data.items() if key in ("image_mean", "image_std")}


class TokenBlocks(nn.Module):
    """`depth` blocks of the encoder's own design over patch tokens: forward(tokens [B,N,D], grid) -> [B,N,D].

    Hides each family's layer call: required mask arguments get None (patch tokens have no padding),
    RoPE layers get position embeddings for `grid` from the model's own rope module, and tuple
    outputs (older transformers) are unwrapped.
    """

    def __init__(self, layers: list, rope: Optional[nn.Module], patch_size: int, family: Optional[str] = None):
        super().__init__()
        self.family = family  # whose layers these are: how `file_names` names them
        self.layers = nn.ModuleList(layers)
        self.rope = rope
        self.patch_size = patch_size
        self._mask_args = {}
        if layers:
            params = list(inspect.signature(layers[0].forward).parameters.values())[1:]
            self._mask_args = {p.name: None for p in params
                               if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        if tokens.shape[1] != h * w:
            raise ValueError(f"TokenBlocks got {tokens.shape[1]} tokens for a {h}x{w} grid; "
                             f"pass the grid the tokens were flattened from")
        kwargs = dict(self._mask_args)
        if self.rope is not None:
            # The rope module only reads the pixel shape, dtype and device: an empty stand-in suffices.
            p = self.patch_size
            kwargs["position_embeddings"] = self.rope(tokens.new_empty(1, 0, h * p, w * p))
        for layer in self.layers:
            out = layer(tokens, **kwargs)
            tokens = out[0] if isinstance(out, tuple) else out
        return tokens


class RepresentationEncoder(nn.Module):
    """A transformers vision tower giving features [B,D,h,w] (see the module docstring).

    `RepresentationEncoder(config)` builds the architecture of `config.hf_config` with random
    weights; `from_pretrained` loads real ones. `model` is an already-built transformers model of
    `config.hf_config` (used by `from_pretrained`).
    """

    def __init__(self, config: EncoderConfig, model: Optional[nn.Module] = None):
        super().__init__()
        if config.hf_config is None:
            raise ValueError("EncoderConfig.hf_config is None; load weights with RepresentationEncoder."
                             "from_pretrained(folder) or set hf_config (e.g. config.TINY_DINOV2_REG)")
        self.config = config
        self.family = config.family
        self.spec = _check_family(config.family, config.hf_config.get("model_type"))
        self.model = model if model is not None else _build_model(self.spec, config.hf_config)
        hf = self.model.config
        self.hidden_size: int = hf.hidden_size
        self.patch_size: int = hf.patch_size
        self.num_prefix_tokens: int = self.spec.cls_tokens + getattr(hf, "num_register_tokens", 0)
        self.final_norm = _detach_final_norm(self.model, self.spec.final_norm)
        # Plain floats, not buffers: a model cast to bf16 must not round the normalisation constants.
        self.image_mean = tuple(config.image_mean or self.spec.mean)
        self.image_std = tuple(config.image_std or self.spec.std)

    @classmethod
    def from_config(cls, config: EncoderConfig) -> "RepresentationEncoder":
        return cls(config)

    @classmethod
    def from_pretrained(cls, source, family: Optional[str] = None, **overrides) -> "RepresentationEncoder":
        """Load weights from a local folder or hub id. `overrides` are EncoderConfig fields
        (image_size, feature_norm, image_mean, image_std, resize_antialias); mean/std default to the folder's
        preprocessor_config.json, then to the family's values."""
        source = str(source)
        folder = _local_folder(source)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; pass a transformers model folder "
                                    f"(written by save_pretrained or `huggingface-cli download`)")
        model_type = json.loads(config_file.read_text()).get("model_type")
        family = family or _family_of(model_type)
        spec = _check_family(family, model_type)
        model_class = getattr(transformers, spec.model_class)
        hf = model_class.config_class.from_pretrained(folder)  # the vision part of a text+vision checkpoint
        hf.update(spec.config_overrides)
        model = model_class.from_pretrained(folder, config=hf, attn_implementation="sdpa", dtype=torch.float32)
        fields = {**_preprocessor_stats(folder), **overrides}
        config = EncoderConfig(family=family, hf_config=_config_dict(model.config), source=source, **fields)
        return cls(config, model=model)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an input of this size: image_size square, or each side to the nearest patch multiple."""
        if self.config.image_size is not None:
            height = width = self.config.image_size
        return max(1, int(height / self.patch_size + 0.5)), max(1, int(width / self.patch_size + 0.5))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in 0..1 -> resized to the patch grid (bicubic, antialiased unless
        config.resize_antialias is False) and mean/std-normalised."""
        h, w = self.grid_size(*images.shape[-2:])
        size = (h * self.patch_size, w * self.patch_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False,
                                   antialias=self.config.resize_antialias)
        mean, std = (images.new_tensor(v).view(1, -1, 1, 1) for v in (self.image_mean, self.image_std))
        return (images - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images)
        b, p = pixels.shape[0], self.patch_size
        h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
        if self.spec.naflex:
            patches = pixels.reshape(b, 3, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * 3)
            out = self.model(pixel_values=patches,
                             pixel_attention_mask=torch.ones(b, h * w, dtype=torch.long, device=pixels.device),
                             spatial_shapes=torch.tensor([[h, w]] * b, device=pixels.device))
        else:
            out = self.model(pixel_values=pixels, **self.spec.forward_kwargs)
        tokens = out.last_hidden_state[:, self.num_prefix_tokens:]  # pre-norm: the final norm is an Identity
        if self.config.feature_norm == "layernorm":
            tokens = F.layer_norm(tokens, (self.hidden_size,), eps=self.final_norm.eps)
        elif self.config.feature_norm == "affine":
            tokens = self.final_norm(tokens)
        return tokens.transpose(1, 2).reshape(b, self.hidden_size, h, w)

    def set_trainable(self, flag: bool) -> "RepresentationEncoder":
        """Train (or freeze) the encoder. Parameters no forward pass uses stay frozen even when
        training: the mask token (masked pre-training only) and the final norm unless
        feature_norm="affine". Data-parallel training requires every trainable one to get a gradient."""
        self.requires_grad_(flag)
        if flag:
            for name, param in self.named_parameters():
                if name.endswith("mask_token") or (name.startswith("final_norm.") and self.config.feature_norm != "affine"):
                    param.requires_grad_(False)
        return self

    def frozen_copy(self) -> "RepresentationEncoder":
        """An independent, eval-mode, gradient-free copy: the teacher of the semantic loss."""
        return copy.deepcopy(self).set_trainable(False).eval()

    def make_blocks(self, depth: int, init: str = "copy") -> TokenBlocks:
        """`depth` blocks of this encoder's design: copies of its last `depth` blocks ("copy") or
        the same blocks freshly initialised by the model's own init ("fresh"). Always trainable."""
        num_layers = self.model.config.num_hidden_layers
        if init not in ("copy", "fresh"):
            raise ValueError(f"block init must be 'copy' or 'fresh', not {init!r}")
        if not 0 <= depth <= num_layers:
            raise ValueError(f"cannot take {depth} blocks from an encoder with {num_layers}; "
                             f"use a depth in 0..{num_layers}")
        if init == "copy":
            stack = _layer_stack(self.model, num_layers)
        else:
            # A model of just `depth` blocks; the backbone stage lists derived from the layer count are recomputed.
            fresh = _build_model(self.spec, self.config.hf_config, num_hidden_layers=depth,
                                 out_features=None, out_indices=None)
            stack = _layer_stack(fresh, depth)
        layers = [copy.deepcopy(layer) for layer in stack[len(stack) - depth:]]
        rope = copy.deepcopy(getattr(self.model, self.spec.rope)) if self.spec.rope else None
        ref = self.final_norm.weight
        # Parameters on the meta device: a model built for loading (checkpoint.build_checked), whose
        # buffers (the RoPE frequencies) are real and must stay so.
        device = None if ref.is_meta else ref.device
        return TokenBlocks(layers, rope, self.patch_size, self.family).to(device, ref.dtype).requires_grad_(True).train()
