#!/usr/bin/env bash
# Retrain the scenes miniature on one GPU (docs/SCENES.md) over two GPU sessions, in parts of
# under 8.5 minutes:
#
#   trainer/scenes/retrain.sh a1 OUT    # session A: a1, a2, a3 (data, encoder, the four VAEs)
#   trainer/scenes/retrain.sh b1 OUT    # session B: b1 .. b4 (generators, evaluation), from ARTIFACTS
#
# WORK (default runs/scenes) keeps data, runs and caches between the parts of a session; OUT
# receives results.tar.gz (logs, metrics, evaluation; rewritten after every job) and the files to
# commit: artifacts/ (session A, for trainer/scenes/artifacts/) and models/ (b4, the shipped default).
# ARTIFACTS=DIR: where session B starts from (default trainer/scenes/artifacts).
# SMOKE=1 runs the same script with tiny models and data on a CPU (PART all: every part).
# WHEELS=DIR installs the wheels in DIR first (--no-deps), for a machine that lacks some packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -ne 2 ]; then
  echo "usage: $0 a1|a2|a3|b1|b2|b3|b4|A|B|all OUT" >&2
  exit 2
fi
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -n "${WHEELS:-}" ]; then "$PY" -m pip install -q --no-deps "$WHEELS"/*.whl; fi
exec "$PY" -m trainer.scenes.pipeline "$1" --out "$2" --work "${WORK:-runs/scenes}" \
  ${ARTIFACTS:+--artifacts "$ARTIFACTS"} ${SMOKE:+--smoke}
