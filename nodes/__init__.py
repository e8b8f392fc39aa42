"""The pack's V3 nodes: thin shells over psvae_core (parse inputs -> call the library -> format outputs).

Imported only inside ComfyUI (the pack's top-level __init__ checks for `comfy` first).
Node ids are workflow identity: they never change, and widgets are only ever appended.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import model_files
from .loader import PSVAELoader
from .sampler_nodes import PSVAEEditSampler, PSVAET2ISampler
from .vae_nodes import PSVAEDecode, PSVAEEncode

model_files.register_model_folder()

NODES: list[type[io.ComfyNode]] = [PSVAELoader, PSVAEEncode, PSVAEDecode, PSVAET2ISampler, PSVAEEditSampler]


class PSVAEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> PSVAEExtension:
    return PSVAEExtension()
