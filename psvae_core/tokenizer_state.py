"""A text tokenizer as a few strings a checkpoint can carry, and back, with no file and no network.

A fast tokenizer is fully described by its `tokenizer.json` (normaliser, pre-tokeniser, vocabulary,
merges, post-processor such as an added BOS) plus transformers' special-token names and padding
side. Both are plain strings, so they fit in a safetensors file's metadata, and the generator file
alone rebuilds its tokenizer (`tokenizers.Tokenizer.from_str`).
"""
from __future__ import annotations

import json

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "additional_special_tokens")


def tokenizer_to_state(tokenizer) -> dict[str, str]:
    """{"tokenizer_json": ..., "tokenizer_config": ...} for a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust `tokenizers`) tokenizer; "
                         "load the LM's tokenizer with use_fast=True")
    special = {k: str(v) if not isinstance(v, list) else [str(x) for x in v]
               for k, v in tokenizer.special_tokens_map.items() if k in _SPECIAL}
    if "pad_token" not in special:  # batching needs one; padded keys are masked, so any token will do
        for fallback in ("eos_token", "unk_token", "bos_token"):
            if fallback in special:
                special["pad_token"] = special[fallback]
                break
    config = {**special, "padding_side": tokenizer.padding_side}
    return {"tokenizer_json": backend.to_str(), "tokenizer_config": json.dumps(config, sort_keys=True)}


def tokenizer_from_state(state: dict[str, str]):
    """The transformers fast tokenizer that `tokenizer_to_state` described."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    missing = [k for k in ("tokenizer_json", "tokenizer_config") if k not in state]
    if missing:
        raise ValueError(f"tokenizer state lacks {missing}; it needs 'tokenizer_json' and 'tokenizer_config'")
    try:
        backend = Tokenizer.from_str(state["tokenizer_json"])
    except Exception as e:  # tokenizers raises a bare Exception for a bad tokenizer.json
        raise ValueError(f"tokenizer_json is not a valid tokenizer.json ({e})") from None
    try:
        config = json.loads(state["tokenizer_config"])
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"tokenizer_config is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not all(isinstance(v, (str, list, type(None))) for v in config.values()):
        raise ValueError("tokenizer_config must be a JSON object of special-token names and padding_side")
    try:
        return PreTrainedTokenizerFast(tokenizer_object=backend, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"tokenizer_config does not fit a tokenizer ({e})") from None


def byte_tokenizer():
    """A byte-level tokenizer with ids = byte values (0..255): no file, no network; fits the `tiny`
    preset's 256-entry vocabulary. Byte 0 doubles as padding (padded keys are masked anyway)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    symbol = bytes_to_unicode()  # byte -> the printable character ByteLevel pre-tokenises it into
    backend = Tokenizer(models.BPE(vocab={symbol[b]: b for b in range(256)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=symbol[0])
