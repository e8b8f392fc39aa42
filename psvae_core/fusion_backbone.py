"""A Hugging Face Qwen2 / Llama-family decoder run as a Transfusion backbone (docs/PAPER.md §5.1).

The sequence is [prefix ; noisy target], the prefix being [clean source image ; text] for editing
and [text] for T2I. Source tokens attend to each other (bidirectional); text tokens are causal among
themselves and see every source token; the noisy target tokens see the whole prefix and each other
(bidirectional). Nothing in the prefix attends to the target, so its per-layer keys/values are
computed once per prompt or edit (`encode_prefix` -> `PrefixCache`) and reused at every sampling
step: target queries attend to [cached prefix K/V ; their own K/V] with plain SDPA, so no dense mask
is built at a step (only a key-padding mask when some prefix key is padding or dropped).

RoPE positions: every source token shares position 0, the text counts its real tokens from there
(0..n-1 without a source, 1..n with one), and every target token sits two positions after the last
text token (n+1, resp. n+2), the distance T2I has always used, so an edit model initialised from a
T2I one keeps its text-to-target geometry. The 2-D sin-cos PE carries the image layout.

Each LM decoder layer is replaced in `lm.layers` by a `DecoderLayer`, which adopts the layer's own
modules (norms, q/k/v/o projections, MLP) under their names, so the weights keep the LM's keys, and
runs them itself rather than calling the HF decoder layer, whose call signature changes between
transformers versions (the LM's own `forward` is therefore not used). Every layer's work is a call
of its `DecoderLayer`, so each can be its own FSDP unit and its own compiled block. In training
(`LMBackbone.forward`) each layer runs once for both streams, the prefix and the target; sampling
encodes the prefix once (`encode_prefix`) and runs only the target per step (`forward_images`).
Text-only hidden states equal the LM's own outputs, and both paths equal the LM's forward over the
full sequence with the dense mask (tests/test_fusion.py).
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


def _target_position(key_mask: torch.Tensor, source_tokens: int) -> torch.Tensor:
    """[B] RoPE position of the target tokens: two after the last real (kept) text token.
    Dropped text counts as no text, as for the null prompt; a dropped source keeps its slot."""
    text = key_mask[:, source_tokens:].sum(-1)
    return text + (1 if source_tokens else 0) + 1


@dataclass
class PrefixCache:
    """The conditioning prefix [source ; text] encoded once: per-layer keys/values (RoPE applied)
    for the target queries.

    keys, values: one [B, kv_heads, P, head_dim] tensor per layer, P = source_tokens + text length.
    mask: [B, P] bool, the keys the target sees (False: text padding, dropped text or source).
    hidden: [B, P, hidden] the LM's final (normed) hidden states of the prefix; its text part
        (`text_hidden`) is the LM's `last_hidden_state` when there is no source.
    source_tokens: how many leading entries are source-image tokens (0 for T2I).
    """

    keys: tuple
    values: tuple
    mask: torch.Tensor
    hidden: torch.Tensor
    source_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def text_hidden(self) -> torch.Tensor:
        return self.hidden[:, self.source_tokens:]

    @property
    def target_position(self) -> torch.Tensor:
        """[B] RoPE position of the target tokens (`_target_position`)."""
        return _target_position(self.mask, self.source_tokens)

    def expand(self, batch_size: int) -> "PrefixCache":
        """One prefix for a whole batch (a cache of batch 1 broadcast to `batch_size`)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"prefix batch {self.batch_size} does not match image batch {batch_size}")
        grow = lambda x: x.expand(batch_size, *x.shape[1:])  # noqa: E731
        return replace(self, keys=tuple(map(grow, self.keys)), values=tuple(map(grow, self.values)),
                       mask=grow(self.mask), hidden=grow(self.hidden))

    def drop(self, rows: torch.Tensor) -> "PrefixCache":
        """Null text for the rows where `rows` is True (classifier-free guidance): the text keys are
        hidden from the target. The source stays: text never changes a source token."""
        rows = rows.to(self.mask.device, torch.bool)[:, None]
        text = torch.zeros_like(self.mask)
        text[:, self.source_tokens:] = True
        return replace(self, mask=self.mask & ~(rows & text))

    def null(self) -> "PrefixCache":
        """No text and no source: every prefix key hidden (the unconditional guidance branch)."""
        return replace(self, mask=torch.zeros_like(self.mask))

    def pad(self, length: int) -> "PrefixCache":
        """The same prefix with hidden zero keys appended up to `length` entries, so that prefixes of
        other text lengths (a negative prompt) batch with it; hidden keys change nothing."""
        extra = length - self.mask.shape[1]
        if extra == 0:
            return self
        grow = lambda x: F.pad(x, (0, 0, 0, extra))  # noqa: E731  (the entry axis is second to last)
        return replace(self, keys=tuple(map(grow, self.keys)), values=tuple(map(grow, self.values)),
                       mask=F.pad(self.mask, (0, extra), value=False), hidden=grow(self.hidden))

    @staticmethod
    def cat(caches: Sequence["PrefixCache"]) -> "PrefixCache":
        """Stack prefixes of one source layout (the guidance branches) along the batch, the shorter
        ones padded with hidden keys."""
        if len(caches) == 1:
            return caches[0]
        if len({c.source_tokens for c in caches}) != 1:
            raise ValueError("prefixes with and without a source cannot share a batch")
        length = max(c.mask.shape[1] for c in caches)
        caches = [c.pad(length) for c in caches]
        stack = lambda xs: torch.cat(list(xs))  # noqa: E731
        layers = range(len(caches[0].keys))
        return replace(caches[0], keys=tuple(stack(c.keys[i] for c in caches) for i in layers),
                       values=tuple(stack(c.values[i] for c in caches) for i in layers),
                       mask=stack(c.mask for c in caches), hidden=stack(c.hidden for c in caches))


