"""Regional compilation: torch.compile of each repeated block, not of the whole model.

The blocks of one class share one compiled function (torch.compile caches per code object), so a
24-layer LM compiles its layer once, and everything around the blocks (embeddings, losses, the
data-dependent masks) stays eager. Compiled blocks are:
- the LM decoder layers of a `FusionDiffuser` (`fusion_backbone.DecoderLayer`) and its DDT head blocks;
- every transformers checkpointable layer (the representation encoder's layers and the semantic
  encoder/decoder blocks of a `PSVAE`) and the pixel decoder's ResNet and attention blocks.

Each block keeps its call chain: gradient checkpointing (`PSVAE.set_grad_checkpointing`) still wraps
the block's call, and the compiled forward is bound to its module as a method, so a deep copy made
later (an EMA copy, a teacher) rebinds it to the copy and computes with the copy's own weights.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .fusion_backbone import DecoderLayer
from .fusion_heads import DDTBlock

# CUDA-graph modes ("reduce-overhead", "max-autotune") are left out: per-block graphs in training are untested.
MODES = ("default", "max-autotune-no-cudagraphs")
BLOCKS = (GradientCheckpointingLayer, DecoderLayer, DDTBlock)  # blocks whose own forward is what runs them


@functools.cache
def _compiled(function, mode: str):
    return torch.compile(function, mode=mode)


def _compile_forward(module: nn.Module, mode: str) -> None:
    module.forward = types.MethodType(_compiled(type(module).forward, mode), module)


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """Compile `model`'s repeated blocks in place (compilation itself happens at their first call);
    returns how many blocks. A block compiled already is left as it is."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, not {mode!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, BLOCKS):
            if "forward" not in vars(module):
                _compile_forward(module, mode)
            count += 1
    return count
