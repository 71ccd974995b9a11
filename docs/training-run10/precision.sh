#!/usr/bin/env bash
# The precision table of docs/training.md (step 8) on the test clips (data/s192/test, seed 3).
set -euo pipefail
cd "$(dirname "$0")/../.." && source .venv/bin/activate  # the repository root
CK=thfm_serve/weights/thfm-small
CAL="data/s192/train/clip_00000/video.mp4 data/s192/train/clip_00001/video.mp4 data/s192/train/clip_00002/video.mp4 data/s192/train/clip_00003/video.mp4"
rm -rf runs/prec_g
( time thfm export --checkpoint $CK --repo runs/rep_fp32 --target cpu --precision fp32 --vae-precision fp32 ) 2>&1 | tail -3
( time thfm export --checkpoint $CK --repo runs/rep_int8 --target cpu --precision int8 --vae-precision fp32 --calibration $CAL ) 2>&1 | tail -3
( time thfm export --checkpoint $CK --repo runs/rep_bf16v --target cpu --precision int8 --vae-precision bf16 --core-runtime onnxruntime --calibration $CAL ) 2>&1 | tail -3
( time thfm export --checkpoint $CK --repo runs/rep_ovcore --target cpu --precision int8 --vae-precision bf16 --core-runtime openvino --calibration $CAL ) 2>&1 | tail -3
thfm serve --repo runs/rep_fp32 --grpc-port 18001 --http-port 18000 --metrics-port 18002 > runs/serve_fp32.log 2>&1 &
S1=$!
thfm serve --repo runs/rep_int8 --grpc-port 19001 --http-port 19000 --metrics-port 19002 > runs/serve_int8.log 2>&1 &
S2=$!
thfm serve --repo runs/rep_bf16v --grpc-port 17001 --http-port 17000 --metrics-port 17002 > runs/serve_bf16v.log 2>&1 &
S3=$!
thfm serve --repo runs/rep_ovcore --grpc-port 16001 --http-port 16000 --metrics-port 16002 > runs/serve_ovcore.log 2>&1 &
S4=$!
for i in $(seq 1 120); do
  curl -sf localhost:18000/v2/health/ready && curl -sf localhost:19000/v2/health/ready && curl -sf localhost:17000/v2/health/ready \
    && curl -sf localhost:16000/v2/health/ready && break; sleep 2
done
( time python perf/precision_eval.py --checkpoint $CK --gt data/s192/test --out runs/prec_g --served fp32=127.0.0.1:18001 --served int8=127.0.0.1:19001 --served "int8 + bf16 VAE=127.0.0.1:17001" --served "int8 in OpenVINO + bf16 VAE=127.0.0.1:16001" ) 2>&1 | tail -30
kill $S1 $S2 $S3 $S4; wait
