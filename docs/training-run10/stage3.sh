.venv/bin/thfm train data/s192/train --checkpoint runs/stage3h/checkpoint --val-data data/s192/val --out runs/stage3i --max-clips 256 \
    --height 192 --width 192 --vae-steps 0 --steps 0 --decoder-steps 600 --decoder-lr 1.5e-4 --warmup 50 \
    --decoder-batch 4 --decoder-crop 64 --decoder-windows 256 --vae-person-share 0.75 --vae-person-weight 4 \
    --decoder-angle-weight 1.0 --decoder-ssi-weight 1.0 --decoder-iou-weight 1.0 \
    --save-every 100 --keep 3 --log-every 20 --val-windows 8 --threads 2 --save-dtype fp16
