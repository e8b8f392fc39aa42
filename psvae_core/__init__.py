"""psvae_core: the PyTorch library under the PS-VAE ComfyUI pack and trainer (docs/ARCHITECTURE.md)."""
__version__ = "0.1.0"
