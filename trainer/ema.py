"""Exponential moving average of a module's parameters (float32 shadow copies)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .sharding import full_tensor, like, local


class EMA:
    """Shadow copies of the trainable float parameters; buffers are copied as they are. With warm-up
    the decay is min(decay, (1 + n) / (10 + n)), so short runs are not dominated by the initial weights."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.shadow = {name: p.detach().float().clone() for name, p in module.named_parameters() if p.requires_grad}

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = self.decay_at(self.num_updates)
        pairs = [(self.shadow[name], p) for name, p in module.named_parameters() if name in self.shadow]
        # One foreach kernel over all tensors; shards are updated locally (shadow and weight share a layout).
        shadows = [local(s) for s, _ in pairs]
        weights = [local(p.detach()).float() for _, p in pairs]
        torch._foreach_lerp_(shadows, weights, 1.0 - d)
        self.num_updates += 1

    def full_shadow(self) -> dict[str, torch.Tensor]:
        """The whole averaged tensors; under FSDP the shadows are shards and every process must call this."""
        return {name: full_tensor(v) for name, v in self.shadow.items()}

    def load_state_dict(self, state: dict) -> None:
        """`state["shadow"]` holds whole tensors; a sharded EMA keeps its own shard of each."""
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:4]}")
        for name in self.shadow:
            self.shadow[name].copy_(like(state["shadow"][name], self.shadow[name]))
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def copy_of(self, module: nn.Module) -> nn.Module:
        """A deep copy of `module` carrying the averaged weights (for evaluation and export)."""
        clone = copy.deepcopy(module)
        for name, p in clone.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))
        return clone
