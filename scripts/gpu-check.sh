#!/usr/bin/env bash
# The prepared GPU check: run it in one go on a host with an NVIDIA GPU (under 10 minutes).
#   - the PyTorch bf16 core of the wan2.1-1.3b shape at 81 frames 480x832 (median latency, against
#     GenCeption's published 0.96 s transformer forward on one TPU v6e);
#   - where TensorRT >= 10 imports: export + engine build + plan validation on a tiny checkpoint;
#   - where tritonserver is on PATH: one request through Triton against the in-process pipeline.
# Results: perf/results/gpu/gpu_check_<time>.{json,md}. Nothing here is faked: a step that cannot
# run records why. Best run inside the images named in model_repository/README.md, e.g.
#   docker run --gpus all --rm --shm-size=2g -v $PWD:/src -w /src thfm-triton bash scripts/gpu-check.sh
# Options go to perf/gpu_check.py (--runs N, --skip-tensorrt, --out DIR, --dry-run for a CPU check
# of the script itself at the tiny shape).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Inside NVIDIA's images the system python has torch (CUDA) and thfm-serve; elsewhere the project's venv.
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
exec "$PY" "$ROOT/perf/gpu_check.py" "$@"
