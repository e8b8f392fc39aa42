"""A real ComfyUI 0.3.75 server for the `comfyui`-marked tests (built by `make comfyui`).

The server runs the unmodified ComfyUI from .cache/comfyui/ComfyUI with the python of ComfyUI's own
venv, .cache/comfyui/venv, set up as a user's is (tools/build_comfyui.sh; README.md, "What runs
where"), not with this pytest process's pinned one:
`main.py --cpu --listen 127.0.0.1 --port <free> --base-directory <tmp>`, with this checkout
symlinked as <tmp>/custom_nodes/ps-vae (the folder name users clone into, so the template browser
and node badges read "ps-vae"). Tests put models into <tmp>/models/psvae. The server is stopped by
its PID at the end of the session, and its log is attached to every failing comfyui test.

Also here: a small HTTP client (post prompt, poll history, view, interrupt, free) and a UI -> API
workflow converter driven by the server's /object_info.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("PSVAE_COMFYUI_DIR", REPO / ".cache" / "comfyui" / "ComfyUI"))
# ComfyUI's interpreter; no .resolve(): a venv's bin/python is a symlink to the base interpreter.
COMFY_PYTHON = Path(os.environ.get("PSVAE_COMFYUI_PYTHON", REPO / ".cache" / "comfyui" / "venv" / "bin" / "python"))
BROWSER_DIR = Path(os.environ.get("PSVAE_BROWSER_DIR", REPO / ".cache" / "browser"))
PACK_NAME = "ps-vae"
START_TIMEOUT_S = 120
UI_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    pass


class ComfyServer:
    """One ComfyUI process and a minimal client for its HTTP API."""

    def __init__(self, base_dir: Path, port: Optional[int] = None, extra_args: tuple = ()):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.extra_args = tuple(extra_args)
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    # --- life cycle -----------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("custom_nodes", "models/psvae", "input", "output", "temp", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    def start(self) -> "ComfyServer":
        self.prepare()
        cmd = [str(COMFY_PYTHON), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base_dir),
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        # One torch thread: the tiny test models gain nothing from more, and on a busy 2-core box (the
        # browser, other jobs) spinning OpenMP threads made a 50-step sampler run 4-5x slower.
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("PYTHONPATH", None)  # the pack must work from custom_nodes alone
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer /system_stats within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return requests.get(self.url + "/system_stats", timeout=5).ok
        except requests.RequestException:
            return False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 20000) -> str:
        return self.log_text()[-chars:]

    # --- HTTP -------------------------------------------------------------------------------------
    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def post(self, path: str, payload: Any, **kw) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=kw.pop("timeout", 30), **kw)

    def object_info(self, node: Optional[str] = None) -> dict:
        r = self.get("/object_info" + (f"/{node}" if node else ""))
        r.raise_for_status()
        return r.json()

    def queue(self, prompt: dict, extra_data: Optional[dict] = None) -> requests.Response:
        """POST /prompt; returns the response (200 with prompt_id, or 400 with node_errors)."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        return self.post("/prompt", body)

    def history(self, prompt_id: str) -> Optional[dict]:
        r = self.get(f"/history/{prompt_id}")
        r.raise_for_status()
        return r.json().get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll /history until the prompt finished (success or error); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 180, expect_success: bool = True) -> dict:
        r = self.queue(prompt)
        if r.status_code != 200:
            raise PromptFailed(f"POST /prompt -> {r.status_code}: {r.text[:4000]}")
        entry = self.wait(r.json()["prompt_id"], timeout)
        if expect_success and entry["status"]["status_str"] != "success":
            raise PromptFailed(f"prompt failed: {json.dumps(execution_error(entry), indent=1)[:4000]}")
        return entry

    def view(self, image: dict) -> bytes:
        r = self.get("/view", params={"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                      "type": image.get("type", "output")})
        r.raise_for_status()
        return r.content

    def events(self) -> "EventStream":
        return EventStream(self)

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}).raise_for_status()

    def free(self, unload_models: bool = False) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": True}).raise_for_status()


