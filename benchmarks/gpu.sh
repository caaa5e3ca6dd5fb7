#!/usr/bin/env bash
# pathjax's figures on one GPU host in at most 10 minutes, installing nothing from the network.
#
#   bash benchmarks/gpu.sh          # on the GPU machine (python3 with jax[cuda], flax, optax,
#                                   # orbax-checkpoint, torch...); missing packages come as
#                                   # wheels in .whl/ (benchmarks/gpu_wheels.sh, run beforehand
#                                   # where pip reaches PyPI)
#   bash benchmarks/gpu.sh --cpu    # the same script at tiny sizes on CPU (a check, in the tests)
#
# Prints one table and writes ${OUT:-benchmarks/results}/gpu-<machine>-<date>.json
# (benchmarks/gpu.py says what each row measures).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
if [[ "${1:-}" == "--cpu" ]]; then
  export JAX_PLATFORMS=cpu
elif [[ -d .whl ]] && compgen -G '.whl/*.whl' > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec "$PYTHON" benchmarks/gpu.py "$@" --out "${OUT:-benchmarks/results}"
