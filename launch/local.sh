#!/usr/bin/env bash
# Run the whole pipeline on this machine (CPU, one GPU, or one TPU VM host).
#   launch/local.sh [CONFIG[:variant]] [WORKDIR] [extra flags...]
#   launch/local.sh configs/mnist.py runs/mnist --config.diffusion.train.steps=2000
set -euo pipefail
CONFIG="${1:-configs/mnist.py}"
WORKDIR="${2:-runs/$(basename "${CONFIG%%:*}" .py)}"
shift $(( $# < 2 ? $# : 2 ))
cd "$(dirname "$0")/.."
exec python -m rissole_jax.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