class DecoderLayer(nn.Module):
    """One LM decoder layer as the backbone runs it: a stream of queries attends to [prefix keys/values ;
    its own]. It adopts the HF layer's modules under their own names (the weights keep their keys)."""

    PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")

    def __init__(self, layer: nn.Module, num_heads: int, num_kv_heads: int):
        super().__init__()
        children = dict(layer.named_children())
        if set(children) != set(self.PARTS) or next(layer.parameters(recurse=False), None) is not None:
            raise ValueError(f"{type(layer).__name__} has the parts {sorted(children)}; the fusion backbone runs "
                             f"decoder layers made of exactly {self.PARTS}")
        for name, child in children.items():
            self.add_module(name, child)
        self.head_dim = self.self_attn.q_proj.out_features // num_heads
        self.gqa = num_kv_heads != num_heads

    def _qkv(self, x, cos, sin):
        attn = self.self_attn
        h = self.input_layernorm(x)
        split = lambda y: y.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # noqa: E731  (also for 0 tokens)
        q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def _stream(self, x, cos, sin, mask, causal: bool, prefix_k=None, prefix_v=None):
        """The queries `x` attend to [prefix_k/v ; their own keys/values]; returns the new hidden states
        and their own keys and values (RoPE applied)."""
        q, k, v = self._qkv(x, cos, sin)
        keys, values = (k, v) if prefix_k is None else (torch.cat([prefix_k, k], 2), torch.cat([prefix_v, v], 2))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                             scale=getattr(self.self_attn, "scaling", None), enable_gqa=self.gqa)
        x = x + self.self_attn.o_proj(out.transpose(1, 2).flatten(2))
        return x + self.mlp(self.post_attention_layernorm(x)), k, v

    def forward(self, prefix: Optional[tuple] = None, target: Optional[tuple] = None,
                cached: Optional[tuple] = None) -> tuple:
        """Either stream or both through this layer, in one call (one FSDP gather).

        prefix: (x, cos, sin, mask) of the prefix tokens; mask None: plainly causal.
        target: (x, cos, sin, mask) of the target tokens (mask: key padding, or None), attending to the
            prefix keys/values computed here from `prefix`, or to `cached` (k, v) without it.
        Returns (prefix hidden, (prefix keys, values), target hidden), None for a stream not given;
        the keys and values only without a target (which uses them here)."""
        prefix_out = target_out = None
        if prefix is not None:
            x, cos, sin, mask = prefix
            prefix_out, k, v = self._stream(x, cos, sin, mask, mask is None)
            cached = (k, v)
        if target is not None:
            x, cos, sin, mask = target
            target_out, _, _ = self._stream(x, cos, sin, mask, False, *cached)
            cached = None
        return prefix_out, cached, target_out


