"""The PS-VAE trainer. Run from the checkout: `python -m trainer <stage> --config FILE` (docs/TRAINER.md)."""
__version__ = "0.1.0"
