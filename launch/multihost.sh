#!/usr/bin/env bash
# Multi-process run with an explicit coordinator (GPU hosts, or CPU processes).
#
# On each of N hosts (process ids 0..N-1), same command but --process-id:
#   launch/multihost.sh --coordinator HOST0:12355 --num-processes N --process-id I \
#       --config configs/celeba64.py --workdir /shared/runs/celeba64 [-- extra flags]
# All N processes on this machine (CPU collectives; for trying things out):
#   launch/multihost.sh --local --num-processes 2 --config configs/mnist.py:smoke \
#       --workdir /tmp/mh [-- extra flags]
# --dry-run prints the exact commands only.
set -euo pipefail
COORD="localhost:12355" N="" PID="" CONFIG="configs/mnist.py" WORKDIR="" LOCAL=0 DRY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) COORD="$2"; shift 2;;
    --num-processes) N="$2"; shift 2;;
    --process-id) PID="$2"; shift 2;;
    --config) CONFIG="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --local) LOCAL=1; shift;;
    --dry-run) DRY=1; shift;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2;;
  esac
done
[[ -n "$N" && -n "$WORKDIR" ]] || { echo "--num-processes and --workdir are required" >&2; exit 2; }
[[ $LOCAL -eq 1 || -n "$PID" ]] || { echo "--process-id is required without --local" >&2; exit 2; }
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

cmd_for() {
  local cmd=("$PY" -m rissole_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
      --coordinator_address "$COORD" --num_processes "$N" --process_id "$1")
  [[ "$1" -eq 0 ]] || cmd+=(--no_progress)
  printf '%q ' "${cmd[@]}" "${EXTRA[@]+"${EXTRA[@]}"}"
}

if [[ $LOCAL -eq 0 ]]; then
  c=$(cmd_for "$PID"); echo "$c"
  [[ $DRY -eq 1 ]] || eval "$c"
  exit
fi
pids=()
for ((i = 0; i < N; i++)); do
  c=$(cmd_for "$i"); echo "$c"
  if [[ $DRY -eq 0 ]]; then eval "$c" & pids+=($!); fi
done
rc=0
for p in "${pids[@]+"${pids[@]}"}"; do wait "$p" || rc=$?; done
exit $rc
