"""PSVAEEncode (IMAGE -> LATENT) and PSVAEDecode (LATENT -> IMAGE): thin shells over runtime.py
(the batched encode/decode) and latents.py (LATENT dicts)."""
from __future__ import annotations

from comfy_api.latest import io

from . import latents, runtime
from .types import node_schema, vae_input

RESIZE_RULE = (
    "Any image size is accepted. 'center crop' (default) first crops the middle of the image to the "
    "aspect ratio of the model's latent grid (square for the paper's 224-px encoders); 'stretch' keeps "
    "the whole image and distorts it instead. The encoder then resizes it (bicubic) to its input size: "
    "224x224 px -> a 16x16 latent, which decodes to 256x256 px. Encoders with a native grid keep the "
    "aspect ratio and round each side to a multiple of their patch size.")


_ENCODE_ABOUT = ("Encodes images into PS-VAE latents (the posterior mean), in batches sized to the free memory, "
                 "with a progress bar. " + RESIZE_RULE)
_DECODE_ABOUT = ("Decodes PS-VAE latents into images (16x the latent size: 16x16 -> 256x256 px), in batches sized to "
                 "the free memory with a progress bar per batch. On out-of-memory it retries with smaller batches, "
                 "then with overlapping tiles.")


class PSVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema("PSVAEEncode", "PS-VAE Encode", _ENCODE_ABOUT, inputs=[
            io.Image.Input("image", tooltip="The images to encode (any size; RGB, greyscale or RGBA over white)."),
            vae_input(),
            io.Combo.Input("resize", options=runtime.RESIZE_CHOICES, default="center crop", tooltip=RESIZE_RULE),
        ], outputs=[
            io.Latent.Output("latent", display_name="latent", tooltip=(
                "Raw PS-VAE latents [batch, channels, h, w] (16x16 for 224-px encoders). Decode them with "
                "PS-VAE Decode using the same VAE; core VAE nodes cannot read them.")),
        ])

    @classmethod
    def execute(cls, image, vae, resize) -> io.NodeOutput:
        return io.NodeOutput(latents.make_latent(vae, runtime.encode_images(vae, image, resize)))


class PSVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema("PSVAEDecode", "PS-VAE Decode", _DECODE_ABOUT, inputs=[
            io.Latent.Input("latent", tooltip=(
                "Latents from PS-VAE Encode or a PS-VAE sampler, made with this same VAE (checked: the "
                "channel count, and the VAE file the pack's nodes record in their latents).")),
            vae_input(),
        ], outputs=[
            io.Image.Output("image", display_name="image", tooltip="The decoded images, RGB, values 0..1."),
        ])

    @classmethod
    def execute(cls, latent, vae) -> io.NodeOutput:
        return io.NodeOutput(runtime.decode_latents(vae, latent))
