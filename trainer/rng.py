"""Randomness: seeds derived from counters, so training noise depends on neither the process layout,
the accumulation split nor a resume (docs/TRAINER.md "Exact resume and checkpoints"), and the global
RNG states saved per process for anything outside that scheme (e.g. dropout in a user's model).
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts (stable across Python versions and platforms)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def micro_rows(batch_size: int, rank: int, world_size: int, micro: int) -> slice:
    """Rows of micro-batch `micro` of process `rank` within one optimiser step's global batch, which
    is ordered micro-batch by micro-batch and, inside one, process by process."""
    first = (micro * world_size + rank) * batch_size
    return slice(first, first + batch_size)


def step_noise(local_shape, rank: int, world_size: int, micro: int, accum: int, device, *seed_parts,
               uniform: bool = False) -> torch.Tensor:
    """This process's rows (`micro_rows`) of one noise tensor covering a whole optimiser step's global
    batch, drawn from a generator seeded by `seed_parts`: standard normal, or uniform on [0, 1)."""
    b = local_shape[0]
    g = torch.Generator(device=device).manual_seed(derive_seed(*seed_parts))
    draw = torch.rand if uniform else torch.randn
    full = draw((b * world_size * accum, *local_shape[1:]), generator=g, device=device)
    return full[micro_rows(b, rank, world_size, micro)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict:
    """Global RNG states as tensors and plain lists (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