class LMBackbone(nn.Module):
    """The LM's base model (`self.lm`: embeddings, decoder layers, final norm, rotary), no LM head;
    its layers are `DecoderLayer`s."""

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
        model.layers = nn.ModuleList(
            layer if isinstance(layer, DecoderLayer) else DecoderLayer(layer, self.num_heads, self.num_kv_heads)
            for layer in model.layers)
        self.head_dim = model.layers[0].head_dim

    def _prefix_inputs(self, token_ids, attention_mask, source, source_keep):
        """The prefix stream before the first layer: ((x, cos, sin, mask), key mask [B, P], source
        tokens). Text padding may be on either side: positions count real tokens only, and padded
        keys are masked."""
        B, L = token_ids.shape
        mask = torch.ones_like(token_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        x = self.lm.embed_tokens(token_ids)
        S = 0 if source is None else source.shape[1]
        device = x.device
        keep = (torch.ones(B, dtype=torch.bool, device=device) if source_keep is None
                else source_keep.to(device, torch.bool))
        key_mask = torch.cat([keep[:, None].expand(B, S), mask], 1)
        offset = 1 if S else 0
        text_pos = (mask.long().cumsum(-1) - 1).clamp_min(0) + offset
        positions = torch.cat([text_pos.new_zeros(B, S), text_pos], 1)
        if S:
            x = torch.cat([source.to(x.dtype), x], 1)
        cos, sin = self.lm.rotary_emb(x, positions)
        dense = None
        if S or not bool(mask.all()):
            # source <-> source; text -> kept source; text -> earlier real text; the diagonal keeps
            # all-padding rows finite.
            P = S + L
            allowed = torch.zeros(B, P, P, dtype=torch.bool, device=device)
            allowed[:, :S, :S] = True
            allowed[:, S:, :S] = keep[:, None, None]
            causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
            allowed[:, S:, S:] = causal & mask[:, None, :]
            dense = (allowed | torch.eye(P, dtype=torch.bool, device=device))[:, None]
        return (x, cos, sin, dense), key_mask, S

    def _target_inputs(self, x, key_mask, position):
        """The target stream (x, cos, sin, key-padding mask) at RoPE `position` [B]."""
        B, N, _ = x.shape
        keep = torch.cat([key_mask.to(x.device), torch.ones(B, N, dtype=torch.bool, device=x.device)], 1)
        mask = None if bool(keep.all()) else keep[:, None, None, :]  # key padding only, broadcast over queries
        cos, sin = self.lm.rotary_emb(x, position.to(x.device)[:, None].expand(B, N))
        return x, cos, sin, mask

    def encode_prefix(self, token_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      source: Optional[torch.Tensor] = None,
                      source_keep: Optional[torch.Tensor] = None) -> PrefixCache:
        """Run the prefix [source ; text] once. `source`: embedded source-image tokens [B, S, hidden];
        `source_keep` [B] bool hides the source of a row from its text and from the target (a dropped
        source: the text is then encoded as without one)."""
        (x, *rest), key_mask, S = self._prefix_inputs(token_ids, attention_mask, source, source_keep)
        keys, values = [], []
        for layer in self.lm.layers:
            x, (k, v), _ = layer(prefix=(x, *rest))
            keys.append(k)
            values.append(v)
        return PrefixCache(tuple(keys), tuple(values), key_mask, self.lm.norm(x), S)

    def forward_images(self, x: torch.Tensor, prefix: PrefixCache) -> torch.Tensor:
        """Target tokens [B, N, hidden] through every layer, attending to the cached prefix and to
        each other, all at `prefix.target_position`. Returns the final normed hidden states."""
        x, *rest = self._target_inputs(x, prefix.mask, prefix.target_position)
        for layer, k, v in zip(self.lm.layers, prefix.keys, prefix.values):
            _, _, x = layer(target=(x, *rest), cached=(k, v))
        return self.lm.norm(x)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                source: Optional[torch.Tensor] = None, source_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`forward_images(x, encode_prefix(...))` with each layer called once for both streams (the
        training path: under FSDP one gather per layer and step). Returns the target's final normed
        hidden states; the prefix's last hidden states are not needed."""
        (prefix, *prefix_rest), key_mask, S = self._prefix_inputs(token_ids, attention_mask, source, source_keep)
        x, *target_rest = self._target_inputs(x, key_mask, _target_position(key_mask, S))
        for layer in self.lm.layers:
            prefix, _, x = layer(prefix=(prefix, *prefix_rest), target=(x, *target_rest))
        return self.lm.norm(x)
