#!/usr/bin/env bash
# Train the small THFM further on one NVIDIA GPU host, from a checkpoint in the project's layout
# (default: the shipped thfm-small): synthesize new training clips with all cores but one, then
# stage 2 (the core, at timestep 0) and stage 3 (the VAE decoder adapted to that core) on the GPU.
# The recipe is docs/training.md's (run 8 there); the scale is a GPU's: more clips, batches of 32, bf16.
#
# Settings (environment; defaults in brackets):
#   RUN [runs/gpu-train]  CHECKPOINT [thfm_serve/weights/thfm-small]  CLIPS [1200]  SEED [13]
#   WORKERS [cores - 1]  STEPS [2500]  BATCH [32]  LR [2e-4]  PRECISION [bf16]  DECODER_STEPS [1000]
#   DECODER_WINDOWS [600]  DEVICE [cuda]  SAVE_EVERY [250]
#   FINISH_BY [unset]: a time (seconds since the epoch) by which training stops, e.g. the end of a
#   leased machine's slot. A run stopped there keeps its latest step folder (a complete checkpoint,
#   fp32) and says so; rerun with the same RUN to resume it.
# Result: $RUN/train/checkpoint (fp16; loads with `thfm predict --checkpoint`), train_log.jsonl beside it.
# Score it with `thfm eval --checkpoint ... GT_DIR` on held-out clips (docs/training.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
THFM=("$PY" -m thfm_serve.cli)

RUN="${RUN:-$ROOT/runs/gpu-train}"
CHECKPOINT="${CHECKPOINT:-$ROOT/thfm_serve/weights/thfm-small}"
CLIPS="${CLIPS:-1200}"; SEED="${SEED:-13}"
WORKERS="${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}"
STEPS="${STEPS:-2500}"; BATCH="${BATCH:-32}"; LR="${LR:-2e-4}"; PRECISION="${PRECISION:-bf16}"
DECODER_STEPS="${DECODER_STEPS:-1000}"; DECODER_WINDOWS="${DECODER_WINDOWS:-600}"
DEVICE="${DEVICE:-cuda}"; SAVE_EVERY="${SAVE_EVERY:-250}"
mkdir -p "$RUN"

# `timeout` when a limit is set; its exit 124 is not a failure here: the step folders stay.
limited() {
  local seconds="$1"; shift
  if [ -z "$seconds" ]; then "$@"; return; fi
  local rc=0
  timeout --signal=TERM --kill-after=20 "$seconds" "$@" || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "[gpu-train] stopped at its ${seconds} s limit: $*" >&2
    return 0
  fi
  return "$rc"
}

# The newest loadable checkpoint of a run folder: its final one, else its latest step folder.
latest() {
  if [ -d "$1/checkpoint" ]; then echo "$1/checkpoint"; return; fi
  local step
  # seven digits: a half-written folder is named step-NNNNNNN.tmp and never loads
  step="$(ls -d "$1"/step-[0-9][0-9][0-9][0-9][0-9][0-9][0-9] 2>/dev/null | sort | tail -n 1 || true)"
  [ -n "$step" ] || { echo "[gpu-train] no checkpoint in $1" >&2; return 1; }
  echo "$step"
}

if [ ! -f "$RUN/data/.complete" ]; then
  rm -rf "$RUN/data"
  "${THFM[@]}" synth --out "$RUN/data" --clips "$CLIPS" --frames 9 --height 192 --width 192 --seed "$SEED" \
    --workers "$WORKERS"
  touch "$RUN/data/.complete"
fi

[ -z "${FINISH_BY:-}" ] || LIMIT_SECONDS=$(( FINISH_BY - $(date +%s) > 1 ? FINISH_BY - $(date +%s) : 1 ))
# One process for both stages: the clips are loaded once, and stage 3 keeps the maps of its windows.
limited "${LIMIT_SECONDS:-}" "${THFM[@]}" train "$RUN/data" --checkpoint "$CHECKPOINT" --out "$RUN/train" \
  --height 192 --width 192 --vae-steps 0 --steps "$STEPS" --batch "$BATCH" --lr "$LR" --warmup 200 \
  --task-weight keypoints2d=2 --task-weight keypoints3d=2 --task-weight depth=2 \
  --decoder-steps "$DECODER_STEPS" --decoder-lr 3e-4 --decoder-batch 8 --decoder-crop 64 \
  --decoder-windows "$DECODER_WINDOWS" --vae-person-share 0.75 --vae-person-weight 4 \
  --precision "$PRECISION" --device "$DEVICE" --load-workers "$WORKERS" --save-every "$SAVE_EVERY" --keep 2 --log-every 50 \
  --save-dtype fp16
echo "[gpu-train] result: $(latest "$RUN/train")"
