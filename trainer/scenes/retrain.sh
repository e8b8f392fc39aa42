#!/usr/bin/env bash
# Retrain the scenes miniature on one GPU (docs/SCENES.md), in parts of under 10 minutes:
#
#   trainer/scenes/retrain.sh part1 OUT    # then part2, part3, part4 (or: all)
#
# WORK (default runs/scenes) keeps data, runs and caches between parts; OUT receives the logs and,
# after part4, results.json/.md, plots/, samples/ and models/ (the shipped default).
# SMOKE=1 runs the same script with tiny models and data on a CPU (a few minutes).
# WHEELS=DIR installs the wheels in DIR first (--no-deps), for a machine that lacks some packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -ne 2 ]; then
  echo "usage: $0 part1|part2|part3|part4|all OUT" >&2
  exit 2
fi
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -n "${WHEELS:-}" ]; then "$PY" -m pip install -q --no-deps "$WHEELS"/*.whl; fi
exec "$PY" -m trainer.scenes.pipeline "$1" --out "$2" --work "${WORK:-runs/scenes}" ${SMOKE:+--smoke}
