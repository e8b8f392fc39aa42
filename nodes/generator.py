"""Generator files in the loader. Loading lands together with the samplers (psvae_core.fusion)."""
from __future__ import annotations


def load_generator(path: str, name: str, vae_handle, dtype_choice: str):
    raise ValueError(f"PS-VAE Loader: {name} is a generator file, but this version of the pack cannot load "
                     "generators yet; set generator_name to 'none'")
