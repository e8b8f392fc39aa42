"""A Hugging Face Qwen2 / Llama-family decoder run as a Transfusion backbone (docs/PAPER.md §5.1).

The sequence is [text ; image tokens]. Text is causal among itself and never attends to images;
image tokens (the editing source and the noisy target) attend to every text token and to each other
bidirectionally. Because the text never sees the images, its per-layer keys/values are computed once
per prompt (`encode_text` -> `TextCache`) and reused at every sampling step: image queries attend to
[cached text K/V ; their own K/V] with plain SDPA, so no dense mask is built (only a key-padding
mask when some text is padding or dropped).

The layer forward is written here from the LM's own modules (norms, q/k/v/o projections, MLP,
rotary embedding), not by calling the HF decoder layer, whose call signature changes between
transformers versions. Text-only hidden states equal the LM's own outputs (tests/test_fusion.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


def hf_config(lm: dict):
    """transformers config object from a plain dict holding at least `model_type`."""
    from transformers import AutoConfig

    lm = dict(lm)
    model_type = lm.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"LM model_type {model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}")
    return AutoConfig.for_model(model_type, **lm)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # HF's convention: the two halves of each head form the rotated pairs; cos/sin are [B, N, head_dim].
    x1, x2 = x.chunk(2, -1)
    return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


@dataclass
class TextCache:
    """A text prefix encoded once: per-layer keys/values (RoPE applied) for the image queries.

    keys, values: one [B, kv_heads, L, head_dim] tensor per layer.
    mask: [B, L] bool, True for real tokens (False: padding, or the text of a dropped prompt).
    hidden: [B, L, hidden] the LM's final (normed) hidden states, i.e. `last_hidden_state`.
    Text positions are 0..n-1 over the real tokens, n = `lengths`.
    """

    keys: tuple
    values: tuple
    mask: torch.Tensor
    hidden: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(-1)

    def expand(self, batch_size: int) -> "TextCache":
        """One prompt for a whole batch (a cache of batch 1 broadcast to `batch_size`)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"text batch {self.batch_size} does not match image batch {batch_size}")
        grow = lambda x: x.expand(batch_size, *x.shape[1:])  # noqa: E731
        return TextCache(tuple(map(grow, self.keys)), tuple(map(grow, self.values)), grow(self.mask), grow(self.hidden))

    def drop(self, rows: torch.Tensor) -> "TextCache":
        """Null text for the rows where `rows` is True (classifier-free-guidance dropout)."""
        return replace(self, mask=self.mask & ~rows.to(self.mask.device, torch.bool)[:, None])

    @staticmethod
    def cat(caches: Sequence["TextCache"]) -> "TextCache":
        """Stack caches along the batch, right-padding shorter texts with masked keys."""
        length = max(c.mask.shape[1] for c in caches)

        def pad(x, dim):
            widths = [0, 0] * (x.ndim - dim - 1) + [0, length - x.shape[dim]]
            return F.pad(x, widths)

        layers = len(caches[0].keys)
        return TextCache(
            keys=tuple(torch.cat([pad(c.keys[i], 2) for c in caches]) for i in range(layers)),
            values=tuple(torch.cat([pad(c.values[i], 2) for c in caches]) for i in range(layers)),
            mask=torch.cat([pad(c.mask, 1) for c in caches]),
            hidden=torch.cat([pad(c.hidden, 1) for c in caches]),
        )


class LMBackbone(nn.Module):
    """The LM's base model (`self.lm`: embeddings, decoder layers, final norm, rotary), no LM head."""

    def __init__(self, lm_config: dict, model: Optional[nn.Module] = None):
        super().__init__()
        if model is None:
            from transformers import AutoModel
            model = AutoModel.from_config(hf_config(lm_config))
        self.lm = model
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False):  # off in Qwen2.5; not implemented here
            raise ValueError("LMs with sliding-window attention are not supported; set use_sliding_window=False")
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = model.layers[0].self_attn.q_proj.out_features // self.num_heads

    def _qkv(self, layer, x, cos, sin):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        split = lambda y: y.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _finish(self, layer, x, attn_out):
        x = x + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(*x.shape[:2], -1))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _attend(self, layer, q, k, v, mask, causal):
        scale = getattr(layer.self_attn, "scaling", None)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=self.num_kv_heads != self.num_heads)

    def encode_text(self, token_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> TextCache:
        """Run the causal text prefix once. Padding may be on either side: positions count real
        tokens only, and padded keys are masked."""
        B, L = token_ids.shape
        mask = torch.ones_like(token_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.lm.embed_tokens(token_ids)
        if L == 0:
            empty = x.new_zeros(B, self.num_kv_heads, 0, self.head_dim)
            return TextCache((empty,) * len(self.lm.layers), (empty,) * len(self.lm.layers), mask, x)
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = self.lm.rotary_emb(x, positions)
        dense = None
        if not bool(mask.all()):  # causal AND real key; the diagonal keeps all-padding rows finite
            eye = torch.eye(L, dtype=torch.bool, device=x.device)
            causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            dense = ((causal & mask[:, None, :]) | eye)[:, None]
        keys, values = [], []
        for layer in self.lm.layers:
            q, k, v = self._qkv(layer, x, cos, sin)
            keys.append(k)
            values.append(v)
            x = self._finish(layer, x, self._attend(layer, q, k, v, dense, dense is None))
        return TextCache(tuple(keys), tuple(values), mask, self.lm.norm(x))

    def forward_images(self, x: torch.Tensor, positions: torch.Tensor, text: TextCache,
                       image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Image tokens [B, N, hidden] at RoPE `positions` [B, N] through every layer, attending to the
        cached text and to all image tokens; `image_mask` [B, N] hides image keys (a dropped source).
        Returns the final normed hidden states [B, N, hidden]."""
        B, N, _ = x.shape
        keep = torch.cat([text.mask.to(x.device),
                          torch.ones(B, N, dtype=torch.bool, device=x.device) if image_mask is None else image_mask], 1)
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # key padding only, broadcast over queries
        cos, sin = self.lm.rotary_emb(x, positions)
        for layer, text_k, text_v in zip(self.lm.layers, text.keys, text.values):
            q, k, v = self._qkv(layer, x, cos, sin)
            k, v = torch.cat([text_k, k], 2), torch.cat([text_v, v], 2)
            x = self._finish(layer, x, self._attend(layer, q, k, v, mask, False))
        return self.lm.norm(x)