class EventStream:
    """Websocket events of one client id (/ws), collected in a background thread (aiohttp, which
    ComfyUI itself depends on): JSON events in `events`, binary frames (live previews) in `binary`.
    Use as a context manager; `wait_for(pred)` blocks until an event matches."""

    def __init__(self, server: "ComfyServer"):
        self.url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
        self.events: list[dict] = []
        self.binary: list[tuple[int, bytes]] = []
        self._cond = threading.Condition()
        self._stop = None
        self._thread = None

    def __enter__(self) -> "EventStream":
        import asyncio

        ready = threading.Event()

        async def main():
            import aiohttp

            self._stop = asyncio.Event()
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.url, heartbeat=20) as ws:
                    ready.set()
                    while not self._stop.is_set():
                        try:
                            msg = await asyncio.wait_for(ws.receive(), timeout=0.2)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            with self._cond:
                                self.events.append(json.loads(msg.data))
                                self._cond.notify_all()
                        elif msg.type == aiohttp.WSMsgType.BINARY and len(msg.data) >= 4:
                            with self._cond:  # (event type, payload): 1 = preview image, 4 = with metadata
                                self.binary.append((int.from_bytes(msg.data[:4], "big"), bytes(msg.data[4:])))
                                self._cond.notify_all()
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(main(),), daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise RuntimeError(f"could not connect to {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, pred, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if pred(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching websocket event within {timeout} s; got {self.events[-5:]}")
                self._cond.wait(left)


def execution_error(entry: dict) -> Optional[dict]:
    """The `execution_error` message of a history entry, or None."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def output_images(entry: dict) -> list[dict]:
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]


def saved_arrays(server: ComfyServer, entry: dict) -> list:
    """The saved images of a finished prompt as uint8 RGB arrays."""
    import io

    import numpy as np
    from PIL import Image

    images = output_images(entry)
    assert images, f"no output images in {entry.get('outputs')}"
    return [np.asarray(Image.open(io.BytesIO(server.view(img))).convert("RGB")) for img in images]


def assert_node_error(server: ComfyServer, prompt: dict, *needles: str) -> str:
    """The prompt fails with a message naming the problem (validation 400 or execution error), and
    the server keeps answering."""
    r = server.queue(prompt)
    if r.status_code == 400:
        body = r.json()
        assert body.get("node_errors"), body
        text = str(body)
    else:
        assert r.status_code == 200, r.text
        entry = server.wait(r.json()["prompt_id"])
        assert entry["status"]["status_str"] == "error"
        err = execution_error(entry)
        assert err is not None, entry["status"]
        assert err["node_type"].startswith("PSVAE"), err
        text = err["exception_message"]
    for needle in needles:
        assert needle.lower() in text.lower(), text
    assert server.alive(), "the server stopped answering after a bad input"
    return text


# --------------------------------------------------------------------------- UI -> API conversion

def _widget_names(info: dict) -> list[tuple[str, bool, Any]]:
    """(name, has_control_after_generate, default) of a node's widget inputs, in definition order."""
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, []):
            spec = specs[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                if opts.get("forceInput"):
                    continue
                out.append((name, bool(opts.get("control_after_generate"))
                            or (name in ("seed", "noise_seed") and kind == "INT"), opts.get("default")))
                if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
                    out.append((f"{name}__upload", False, None))  # the upload button's own (ignored) value
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow (frontend `version 0.4`) to an API prompt, the way the frontend
    does: widget values are positional over the node's widget inputs (a seed-like widget carries one
    extra "control after generate" value), a widget appended after the workflow was saved gets its
    default, links become [source id, slot]. Muted/bypassed nodes and UI-only nodes are left out."""
    links = {l[0]: l for l in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in UI_ONLY_NODES or node.get("mode", 0) in (2, 4):
            continue
        if kind not in object_info:
            raise KeyError(f"workflow node {node['id']} has unknown type {kind!r}")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {node['id']} ({kind}) stores widgets as a dict; not supported here")
        pos = 0
        for name, control, default in _widget_names(object_info[kind]):
            if name.endswith("__upload"):
                pass
            elif pos < len(values):
                inputs[name] = values[pos]
            elif default is not None:  # newer than the saved workflow: the frontend fills in the default
                inputs[name] = default
            pos += 1 + (1 if control else 0)
        for inp in node.get("inputs", []):
            link = inp.get("link")
            if link is None:
                continue
            _, src, slot, *_ = links[link]
            inputs[inp["name"]] = [str(src), slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or object_info[kind]["display_name"]}}
    return prompt


# ----------------------------------------------------------------------------- headless frontend

FRONTEND_DRIVER = REPO / "tests" / "browser" / "comfy_frontend.js"


def chromium_path() -> Optional[str]:
    import shutil

    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> Optional[str]:
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return f"no playwright-core in {BROWSER_DIR}; run `make browser`"
    if not chromium_path():
        return "no chromium binary on PATH; run `make browser`"
    import shutil

    if not shutil.which("node"):
        return "no node binary on PATH"
    return None


def run_frontend(server: ComfyServer, command: str, job: dict, workdir: Path, timeout: float = 300) -> dict:
    """Run one command of tests/browser/comfy_frontend.js against `server`; returns its JSON result."""
    workdir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = workdir / f"{command}.job.json", workdir / f"{command}.result.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, COMFY_URL=server.url, CHROMIUM=chromium_path() or "",
               PLAYWRIGHT_CORE=str(BROWSER_DIR / "node_modules" / "playwright-core"),
               PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD="1")
    proc = subprocess.run(["node", str(FRONTEND_DRIVER), command, str(job_path), str(result_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"frontend driver '{command}' failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------- pytest fixtures

def harness_missing() -> Optional[str]:
    if not (COMFY_DIR / "main.py").is_file():
        return f"no ComfyUI at {COMFY_DIR}; run `make comfyui`"
    if not os.access(COMFY_PYTHON, os.X_OK):
        return f"no ComfyUI venv python at {COMFY_PYTHON}; run `make comfyui`"
    return None


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """The server's --base-directory; tests add model files under models/psvae."""
    missing = harness_missing()
    if missing:
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("comfy_base")
    ComfyServer(base).prepare()
    return base


