"""psvae_core: the PyTorch library under the PS-VAE ComfyUI pack and trainer (docs/ARCHITECTURE.md).

The public API sits at the top level, as in diffusers:

    from psvae_core import PSVAE, RepresentationEncoder, FusionDiffuser, CheckpointError, generate

Each name is imported on first use (module `__getattr__`), so `import psvae_core` loads neither
torch nor transformers: ComfyUI's start-up stays light, and a name costs what its module costs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module defining it
_EXPORTS = {
    "PSVAE": "autoencoder",
    "PSVAEConfig": "config",
    "RepresentationEncoder": "encoders",
    "FusionDiffuser": "fusion",
    "FusionConfig": "fusion",
    "PrefixCache": "fusion_backbone",
    "CheckpointError": "checkpoint",
    "generate": "generation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # submodules (`from psvae_core import flow`) are found by the import system
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
