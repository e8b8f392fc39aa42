"""ComfyUI entry point of the PS-VAE pack.

Only ComfyUI imports this file (as the pack's package). Outside ComfyUI nothing here is loaded,
so `psvae_core` and `trainer` stay importable and testable on their own.
"""
try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # imported by tooling outside ComfyUI
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
