#!/usr/bin/env bash
# The device check (benchmarks/device_check.py): every GPU-only path against its reference
# and tokens/s beside HF transformers, one JSON. On a GPU machine with drift_jax's
# requirements installed (no internet needed):
#   bash benchmarks/device_check.sh --out device_check.json
# On any CPU, tiny shapes in seconds (what CI runs):
#   bash benchmarks/device_check.sh --smoke --out /tmp/device_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}" TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
for arg in "$@"; do
  # --smoke never touches an accelerator, also where one is present.
  if [ "$arg" = "--smoke" ]; then export JAX_PLATFORMS=cpu; fi
done
exec "${PYTHON:-python3}" benchmarks/device_check.py "$@"
