"""Every malformed model file of tests/malformed.py, selected in a real ComfyUI's PS-VAE Loader:
the error names the file and is psvae_core's CheckpointError message (for three cases, the pack's
own header check answers first), and the server stays up with flat memory (docs/COMFYUI_PACK.md,
Errors you may see)."""
from __future__ import annotations

import os
import shutil

import pytest

from comfy_harness import execution_error
from malformed import _file_cases
from psvae_core.checkpoint import CheckpointError

pytestmark = pytest.mark.comfyui

GOOD_VAE = "psvae-dinov2b-96c.safetensors"  # written by the comfy_models fixture
SUB = "malformed"  # a subfolder of models/psvae: listed as "malformed/<file>", removed at the end
WARM_UP = 10  # cases run before the memory baseline is taken (first imports, caches)
MAX_GROWTH = 300 << 20  # bytes of resident memory the server may gain over all the other cases
# The pack's own header check (nodes/model_files.py) answers first for these, with the messages of
# docs/COMFYUI_PACK.md, naming the file as listed; every other case gets psvae_core's message.
PACK_MESSAGES = {
    "no format key [vae]": "{name} is a safetensors file but not a PS-VAE file",
    "kind generator in the VAE loader [vae]": "{name} is a PS-VAE generator file, but this slot needs a vae file",
    "a missing file [vae]": "VAE file '{name}' was not found in the 'psvae' model folder(s)",
}


def rss(pid: int) -> int:
    """The resident memory of a process (VmRSS of /proc/<pid>/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def loader_prompt(slot: str, name: str) -> dict:
    vae, generator = (name, "none") if slot == "vae_name" else (GOOD_VAE, name)
    return {
        "1": {"class_type": "PSVAELoader", "inputs": {"vae_name": vae, "generator_name": generator, "dtype": "auto"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "3": {"class_type": "PSVAEEncode", "inputs": {"image": ["2", 0], "vae": ["1", 0], "resize": "center crop"}},
        "4": {"class_type": "PSVAEDecode", "inputs": {"latent": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


def reported_error(server, prompt: dict) -> str:
    """The error ComfyUI reports for a prompt: the validation details of a 400, else the execution
    error's message, which must be a CheckpointError raised by the loader (not another exception)."""
    r = server.queue(prompt)
    if r.status_code == 400:
        errors = [e for node in r.json()["node_errors"].values() for e in node["errors"]]
        assert errors and all(e["type"] == "custom_validation_failed" for e in errors), errors
        return "\n".join(e["details"] for e in errors)
    assert r.status_code == 200, r.text
    entry = server.wait(r.json()["prompt_id"], timeout=60)
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and err is not None, f"the prompt ran: {entry['status']}"
    assert err["node_type"] == "PSVAELoader" and err["exception_type"].endswith(".CheckpointError"), err
    return err["exception_message"]


def core_message(case) -> str:
    """What psvae_core itself says for the case (the documented message)."""
    with pytest.raises(CheckpointError) as raised:
        case.run()
    return str(raised.value)


def test_every_malformed_file_gives_its_checkpoint_error_and_the_server_stays_flat(comfy_server, comfy_base):
    folder = comfy_base / "models" / "psvae" / SUB
    folder.mkdir()
    try:
        # One query per (file, loader slot): VAE cases in vae_name, generator cases in generator_name
        # (beside a good VAE); read_metadata/fingerprint-only entry points have no ComfyUI slot.
        queries, seen = [], set()
        for case in _file_cases(folder):
            slot = {"[vae]": "vae_name", "[generator]": "generator_name"}.get(case.name.rsplit(" ", 1)[-1])
            if slot and case.path.parent == folder and (case.path, slot) not in seen:
                seen.add((case.path, slot))
                queries.append((case, slot, f"{SUB}/{case.path.name}"))
        assert len(queries) >= 180, len(queries)

        pid = comfy_server.proc.pid
        wrong, readings = [], []
        for i, (case, slot, name) in enumerate(queries):
            text = reported_error(comfy_server, loader_prompt(slot, name))
            if case.name in PACK_MESSAGES:
                expected = PACK_MESSAGES[case.name].format(name=name)
            else:
                expected = core_message(case)
                assert expected.startswith(f"{case.path}: "), expected  # it names the file first
            if expected not in text:
                wrong.append(f"{case.name} ({slot}={name}):\n  ComfyUI: {text[:400]}\n  expected: {expected[:400]}")
            if i == WARM_UP:
                baseline = rss(pid)
            readings.append(rss(pid))
        assert not wrong, f"{len(wrong)} of {len(queries)} cases:\n" + "\n".join(wrong)
        assert comfy_server.alive()
        growth = max(readings[WARM_UP:]) - baseline
        print(f"\n{len(queries)} loader prompts of malformed files; server RSS {readings[0] >> 20} MiB at the first case, "
              f"{baseline >> 20} MiB after {WARM_UP}, peak {max(readings) >> 20} MiB, last {readings[-1] >> 20} MiB; "
              f"growth after the warm-up {growth / (1 << 20):.1f} MiB")
        assert growth < MAX_GROWTH, f"the server grew by {growth >> 20} MiB over {len(queries) - WARM_UP} bad files"
    finally:
        shutil.rmtree(folder)
    assert not os.path.exists(folder)
