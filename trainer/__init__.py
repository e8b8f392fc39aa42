"""The PS-VAE trainer. Run from the checkout: `python -m trainer <stage> --config FILE` (README)."""
