"""Custom socket types of the pack (their names are workflow identity: never rename them)."""
from comfy_api.latest import io

PSVAEVae = io.Custom("PSVAE_VAE")
PSVAEGenerator = io.Custom("PSVAE_GENERATOR")

VAE_TIP = "The PS-VAE autoencoder from PS-VAE Loader."


def vae_input(tooltip: str = VAE_TIP) -> io.Input:
    """The `vae` input every PS-VAE node takes (the loader's VAE output)."""
    return PSVAEVae.Input("vae", tooltip=tooltip)

CATEGORY = "PS-VAE"


def node_schema(node_id: str, display_name: str, description: str, inputs: list, outputs: list) -> io.Schema:
    """A pack node's V3 schema (every node sits in the one PS-VAE category)."""
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs)
