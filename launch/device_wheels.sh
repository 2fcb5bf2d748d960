#!/usr/bin/env bash
# Downloads into .whl/ the wheels that launch/accelerator_bench.sh needs on the
# lent device machine (nvidia-h200 image: Python 3.12.3 with jax/jaxlib 0.11.2
# and the CUDA 13 plugin, flax, optax, orbax-checkpoint, absl-py, einops, numpy,
# scipy, pillow, tqdm, pyyaml, ...; nothing can be fetched there).
#
#   bash launch/device_wheels.sh     # here, once, in the root of the checkout
#                                    # that the device tool sends (the lead's)
#
# The throughput benchmark imports, besides the standard library and
# rissole_jax: absl, jax, flax, optax, orbax.checkpoint, einops, numpy and
# ml_collections (tests/test_launch.py keeps that list). Of these the image
# lacks only ml_collections (pure Python; needs absl-py and PyYAML, both
# there), so that is the one wheel: ~80 KB of the 64 MiB a call may carry.
# The pin is the version tested here (setup.py: ml-collections>=1.1.0).
#
# .whl/ is ignored through .git/info/exclude (added below, shared by all
# worktrees of the repository): the wheels are carried, never committed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS=("ml-collections==1.1.0")

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

# Fresh each time: two versions of one package stop the install there.
rm -rf .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

ls -l .whl
total_kib=$(du -sk .whl | cut -f1)
echo "total: ${total_kib} KiB (a device call carries at most 64 MiB, the tree included)"
if (( total_kib > 32 * 1024 )); then
  echo "error: .whl is over 32 MiB; leave room for the working tree" >&2
  exit 1
fi
git check-ignore -q .whl/x || { echo "error: .whl/ is not ignored" >&2; exit 1; }
