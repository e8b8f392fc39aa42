"""PSVAELoader: one loader, two files (the autoencoder and, optionally, the generator).

One node rather than two so that the pair is checked together, before anything runs: a generator
trained on another VAE's latents is refused with a message instead of producing noise.
"""
from __future__ import annotations

import os

import torch

import comfy.model_management as mm
from comfy_api.latest import io

from ..psvae_core import checkpoint
from ..psvae_core.autoencoder import PSVAE
from . import handles, model_files
from .generator import load_generator
from .types import PSVAEGenerator, PSVAEVae, node_schema

_WHERE = ("Files are listed from ComfyUI/models/psvae, any 'psvae:' folder in extra_model_paths.yaml, then the "
          "pack's bundled models folder (a file of the same name in your folders wins).")


class PSVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        # Re-read on every /object_info, so new files show after a refresh; each slot offers its kind only.
        vaes, generators = (model_files.list_files(k) for k in (model_files.KIND_VAE, model_files.KIND_GENERATOR))
        return node_schema(
            "PSVAELoader", "PS-VAE Loader",
            ("Loads a PS-VAE autoencoder file and, optionally, a PS-VAE generator file (single-file "
             ".safetensors exports of the PS-VAE trainer; never pickles, never the network). When both "
             "are chosen it checks, before anything runs, that they belong together: the same latent channels, the "
             "generator's latent grid equal to the VAE's, and (when the generator file records the VAE it was "
             "trained with) the same latent statistics or VAE file. " + _WHERE),
            inputs=[
                # Short labels ("vae", "gen"; the frontend takes them from locales/en/nodeDefs.json): at the
                # default node width it cuts a longer label ("generator" -> "gen…") to fit the file name.
                io.Combo.Input("vae_name", display_name="vae", options=vaes, tooltip=(
                    "The PS-VAE autoencoder file (kind 'vae'): encodes images to latents and decodes them. "
                    + _WHERE)),
                io.Combo.Input("generator_name", display_name="gen", options=[model_files.NONE] + generators,
                               default=model_files.NONE,
                               tooltip=("The PS-VAE generator file (kind 'generator') used by the T2I and Edit "
                                        "samplers, or 'none' to load only the autoencoder. It must belong to the "
                                        "VAE above (checked). " + _WHERE)),
                io.Combo.Input("dtype", options=handles.DTYPE_CHOICES, default="auto", tooltip=(
                    "Weight/compute precision. 'auto' follows ComfyUI (bf16 where the GPU supports it, else "
                    "fp32; --fp16-vae / --bf16-vae / --fp32-vae and --fp16-unet / --bf16-unet override it). "
                    "fp16 is never used on the CPU.")),
            ],
            outputs=[
                PSVAEVae.Output("vae", display_name="vae", tooltip=(
                    "The autoencoder, managed by ComfyUI's model management: connect it to PS-VAE Encode, "
                    "PS-VAE Decode and the samplers.")),
                PSVAEGenerator.Output("generator", display_name="generator", tooltip=(
                    "The generator for the T2I / Edit samplers (empty when generator_name is 'none').")),
            ],
        )

    @classmethod
    def validate_inputs(cls, vae_name, generator_name):
        # A header-only check, so a wrong file is flagged before anything runs. The inputs named in
        # this signature skip ComfyUI's own "value not in list" check (the lists are filtered by
        # kind, so a file of the other kind sent through the API gets this message, which says
        # where it belongs, instead); existence is checked here too.
        if not model_files.list_files():
            return (f"no model files found in the 'psvae' model folder(s): {model_files.searched_folders()}. "
                    "Put the PS-VAE .safetensors files there and refresh the page.")
        problem = model_files.kind_problem(vae_name, model_files.KIND_VAE)
        if problem:
            return f"vae_name: {problem}"
        if generator_name != model_files.NONE:
            problem = model_files.kind_problem(generator_name, model_files.KIND_GENERATOR)
            if problem:
                return f"generator_name: {problem}"
        return True

    @classmethod
    def fingerprint_inputs(cls, vae_name, generator_name, dtype):
        # A file rewritten in place (e.g. a new trainer export) is reloaded on the next run.
        stamp = []
        for name in (vae_name, generator_name):
            path = model_files.resolve(name, "model") if name != model_files.NONE else None
            st = os.stat(path) if path else None
            stamp.append((name, st.st_mtime_ns, st.st_size) if st else (name,))
        return (tuple(stamp), dtype)

    @classmethod
    def execute(cls, vae_name, generator_name, dtype) -> io.NodeOutput:
        path = model_files.resolve(vae_name, "VAE")
        device, offload = mm.vae_device(), mm.vae_offload_device()
        try:  # straight onto the device the model waits on (the GPU itself with --gpu-only)
            vae = PSVAE.from_file(path, device=offload)
        except checkpoint.CheckpointError as err:
            raise checkpoint.CheckpointError(f"PS-VAE Loader (vae_name): {err}") from err
        # auto: bf16 where the device runs it natively, else fp32 (fp16 only when forced: the conv
        # decoder can overflow in fp16).
        vae_dtype = handles.choose_dtype(dtype, device, lambda: mm.vae_dtype(device, [torch.bfloat16, torch.float32]))
        handle = handles.PSVAEHandle(vae, vae_name, vae_dtype, device, offload, path=path)
        generator = None
        if generator_name != model_files.NONE:
            generator = load_generator(model_files.resolve(generator_name, "generator"), generator_name, handle, dtype)
        return io.NodeOutput(handle, generator)
