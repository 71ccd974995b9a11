#!/usr/bin/env bash
# Stage 3 continued on the shipped step-6 checkpoint: 600 decoder steps on all 500 training windows
# (seed 11, docs/training.md step 4's data), lr 1.5e-4. Run from a folder holding s192/ and runs/.
set -euo pipefail
/usr/bin/time -v thfm train s192/train --checkpoint "$THFM_ROOT/thfm_serve/weights/thfm-small" --val-data s192/val \
  --out runs/stage3b --max-clips 500 --height 192 --width 192 --vae-steps 0 --steps 0 \
  --decoder-steps 600 --decoder-lr 1.5e-4 --warmup 50 --decoder-batch 4 --decoder-crop 64 --decoder-windows 500 \
  --vae-person-share 0.75 --vae-person-weight 4 --save-every 200 --keep 4 --log-every 20 \
  --val-every 200 --val-windows 8 --threads 2 --save-dtype fp16
