#!/usr/bin/env bash
# Start the job on every worker of a Cloud TPU VM slice.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --accelerator v4-32 \
#       --workdir gs://BUCKET/runs/celeba64 [--config configs/celeba64.py] \
#       [--data-dir gs://BUCKET/tensorflow_datasets] \
#       [--project PROJECT] [--create] [--dry-run] [-- extra main.py flags]
#
# --create makes the TPU VM first; --dry-run prints the exact commands only.
# Every worker installs this checkout (copied with scp) and runs the same
# program; jax.distributed finds the other workers by itself on TPU
# (RISSOLE_DISTRIBUTED=auto). Only process 0 writes logs and images.
# A gs://BUCKET/PATH workdir is mounted with gcsfuse (preinstalled on TPU VM
# images) at ~/gcs/BUCKET on every worker, so all workers share one POSIX
# folder for checkpoints and stage outputs. --data-dir (the prepared tfds
# array_record datasets, see README "Datasets on a pod") is mounted the same
# way and passed as --config.data.data_dir, so every worker reads one copy.
set -euo pipefail
TPU="" ZONE="" ACCEL="" WORKDIR="" DATADIR="" CONFIG="configs/celeba64.py" PROJECT="" CREATE=0 DRY=0
VERSION="${TPU_SOFTWARE_VERSION:-tpu-ubuntu2204-base}"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2;;
    --zone) ZONE="$2"; shift 2;;
    --accelerator) ACCEL="$2"; shift 2;;
    --workdir) WORKDIR="$2"; shift 2;;
    --config) CONFIG="$2"; shift 2;;
    --data-dir) DATADIR="$2"; shift 2;;
    --project) PROJECT="$2"; shift 2;;
    --create) CREATE=1; shift;;
    --dry-run) DRY=1; shift;;
    --) shift; EXTRA=("$@"); break;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2;;
  esac
done
for v in TPU ZONE ACCEL WORKDIR; do
  [[ -n "${!v}" ]] || { echo "missing --$(echo $v | tr A-Z a-z | sed 's/accel/accelerator/') (see the header of $0)" >&2; exit 2; }
done
PROJ=(); [[ -n "$PROJECT" ]] && PROJ=(--project "$PROJECT")
cd "$(dirname "$0")/.."

run() {  # print the command, shell-quoted; run it unless --dry-run
  printf '%q ' "$@"; echo
  [[ $DRY -eq 1 ]] || "$@"
}

MOUNT=""
mounted() {  # gs://BUCKET/PATH -> $HOME/gcs/BUCKET/PATH, mounting BUCKET (once) on every worker
  local url="$1" bucket rest
  bucket="${url#gs://}"; bucket="${bucket%%/*}"; rest="${url#gs://$bucket}"
  MOUNT+="mkdir -p ~/gcs/$bucket && (mountpoint -q ~/gcs/$bucket || gcsfuse --implicit-dirs $bucket ~/gcs/$bucket) && "
  MOUNTED="\$HOME/gcs/$bucket$rest"
}
if [[ "$WORKDIR" == gs://* ]]; then mounted "$WORKDIR"; WORKDIR="$MOUNTED"; fi
if [[ "$DATADIR" == gs://* ]]; then mounted "$DATADIR"; DATADIR="$MOUNTED"; fi
REMOTE="${MOUNT}cd ~/rissole_jax && pip install -q '.[tpu]' && RISSOLE_DISTRIBUTED=auto python3 -m rissole_jax.main --config $(printf '%q' "$CONFIG") --workdir \"$WORKDIR\" --no_progress"
[[ -n "$DATADIR" ]] && REMOTE+=" \"--config.data.data_dir=$DATADIR\""
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do REMOTE+=" $(printf '%q' "$a")"; done

if [[ $CREATE -eq 1 ]]; then
  run gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$ACCEL" \
      --version "$VERSION" "${PROJ[@]+"${PROJ[@]}"}"
fi
run gcloud compute tpus tpu-vm scp --recurse --worker=all --zone "$ZONE" "${PROJ[@]+"${PROJ[@]}"}" \
    "$PWD" "$TPU:~/rissole_jax"
run gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone "$ZONE" "${PROJ[@]+"${PROJ[@]}"}" \
    --command "$REMOTE"