# File names the shipped workflows refer to; the tests write tiny real checkpoints under them.
TINY_MODEL_FILES = {
    "psvae-dinov2b-96c.safetensors": dict(mode="psvae", seed=0),
    "svae-dinov2b-96c.safetensors": dict(mode="psvae", seed=1),
    "rae-dinov2b.safetensors": dict(mode="rae", seed=2),
}
# Generators (file -> the VAE file it is trained with, recorded in its provenance).
TINY_GENERATOR_FILES = {
    "psvae-generator-653m.safetensors": dict(vae="psvae-dinov2b-96c.safetensors", seed=0),
}
TINY_WORDS = ("a an the of in on with and photo painting picture red green blue yellow orange purple white "
              "black fox cat dog bird tree house sky sea snow forest city mountain flower make it more sunny "
              "stormy night day watercolour sketch oil cartoon golden hour sitting standing").split()


def write_tiny_vae(path: Path, mode: str = "psvae", seed: int = 0, **changes) -> Path:
    """A tiny but real PS-VAE checkpoint written by the project's own code (psvae_core), with latent
    statistics and a latent -> RGB preview map of its own (seeded), as a trainer export has."""
    import torch
    from psvae_core.autoencoder import PSVAE
    from psvae_core.config import PRESETS

    torch.manual_seed(seed)
    vae = PSVAE(PRESETS["tiny"].replace(mode=mode, **changes)).eval()
    g = torch.Generator().manual_seed(1000 + seed)
    c = vae.latent_channels
    vae.set_latent_stats(torch.randn(c, generator=g) * 0.2, torch.rand(c, generator=g) + 0.5)
    with torch.no_grad():
        z = torch.randn(2, c, 8, 8, generator=g)
        vae.fit_preview(z, vae.decode(z).clamp(0, 1))
    vae.save(path, provenance={"written_by": "tests/comfy_harness.py", "mode": mode})
    return path


def tiny_tokenizer():
    """A word-level tokenizer built offline (ids < 256, the tiny LM's vocabulary)."""
    from tiny_models import word_tokenizer

    return word_tokenizer(sorted(set(TINY_WORDS)))


def pack_fingerprint(path: Path) -> str:
    """The VAE fingerprint the pack and the trainer both use (psvae_core.checkpoint.fingerprint)."""
    from psvae_core.checkpoint import fingerprint

    return fingerprint(path)


