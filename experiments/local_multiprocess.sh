#!/usr/bin/env bash
# A multi-host job on one machine, for trying it out: N processes of experiments/run.py
# joined through JAX's distributed runtime on localhost (drift_jax/parallel/distributed.py reads
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID). Each process sees its
# own devices (on CPU: one each), so the training mesh must cover N devices.
#
#   experiments/local_multiprocess.sh N [run.py flags...]
#
# When one process fails, the others are stopped (they would wait for it at the next
# barrier). Exit status: the first failure's, else 0. PYTHON picks the interpreter;
# DRIFT_PORT the coordinator's port (default: a free one).
set -uo pipefail
n=${1:?usage: $0 NUM_PROCESSES [run.py flags...]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
port=${DRIFT_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    "$python" "$repo/experiments/run.py" "$@" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
status=0
for ((k = 0; k < n; k++)); do
  wait -n
  code=$?
  if ((code != 0 && status == 0)); then
    status=$code
    echo "local_multiprocess.sh: a process exited with status $code; stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null
  fi
done
exit $status
