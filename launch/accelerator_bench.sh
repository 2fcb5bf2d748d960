#!/usr/bin/env bash
# Paper-scale throughput (img/s, MFU) in float32 and bfloat16 on a lent GPU,
# in one call of the device tool (issue 14); docs/performance.md, "On a lent
# GPU". Dry-run on CPU under jax 0.10.2 (Python 3.11) and 0.11.2 (3.12, the
# device image's jax) with the wheel as the only ml_collections.
#
# Once, here, in the root of the checkout that the device tool sends:
#   bash launch/device_wheels.sh          # .whl/: ml_collections, ~80 KB
# Then the one device call (the tool `run`, not a shell command):
#   run(command="bash launch/accelerator_bench.sh", carry=[".whl"], timeout_s=480)
# and give_back unless rerunning at once. Back under files_at: log.txt,
# env.txt, paper_float32.json, paper_bfloat16.json, default_float32.json,
# default_bfloat16.json and summary.md (one table of all rows).
#
# Steps, each a fresh process (a run killed at the budget loses only itself):
#   0. install .whl/*.whl into $SITE (the device README's command), print
#      nvidia-smi -L and the jax/flax/optax/orbax versions and devices into
#      env.txt; stop unless jax runs on a GPU;
#   1. a smoke-sized run on the device: stops here, in seconds, when the
#      environment is broken (fix, then rerun within the lease);
#   2. configs/celeba64.py:paper (model.ch=256, 48M parameters), float32;
#   3. the same with --override model.dtype=bfloat16;
#   4-5. configs/celeba64.py (model.ch=128), float32 and bfloat16, when the
#      budget allows.
# A run starts only if at least MIN_LEFT_S of BUDGET_S (seconds since the
# start) is left, and is killed when the budget runs out. float32 matmuls and
# convolutions run as XLA does by default (TF32 on NVIDIA), hence the TF32
# peak in benchmarks/peaks.py for the float32 MFU.
#
# Environment: OUT (default ./device_out), BUDGET_S (400), MIN_LEFT_S (90),
# STEPS (10), WARMUP (2), SAMPLE_STEPS (20), PYTHON (python3), SITE
# (/tmp/site), RISSOLE_BENCH_DRY=1: a dry run on any machine (smoke-sized
# configs, 1 step, no nvidia-smi; ~80 s on a 2-core CPU):
#   RISSOLE_BENCH_DRY=1 OUT=/tmp/out SITE=/tmp/site bash launch/accelerator_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device_out}"
PYTHON="${PYTHON:-python3}"
SITE="${SITE:-/tmp/site}"
DRY="${RISSOLE_BENCH_DRY:-0}"
BUDGET_S="${BUDGET_S:-400}"
MIN_LEFT_S="${MIN_LEFT_S:-90}"
STEPS="${STEPS:-10}"
WARMUP="${WARMUP:-2}"
SAMPLE_STEPS="${SAMPLE_STEPS:-20}"
PAPER="configs/celeba64.py:paper"
DEFAULT="configs/celeba64.py"
SANITY="configs/celeba64.py:paper,smoke"
if [[ "$DRY" == 1 ]]; then
  PAPER="configs/celeba64.py:paper,smoke"
  DEFAULT="configs/celeba64.py:smoke"
  STEPS=1 WARMUP=0 SAMPLE_STEPS=2
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

bench() {   # NAME SPEC [extra flags...]: one throughput run, JSON into $OUT/NAME.json
  local name="$1" spec="$2" left
  shift 2
  left=$(( BUDGET_S - SECONDS ))
  if (( left < MIN_LEFT_S )); then
    echo "=== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    return 0
  fi
  echo "=== $name: $spec $* (t=${SECONDS}s, ${left}s left)"
  timeout --kill-after=10 "$left" "$PYTHON" -m rissole_jax.benchmarks.throughput \
      --config "$spec" --steps "$STEPS" --warmup "$WARMUP" --sample_steps "$SAMPLE_STEPS" \
      --json "$OUT/$name.json" "$@"
  local rc=$?
  echo "=== $name: exit $rc (t=${SECONDS}s)"
  return $rc
}

main() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || return 1
  fi
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  {
    date -u
    if [[ "$DRY" != 1 ]]; then
      nvidia-smi -L
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total \
          --format=csv
    fi
    "$PYTHON" - <<'EOF'
import os
import sys
from importlib import metadata
import jax
print("python", sys.version.split()[0], sys.executable)
for d in ("jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
          "ml-collections", "numpy", "einops"):
  try:
    print(d, metadata.version(d))
  except metadata.PackageNotFoundError:
    print(d, "-")
print("backend", jax.default_backend(), "devices", jax.devices())
print("device_kind", jax.devices()[0].device_kind)
print("jax_default_matmul_precision", jax.config.jax_default_matmul_precision)
try:
  import ml_collections  # noqa: F401
except ImportError:
  sys.exit("no ml_collections: run `bash launch/device_wheels.sh` in the checkout and "
           "carry .whl (run(..., carry=[\".whl\"]))")
if os.environ.get("RISSOLE_BENCH_DRY") != "1" and jax.default_backend() != "gpu":
  sys.exit(f"no GPU: jax runs on {jax.default_backend()} (is the CUDA plugin installed?)")
EOF
  } 2>&1 | tee "$OUT/env.txt" || return 1

  # 1: fail fast, before the long compiles, when something is missing or broken.
  echo "=== sanity: $SANITY (t=${SECONDS}s)"
  timeout 120 "$PYTHON" -m rissole_jax.benchmarks.throughput --config "$SANITY" \
      --steps 1 --warmup 0 --sample_steps 2 || { echo "=== sanity failed"; return 1; }

  local failed=0
  bench paper_float32 "$PAPER" || failed=1
  bench paper_bfloat16 "$PAPER" --override model.dtype=bfloat16 || failed=1
  bench default_float32 "$DEFAULT" || failed=1
  bench default_bfloat16 "$DEFAULT" --override model.dtype=bfloat16 || failed=1

  "$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import glob, json, os, sys
from rissole_jax.benchmarks.throughput import markdown
names = ("paper_float32", "paper_bfloat16", "default_float32", "default_bfloat16")
rows = [r for n in names if os.path.exists(p := os.path.join(sys.argv[1], n + ".json"))
        for r in json.load(open(p))]
print(markdown(rows) if rows else "no rows")
EOF
  echo "=== done in ${SECONDS}s"
  return $failed
}

main 2>&1 | tee "$OUT/log.txt"
