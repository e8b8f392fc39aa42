#!/usr/bin/env bash
# Retrain the whole scenes miniature on one GPU (docs/SCENES.md): data, toy encoder, the four
# autoencoders, the five generators, the evaluation and the shipped models, in one command:
#
#   trainer/scenes/retrain.sh OUT
#
# WORK (default runs/scenes) keeps data, runs and caches: started again, the pipeline skips what is
# done and resumes the rest. OUT receives results.tar.gz (logs, metrics, the evaluation; rewritten
# after every job), samples.tar (the sample grids), artifacts/ (encoder, VAEs, the parts' results)
# and models/ (the shipped default).
# DEADLINE=S: stop training S - 150 s from now and evaluate what exists (a time-limited machine).
# SMOKE=1 runs the same script with tiny models and data on a CPU.
# WHEELS=DIR installs the wheels in DIR first (--no-deps), for a machine that lacks some packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -ne 1 ]; then
  echo "usage: $0 OUT" >&2
  exit 2
fi
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -n "${WHEELS:-}" ]; then "$PY" -m pip install -q --no-deps "$WHEELS"/*.whl; fi
exec "$PY" -m trainer.scenes.pipeline all --out "$1" --work "${WORK:-runs/scenes}" \
  ${DEADLINE:+--deadline "$DEADLINE"} ${SMOKE:+--smoke}
