#!/usr/bin/env bash
# comfy-cli for the registry check of the pack (called by `make comfy-cli`): comfy-cli==1.23.0 from
# the package registry into its own virtual environment (DEST, git-ignored .cache), so its pins never
# touch the project venv. `make validate-pack` and tests/test_comfyui_package.py then run
# `comfy --skip-prompt node validate` (offline: pyproject [tool.comfy] + its ruff security rules).
# Usage: tools/build_comfycli.sh [DEST] [PYTHON]   (defaults: .cache/comfy-cli python3)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/comfy-cli}
PY=${2:-python3}
VERSION=1.23.0

if ! "$DEST/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('comfy-cli') != '$VERSION')" 2>/dev/null; then
    rm -rf "$DEST"
    "$PY" -m venv "$DEST"
    "$DEST/bin/python" -m pip install -q --upgrade pip
    "$DEST/bin/python" -m pip install -q "comfy-cli==$VERSION"
fi
"$DEST/bin/python" -c "import importlib.metadata as m; print('build_comfycli: comfy-cli', m.version('comfy-cli'), '+ ruff', m.version('ruff'))"
