"""Regional compilation: torch.compile of each repeated block, not of the whole model.

The blocks of one class share one compiled function (torch.compile caches per code object), so a
24-layer LM compiles its layer once, and everything around the blocks (embeddings, losses, the
data-dependent masks) stays eager. Compiled blocks are:
- the LM decoder layers of a `FusionDiffuser` (`LMBackbone._layer`, which runs one layer from the
  LM's own modules) and its DDT head blocks;
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

from .fusion_backbone import LMBackbone
from .fusion_heads import DDTBlock

# CUDA-graph modes ("reduce-overhead", "max-autotune") are left out: per-block graphs in training are untested.
MODES = ("default", "max-autotune-no-cudagraphs")
BLOCKS = (GradientCheckpointingLayer, DDTBlock)  # blocks whose own forward is what runs them


@functools.cache
def _compiled(function, mode: str):
    return torch.compile(function, mode=mode)


def _compile_method(module: nn.Module, name: str, mode: str) -> None:
    function = getattr(type(module), name)
    setattr(module, name, types.MethodType(_compiled(function, mode), module))


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """Compile `model`'s repeated blocks in place (compilation itself happens at their first call);
    returns how many blocks. A block compiled already is left as it is."""
    if mode not in MODES:
        raise ValueError(f"compile mode must be one of {MODES}, not {mode!r}")
    count, inside_lm = 0, set()
    for module in model.modules():
        if isinstance(module, LMBackbone):
            # The LM's own layer modules are never called: LMBackbone._layer runs them.
            inside_lm.update(map(id, module.modules()))
            if "_layer" not in vars(module):
                _compile_method(module, "_layer", mode)
            count += len(module.lm.layers)
    for module in model.modules():
        if isinstance(module, BLOCKS) and id(module) not in inside_lm:
            if "forward" not in vars(module):
                _compile_method(module, "forward", mode)
            count += 1
    return count
