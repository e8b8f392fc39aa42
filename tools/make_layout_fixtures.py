"""Write the tiny VAE files of tests/data/layouts under the installed transformers.

Run once per transformers layout (the project venv's pinned 4.x and the newest 5.x in ComfyUI's
venv, `make comfyui`):
    .venv/bin/python tools/make_layout_fixtures.py
    .cache/comfyui/venv/bin/python tools/make_layout_fixtures.py
Per encoder family it writes `<family>-tf<major>.safetensors` (a VAE file as `PSVAE.save` writes it)
and `<family>-tf<major>.expected.safetensors` (an input image and the latents and decoded image
the file gives here). Under 5.x it also writes `<family>-tf5-legacy.safetensors`: the same weights
under transformers' own names, as psvae_core wrote files before its fixed names (format 1).
tests/test_checkpoint.py loads every file under each layout and compares with the expected tensors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psvae_core import checkpoint  # noqa: E402
from psvae_core.autoencoder import PSVAE  # noqa: E402
from psvae_core.config import EncoderConfig, PixelDecoderConfig, PSVAEConfig, SemanticConfig  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "layouts"
TINY = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)
HF = {  # family: (transformers config, input side)
    "dinov2": (dict(model_type="dinov2", patch_size=14, image_size=28), 28),
    "dinov2_reg": (dict(model_type="dinov2_with_registers", patch_size=14, image_size=28, num_register_tokens=2), 28),
    "dinov3": (dict(model_type="dinov3_vit", patch_size=16, image_size=32, num_register_tokens=2), 32),
    "siglip": (dict(model_type="siglip_vision_model", patch_size=14, image_size=28), 28),
    "siglip2": (dict(model_type="siglip2_vision_model", patch_size=14, num_patches=4), 28),
    "clip": (dict(model_type="clip_vision_model", patch_size=14, image_size=28), 28),
}


def config(family: str) -> PSVAEConfig:
    hf, side = HF[family]
    return PSVAEConfig(latent_channels=4, encoder=EncoderConfig(family=family, hf_config={**hf, **TINY}, image_size=side),
                       semantic=SemanticConfig(depth=1),
                       pixel_decoder=PixelDecoderConfig(base_channels=4, channel_mult=(1,), num_res_blocks=1,
                                                        attention=False))


def main() -> None:
    major = transformers.__version__.split(".")[0]
    OUT.mkdir(parents=True, exist_ok=True)
    for i, family in enumerate(HF):
        torch.manual_seed(i)
        model = PSVAE(config(family)).eval()
        stem = f"{family}-tf{major}"
        model.save(OUT / f"{stem}.safetensors", dtype=torch.float16)
        if major != "4":  # what psvae_core wrote before its fixed names: transformers' own
            tensors = {k: v.half() for k, v in model.state_dict().items()}
            checkpoint.save_component(OUT / f"{stem}-legacy.safetensors", kind="vae", config=model.config.to_dict(),
                                      tensors=tensors, provenance={"legacy": True})
        loaded = PSVAE.from_file(OUT / f"{stem}.safetensors")
        side = HF[family][1]
        images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            latents = loaded.encode(images).mode().contiguous()
            decoded = loaded.decode(latents).contiguous()
        save_file({"images": images, "latents": latents, "decoded": decoded}, OUT / f"{stem}.expected.safetensors",
                  metadata={"transformers": transformers.__version__})
        print(f"{stem}: latents {list(latents.shape)}")


if __name__ == "__main__":
    main()
