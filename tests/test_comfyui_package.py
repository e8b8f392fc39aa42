"""Packaging of the ComfyUI pack: the Comfy registry's own check (`comfy node validate` from
comfy-cli 1.23.0, built by `make comfy-cli`), the pyproject/requirements rules ComfyUI-Manager and
the registry rely on, the test server's environment being a user's, and the pack's VAE fingerprint
agreeing with the trainer's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from comfy_harness import COMFY_PYTHON, REPO, pack_fingerprint, write_tiny_vae

COMFY_CLI = REPO / ".cache" / "comfy-cli" / "bin" / "comfy"


def test_comfy_cli_node_validate_passes_without_warnings(tmp_path):
    if not os.access(COMFY_CLI, os.X_OK):
        pytest.skip(f"comfy-cli is not installed at {COMFY_CLI}; run `make comfy-cli` (CI's `make test` does)")
    env = dict(os.environ, HOME=str(tmp_path), NO_COLOR="1", COLUMNS="200")  # its config goes to $HOME
    proc = subprocess.run([str(COMFY_CLI), "--skip-prompt", "node", "validate"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "All validation checks passed" in out, out
    assert "Security warnings" not in out, f"exec/eval/';'-joined statements (soon refused by the registry):\n{out}"


def test_pyproject_and_requirements_follow_the_registry_rules():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9._-]{0,99}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]), "semver: the publish action triggers on a bump"
    assert project["urls"]["Repository"].startswith("https://")
    assert isinstance(project["license"], dict)
    assert "PublisherId" in comfy and comfy["DisplayName"] == "PS-VAE"
    floor = tuple(int(x) for x in comfy["requires-comfyui"].lstrip(">=").split("."))
    assert floor >= (0, 3, 48), "V3 nodes (comfy_api.latest) need ComfyUI >= 0.3.48"
    assert data["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        spec = line.strip()
        if not spec or spec.startswith("#"):
            continue
        name = re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower()
        assert name not in {"torch", "torchvision", "torchaudio"}, "never list torch: it breaks CUDA installs"
        assert not spec.startswith("-"), f"ComfyUI-Manager installs one line at a time: {spec!r}"


# Run by ComfyUI's interpreter: each line of the pack's requirements.txt against what is installed.
UNMET_REQUIREMENTS = """
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
unmet, versions = [], {}
for line in map(str.strip, open(sys.argv[1])):
    if line and not line.startswith("#"):
        req = Requirement(line)
        try:
            versions[req.name] = md.version(req.name)
        except md.PackageNotFoundError:
            versions[req.name] = None
        if versions[req.name] is None or not req.specifier.contains(versions[req.name], prereleases=True):
            unmet.append(str(req))
versions.update((n, md.version(n)) for n in ("torch", "torchvision"))
print(json.dumps({"unmet": unmet, "versions": versions}))
"""


@pytest.mark.comfyui
def test_the_test_server_runs_in_comfyuis_own_venv_with_the_pack_installed_as_users_do(comfy_server):
    interpreter = Path(f"/proc/{comfy_server.proc.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert Path(interpreter) == COMFY_PYTHON and Path(interpreter).parent != Path(sys.executable).parent
    proc = subprocess.run([str(COMFY_PYTHON), "-c", UNMET_REQUIREMENTS, str(REPO / "requirements.txt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    print("ComfyUI venv:", found["versions"])
    assert found["unmet"] == [], found
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split()
                if line.startswith(("torch==", "torchvision==")))
    assert {n: found["versions"][n].split("+")[0] for n in pins} == pins, "PyTorch is the user's, installed first"


def test_the_pack_fingerprints_a_vae_file_as_the_trainer_does(tmp_path):
    trainer_data = pytest.importorskip("trainer.data", reason="the trainer's latent cache is not importable")
    path = write_tiny_vae(tmp_path / "v.safetensors", seed=4)
    assert pack_fingerprint(path) == trainer_data.vae_fingerprint(path)
    other = write_tiny_vae(tmp_path / "w.safetensors", seed=5)
    assert pack_fingerprint(other) != pack_fingerprint(path)
    Path(path).touch()  # a new mtime (re-read), same content
    assert pack_fingerprint(path) == trainer_data.vae_fingerprint(path)
