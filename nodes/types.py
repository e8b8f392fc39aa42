"""Custom socket types of the pack (their names are workflow identity: never rename them)."""
from comfy_api.latest import io

PSVAEVae = io.Custom("PSVAE_VAE")
PSVAEGenerator = io.Custom("PSVAE_GENERATOR")
