"""PSVAET2ISampler (prompt -> LATENT) and PSVAEEditSampler (source + instruction -> LATENT).

Both take the loader's `generator` and `vae`: the generator samples normalised latents, the VAE
supplies the normalisation (its latent statistics), the live preview map and, for editing, the
encoder. Their outputs are raw PS-VAE latents, like PS-VAE Encode's: decode them with PS-VAE Decode.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..psvae_core import flow
from . import sampling
from .types import PSVAEGenerator, node_schema, vae_input

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
_DENOISE_TIP = ("How much of the schedule runs from init_latent (img2img). 1 (default) = from pure noise: init_latent "
                "is ignored and this is plain sampling. Lower starts later on the shifted time grid, from init_latent "
                "noised to that time (row i with seed + i), so the result stays closer to it; all the steps are "
                "spread over the part that runs. Below 1 it needs init_latent.")
_T2I_NEGATIVE_TIP = ("What the image should not show. cfg then guides away from it instead of from no prompt (no "
                     "effect at cfg 1). Empty (default) = guidance against no prompt, exactly as without it.")
_T2I_INIT_TIP = ("A PS-VAE latent to start from (img2img), made with this same VAE (PS-VAE Encode or a sampler) on the "
                 "generator's grid; used when denoise < 1. One latent for the whole batch, or one per image.")
_EDIT_NEGATIVE_TIP = ("An edit to steer away from. It replaces the empty text of both guidances: text guidance weighs "
                      "the instruction against it (with the source), image guidance the source with it against "
                      "neither. Empty (default) = plain dual guidance, exactly as without it.")
_EDIT_INIT_TIP = ("A PS-VAE latent of the result to start from (e.g. PS-VAE Encode of the source itself, so that less "
                  "changes), made with this same VAE; used when denoise < 1. One latent, or one per source.")


def _text_inputs(text_id: str, text_tip: str, placeholder: str) -> list:
    """The inputs both samplers start with (widget order is workflow identity: only ever append)."""
    return [
        PSVAEGenerator.Input("generator", tooltip=_GEN_TIP),
        vae_input(_VAE_TIP),
        io.String.Input(text_id, multiline=True, default="", placeholder=placeholder, tooltip=text_tip),
        io.Int.Input("seed", default=0, min=0, max=sampling.SEED_MAX, control_after_generate=True, tooltip=_SEED_TIP),
        io.Int.Input("steps", default=flow.DEFAULT_STEPS, min=1, max=sampling.MAX_STEPS, tooltip=_STEPS_TIP),
    ]


def _img2img_inputs(negative_id: str, negative_tip: str, negative_placeholder: str, init_tip: str) -> list:
    """The inputs both samplers end with: a negative text, an init latent and denoise (appended later
    than the rest, optional, defaults = the samplers as they were)."""
    return [
        io.String.Input(negative_id, multiline=True, default="", placeholder=negative_placeholder, optional=True,
                        tooltip=negative_tip),
        io.Latent.Input("init_latent", optional=True, tooltip=init_tip),
        io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, round=0.001, optional=True,
                       tooltip=_DENOISE_TIP),
    ]


def _float_input(name: str, default: float, tooltip: str, lo: float = 0.0, hi: float = 30.0) -> io.Float.Input:
    """A guidance-style float widget (step 0.1, rounded to 0.01); guidance scales by default, 0..30."""
    return io.Float.Input(name, default=default, min=lo, max=hi, step=0.1, round=0.01, tooltip=tooltip)


def _shift_input() -> io.Float.Input:
    return _float_input("shift", flow.DEFAULT_SHIFT, _SHIFT_TIP, lo=0.1, hi=20.0)


def _settings(seed, steps, shift, guidance, denoise, **extra) -> sampling.Settings:
    """The widgets both samplers share, as sampling.Settings (ComfyUI may pass them as other number types)."""
    return sampling.Settings(seed=int(seed), steps=int(steps), shift=float(shift), guidance=float(guidance),
                             denoise=float(denoise), **extra)


class _Sampler(io.ComfyNode):
    """What both samplers share: the schema from NODE_ID, WHO (the display name, which messages
    name too), ABOUT and `inputs()`, with the one LATENT output; the run through sampling.sample."""
    NODE_ID = WHO = ABOUT = TEXT = ""  # TEXT: what the node's text is ("prompt" or "instruction")

    @classmethod
    def inputs(cls) -> list:
        raise NotImplementedError

    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(cls.NODE_ID, cls.WHO, cls.ABOUT + " " + _PROGRESS, cls.inputs(),
                           [io.Latent.Output("latent", display_name="latent", tooltip=_OUT_TIP)])

    @classmethod
    def sample(cls, generator, vae, text, settings, negative, init_latent, **where) -> io.NodeOutput:
        return io.NodeOutput(sampling.sample(cls.WHO, generator, vae, text, cls.TEXT, settings, negative=negative,
                                             init_latent=init_latent, **where))


class PSVAET2ISampler(_Sampler):
    NODE_ID, WHO, TEXT = "PSVAET2ISampler", "PS-VAE T2I Sampler", "prompt"
    ABOUT = ("Text to image with the PS-VAE generator: Euler sampling of the flow-matching model with classifier-free "
             "guidance (the prompt against no prompt, or against the negative prompt), output as PS-VAE latents. "
             "img2img: connect init_latent and lower denoise.")

    @classmethod
    def inputs(cls) -> list:
        return (
            _text_inputs("prompt", "What the image should show. Must not be empty.", "a photo of a red fox in the snow")
            + [
                _float_input("cfg", flow.DEFAULT_GUIDANCE, (
                    f"Classifier-free guidance scale (paper: {flow.DEFAULT_GUIDANCE}); 1 = off "
                    "(half the work per step), higher follows the prompt more closely.")),
                _shift_input(),
                io.Int.Input("batch", default=1, min=1, max=sampling.MAX_BATCH, tooltip=(
                    "How many images to make from the prompt (seeds seed, seed + 1, ...). With an init_latent of "
                    "several latents, 1 makes one image per latent.")),
                io.Float.Input("cfg_interval_start", default=0.0, min=0.0, max=1.0, step=0.01, round=0.001,
                               optional=True, tooltip=(
                                   "Guidance only for times t in [start, end] (t runs from 1 = noise to 0 = image); "
                                   "outside it one plain conditional pass per step. 0..1 = guidance everywhere.")),
                io.Float.Input("cfg_interval_end", default=1.0, min=0.0, max=1.0, step=0.01, round=0.001,
                               optional=True, tooltip="End of the guidance interval (see cfg_interval_start)."),
            ]
            + _img2img_inputs("negative_prompt", _T2I_NEGATIVE_TIP, "blurry, text, watermark", _T2I_INIT_TIP))

    @classmethod
    def validate_inputs(cls, prompt):
        # Only `prompt` is named, so ComfyUI still range-checks every other widget itself.
        return sampling.empty_text_problem(prompt, cls.TEXT) or True

    @classmethod
    def execute(cls, generator, vae, prompt, seed, steps, cfg, shift, batch, cfg_interval_start=0.0,
                cfg_interval_end=1.0, negative_prompt="", init_latent=None, denoise=1.0) -> io.NodeOutput:
        interval = None
        if (cfg_interval_start, cfg_interval_end) != (0.0, 1.0):
            interval = (float(cfg_interval_start), float(cfg_interval_end))
        settings = _settings(seed, steps, shift, cfg, denoise, cfg_interval=interval)
        return cls.sample(generator, vae, prompt, settings, negative_prompt, init_latent, batch=int(batch))


class PSVAEEditSampler(_Sampler):
    NODE_ID, WHO, TEXT = "PSVAEEditSampler", "PS-VAE Edit Sampler", "instruction"
    ABOUT = ("Instruction-based image editing with the PS-VAE generator: the source (an IMAGE, or its PS-VAE latent) "
             "conditions the generator as clean tokens, and dual guidance weighs the instruction (text guidance) and "
             "the source (image guidance); a negative instruction takes the place of the empty text in both. "
             "Connect exactly one source. An image is centre-cropped to the generator's aspect ratio (square) and "
             "encoded with the VAE; one edit per source image.")

    @classmethod
    def inputs(cls) -> list:
        return (
            _text_inputs("instruction", "The edit to make, e.g. 'make the sky stormy'. Must not be empty.",
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
            ]
            + _img2img_inputs("negative_instruction", _EDIT_NEGATIVE_TIP, "make it blurry", _EDIT_INIT_TIP))

    @classmethod
    def validate_inputs(cls, instruction):
        return sampling.empty_text_problem(instruction, cls.TEXT) or True

    @classmethod
    def execute(cls, generator, vae, instruction, seed, steps, text_guidance, image_guidance, shift,
                source_image=None, source_latent=None, negative_instruction="", init_latent=None,
                denoise=1.0) -> io.NodeOutput:
        settings = _settings(seed, steps, shift, text_guidance, denoise, image_guidance=float(image_guidance))
        return cls.sample(generator, vae, instruction, settings, negative_instruction, init_latent,
                          sources=(source_image, source_latent))