def recorded_vae(vae_path: Path, record=("fingerprint", "latent_stats")) -> dict:
    """provenance["vae"] as the trainer's generator export records it (docs/COMFYUI_PACK.md)."""
    from psvae_core.checkpoint import read_metadata

    rec = {"file": Path(vae_path).name}
    if "fingerprint" in record:
        rec["fingerprint"] = pack_fingerprint(vae_path)
    if "latent_stats" in record:
        rec["latent_stats"] = json.loads(read_metadata(vae_path)["latent_stats"])
    return rec


def write_tiny_generator(path: Path, vae_path: Optional[Path] = None, seed: int = 0,
                         record=("fingerprint", "latent_stats"), tokenizer: bool = True, **changes) -> Path:
    """A tiny but real generator file (psvae_core.fusion, preset "tiny" on the tiny VAE's 16x16x16
    latent) with a tokenizer; its head is filled with small random weights (it starts at zero, which
    would ignore everything) and its LM matrices are scaled up, so prompts visibly matter. `vae_path` is recorded in its provenance as the VAE it was trained with."""
    import torch
    from psvae_core.fusion import PRESETS, FusionDiffuser

    torch.manual_seed(seed)
    cfg = PRESETS["tiny"].replace(**{"latent_channels": 16, "latent_size": (16, 16), **changes})
    gen = FusionDiffuser(cfg, tokenizer=tiny_tokenizer() if tokenizer else None)
    g = torch.Generator().manual_seed(2000 + seed)
    with torch.no_grad():
        for p in gen.head.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for p in gen.backbone.parameters():  # at its init scale a random LM barely reaches the image
            if p.ndim >= 2:                  # tokens; x10 makes the prompt visibly change the picture
                p.mul_(10.0)
    provenance = {"written_by": "tests/comfy_harness.py"}
    if vae_path is not None and record:
        provenance["vae"] = recorded_vae(vae_path, record)
    gen.save(path, provenance=provenance)
    return path


def write_test_image(path: Path, width: int = 320, height: int = 240) -> Path:
    """A non-constant RGB test picture (gradients and a disc)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((x - width * 0.6) ** 2 + (y - height * 0.45) ** 2) < (min(width, height) * 0.25) ** 2
    rgb = np.stack([x / width, y / height, np.where(disc, 1.0, 0.2)], axis=-1)
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)
    return path


EXTRA_FOLDER_FILE = "shared-folder-vae.safetensors"


@pytest.fixture(scope="session")
def comfy_models(comfy_base) -> dict[str, Path]:
    """models/psvae filled with tiny real checkpoints (VAEs and a generator, named as in the
    workflows), one more VAE in a folder that only extra_model_paths.yaml names, and input/example.png."""
    folder = comfy_base / "models" / "psvae"
    files = {name: write_tiny_vae(folder / name, **spec) for name, spec in TINY_MODEL_FILES.items()}
    for name, spec in TINY_GENERATOR_FILES.items():
        files[name] = write_tiny_generator(folder / name, vae_path=folder / spec["vae"], seed=spec["seed"])
    shared = comfy_base / "shared_models" / "psvae"
    shared.mkdir(parents=True, exist_ok=True)
    files[EXTRA_FOLDER_FILE] = write_tiny_vae(shared / EXTRA_FOLDER_FILE, seed=3, latent_channels=8)
    (comfy_base / "extra_model_paths.yaml").write_text(
        f"shared_store:\n    base_path: {comfy_base / 'shared_models'}\n    psvae: psvae\n")
    write_test_image(comfy_base / "input" / "example.png")
    return files


@pytest.fixture(scope="session")
def comfy_server(comfy_base, comfy_models) -> ComfyServer:
    """A running ComfyUI with the pack, shared by the session; stopped by PID at the end."""
    server = ComfyServer(comfy_base, extra_args=(
        "--extra-model-paths-config", str(comfy_base / "extra_model_paths.yaml"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the ComfyUI server log to a failing test that used the server."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server")
        if isinstance(server, ComfyServer):
            report.sections.append(("ComfyUI server log (tail)", server.log_tail()))
