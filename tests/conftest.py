"""Shared pytest set-up. The real-ComfyUI harness lives in comfy_harness.py (fixtures + log hook)."""
from comfy_harness import (  # noqa: F401  (fixtures and hooks are found by name)
    comfy_base,
    comfy_models,
    comfy_server,
    pytest_runtest_makereport,
)
