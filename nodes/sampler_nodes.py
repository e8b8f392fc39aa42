"""PSVAET2ISampler (prompt -> LATENT) and PSVAEEditSampler (source + instruction -> LATENT).

Both take the loader's `generator` and `vae`: the generator samples normalised latents, the VAE
supplies the normalisation (its latent statistics), the live preview map and, for editing, the
encoder. Their outputs are raw PS-VAE latents, like PS-VAE Encode's: decode them with PS-VAE Decode.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..psvae_core import flow
from . import sampling
from .types import PSVAEGenerator, vae_input

_VAE_TIP = ("The PS-VAE autoencoder from PS-VAE Loader, the one the generator was trained with (checked): its "
            "latent statistics turn the generator's normalised latents into raw ones, and its latent -> RGB map "
            "draws the live preview.")
_GEN_TIP = "The generator from PS-VAE Loader (its generator_name must not be 'none')."
_SEED_TIP = ("Noise seed. Row i of a batch uses seed + i (drawn on the CPU), so a seed gives the same picture on "
             "every device and in every batch size.")
_STEPS_TIP = f"Euler steps from noise to image (paper: {flow.DEFAULT_STEPS}). One progress tick and preview per step."
_SHIFT_TIP = (f"Time shift of the step schedule towards the noisy end (paper: {flow.DEFAULT_SHIFT}); larger spends "
              "more steps on the layout.")
_OUT_TIP = ("Raw PS-VAE latents [batch, channels, h, w] of the connected VAE (16x16 for 224-px encoders): decode them "
            "with PS-VAE Decode using the same VAE.")
_PROGRESS = ("A progress bar ticks every step with a live preview of the current estimate (the VAE's latent -> RGB "
             "map; grey if the VAE file has none); Cancel stops it between steps.")


def _common_inputs(text_id: str, text_tip: str, placeholder: str) -> list:
    return [
        PSVAEGenerator.Input("generator", tooltip=_GEN_TIP),
        vae_input(_VAE_TIP),
        io.String.Input(text_id, multiline=True, default="", placeholder=placeholder, tooltip=text_tip),
        io.Int.Input("seed", default=0, min=0, max=sampling.SEED_MAX, control_after_generate=True, tooltip=_SEED_TIP),
        io.Int.Input("steps", default=flow.DEFAULT_STEPS, min=1, max=sampling.MAX_STEPS, tooltip=_STEPS_TIP),
    ]


def _float_input(name: str, default: float, tooltip: str, lo: float = 0.0, hi: float = 30.0) -> io.Float.Input:
    """A guidance-style float widget (step 0.1, rounded to 0.01); guidance scales by default, 0..30."""
    return io.Float.Input(name, default=default, min=lo, max=hi, step=0.1, round=0.01, tooltip=tooltip)


def _shift_input() -> io.Float.Input:
    return _float_input("shift", flow.DEFAULT_SHIFT, _SHIFT_TIP, lo=0.1, hi=20.0)


def _settings(seed, steps, shift, guidance, **extra) -> sampling.Settings:
    """The widgets both samplers share, as sampling.Settings (ComfyUI may pass them as other number types)."""
    return sampling.Settings(seed=int(seed), steps=int(steps), shift=float(shift), guidance=float(guidance), **extra)


class PSVAET2ISampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSVAET2ISampler",
            display_name="PS-VAE T2I Sampler",
            category="PS-VAE",
            description=("Text to image with the PS-VAE generator: Euler sampling of the flow-matching model with "
                         "classifier-free guidance (the prompt against no prompt), output as PS-VAE latents. "
                         + _PROGRESS),
            inputs=_common_inputs("prompt", "What the image should show. Must not be empty.",
                                  "a photo of a red fox in the snow")
            + [
                _float_input("cfg", flow.DEFAULT_GUIDANCE, (
                    f"Classifier-free guidance scale (paper: {flow.DEFAULT_GUIDANCE}); 1 = off "
                    "(half the work per step), higher follows the prompt more closely.")),
                _shift_input(),
                io.Int.Input("batch", default=1, min=1, max=sampling.MAX_BATCH,
                             tooltip="How many images to make from the prompt (seeds seed, seed + 1, ...)."),
                io.Float.Input("cfg_interval_start", default=0.0, min=0.0, max=1.0, step=0.01, round=0.001,
                               optional=True, tooltip=(
                                   "Guidance only for times t in [start, end] (t runs from 1 = noise to 0 = image); "
                                   "outside it one plain conditional pass per step. 0..1 = guidance everywhere.")),
                io.Float.Input("cfg_interval_end", default=1.0, min=0.0, max=1.0, step=0.01, round=0.001,
                               optional=True, tooltip="End of the guidance interval (see cfg_interval_start)."),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip=_OUT_TIP)],
        )

    @classmethod
    def validate_inputs(cls, prompt):
        # Only `prompt` is named, so ComfyUI still range-checks every other widget itself.
        return sampling.empty_text_problem(prompt, "prompt") or True

    @classmethod
    def execute(cls, generator, vae, prompt, seed, steps, cfg, shift, batch,
                cfg_interval_start=0.0, cfg_interval_end=1.0) -> io.NodeOutput:
        who = "PS-VAE T2I Sampler"
        gen, vae = sampling.require_models(generator, vae, who)
        interval = None
        if (cfg_interval_start, cfg_interval_end) != (0.0, 1.0):
            interval = (float(cfg_interval_start), float(cfg_interval_end))
        settings = _settings(seed, steps, shift, cfg, cfg_interval=interval)
        return io.NodeOutput(sampling.run(gen, vae, prompt, "prompt", settings, int(batch), None, who))


class PSVAEEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PSVAEEditSampler",
            display_name="PS-VAE Edit Sampler",
            category="PS-VAE",
            description=("Instruction-based image editing with the PS-VAE generator: the source (an IMAGE, or its "
                         "PS-VAE latent) conditions the generator as clean tokens, and dual guidance weighs the "
                         "instruction (text guidance) and the source (image guidance). Connect exactly one source. "
                         "An image is centre-cropped to the generator's aspect ratio (square) and encoded with the "
                         "VAE; one edit per source image. " + _PROGRESS),
            inputs=_common_inputs("instruction", "The edit to make, e.g. 'make the sky stormy'. Must not be empty.",
                                  "make it a watercolour painting")
            + [
                _float_input("text_guidance", 5.0, (
                    "How strongly to follow the instruction (guidance of the instruction over the source alone).")),
                _float_input("image_guidance", 1.5, (
                    "How strongly to stay with the source (guidance of the source over nothing); 1 = neutral. "
                    "With both guidances at 1 a step needs a single pass.")),
                _shift_input(),
                io.Image.Input("source_image", optional=True, tooltip=(
                    "The image to edit (any size; centre-cropped to the generator's aspect ratio, then encoded "
                    "with the VAE). Connect this or source_latent, not both.")),
                io.Latent.Input("source_latent", optional=True, tooltip=(
                    "The image to edit as a PS-VAE latent from PS-VAE Encode with this same VAE (checked). "
                    "Connect this or source_image, not both.")),
            ],
            outputs=[io.Latent.Output("latent", display_name="latent", tooltip=_OUT_TIP)],
        )

    @classmethod
    def validate_inputs(cls, instruction):
        return sampling.empty_text_problem(instruction, "instruction") or True

    @classmethod
    def execute(cls, generator, vae, instruction, seed, steps, text_guidance, image_guidance, shift,
                source_image=None, source_latent=None) -> io.NodeOutput:
        who = "PS-VAE Edit Sampler"
        gen, vae = sampling.require_models(generator, vae, who)
        sampling.tokenize(gen, instruction, "instruction", who)  # fail fast, before encoding the source
        source = sampling.source_latents(gen, vae, source_image, source_latent, who)
        settings = _settings(seed, steps, shift, text_guidance, image_guidance=float(image_guidance))
        return io.NodeOutput(sampling.run(gen, vae, instruction, "instruction", settings, int(source.shape[0]),
                                          source, who))
