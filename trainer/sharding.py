"""How the loop spreads a trained module over processes (replicated: one process or DDP; sharded:
FSDP2 over `Stage.shard_units`), and how its state comes back whole for checkpoints, which hold full
tensors in both layouts (docs/TRAINER.md "Several processes"). Every function here that takes a
module is called by every process.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

_TO_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)
_FULL = StateDictOptions(full_state_dict=True)


def shard(module: nn.Module, units: tuple[type, ...], device: torch.device) -> list[nn.Module]:
    """FSDP2 over all processes: each module of a class in `units` is one unit, then the root.
    Returns the units (without the root), in module order."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    found = [sub for sub in list(module.modules())[1:] if units and isinstance(sub, units)]
    for sub in found:
        fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # Forward prefetch: each unit (the root: the first) starts the next one's all-gather before it
    # computes, the units running in module order; backward prefetch is FSDP's own, by the
    # recorded forward order.
    chain = [module, *found]
    for current, following in zip(chain, chain[1:]):
        current.set_modules_to_forward_prefetch([following])
    return found


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a gather over processes when `t` is a shard)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of `t` (all of it when `t` is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `target`: this process's shard when `target` is sharded."""
    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights and persistent buffers on the CPU of rank 0 (empty elsewhere)."""
    return get_model_state_dict(module, options=_TO_RANK0)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimiser state keyed by parameter name, on the CPU of rank 0 (empty elsewhere)."""
    return get_optimizer_state_dict(module, optimizer, options=_TO_RANK0)


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of `optimizer_state`; every process passes the full state and keeps its share."""
    set_optimizer_state_dict(module, optimizer, state, options=_FULL)


def meta_template(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters are on the meta device (no memory); buffers and other
    attributes are real. `materialize` turns it into a plain module with given weights."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def materialize(template: nn.Module, sharded: nn.Module, overrides: dict[str, torch.Tensor]) -> nn.Module:
    """A plain, whole module on this process: `template` with the sharded module's gathered weights,
    `overrides` (e.g. EMA weights, by parameter name) taking their place."""
    state = get_model_state_dict(sharded, options=_FULL)
    for name, value in overrides.items():
        state[name] = value.to(state[name].dtype)
    plain = copy.deepcopy(template)
    device = local(next(sharded.parameters())).device
    plain.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    return plain.to(device)
