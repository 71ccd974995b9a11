#!/usr/bin/env bash
# Idempotent set-up: creates (or reuses) .venv in the repository root and installs the project,
# the tritonserver bundled in nvidia-pytriton, and perf_analyzer (kept in its own folder).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${THFM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel >/dev/null

# torch first and pinned, so nothing pulls the CUDA build from the registry.
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  log "installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install -q "torch==2.13.0"
fi

log "installing thfm-serve and its pinned dependencies"
# scale (Ray) and deploy (Kubernetes manifests) are extras, installed here because their tests run
# in the default suite.
"$VPY" -m pip install -q --no-build-isolation -e "$ROOT[test,scale,deploy]"

# tritonserver 2.51 (with the python backend) ships inside the nvidia-pytriton wheel; its own
# dependency pins (numpy<2 and extras) are not needed to run the binary, hence --no-deps.
if ! "$VPY" -m pip show -q nvidia-pytriton >/dev/null 2>&1; then
  log "installing nvidia-pytriton==0.7.0 (bundled tritonserver)"
  "$VPY" -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
fi

# perf_analyzer: the tritonclient 2.51.0 wheel carries a binary that runs on glibc 2.36; newer ones
# do not. It lives in its own folder so the project's tritonclient 2.73 stays untouched.
PA_DIR="$ROOT/.venv/perf_analyzer"
if [ ! -x "$PA_DIR/bin/perf_analyzer" ]; then
  log "installing perf_analyzer (tritonclient 2.51.0) into $PA_DIR"
  tmp="$(mktemp -d)"
  "$VPY" -m pip download -q --no-deps -d "$tmp" "tritonclient==2.51.0" --platform manylinux1_x86_64 --only-binary=:all:
  "$VPY" -m zipfile -e "$tmp"/tritonclient-2.51.0-*.whl "$tmp/whl"
  mkdir -p "$PA_DIR/bin" "$PA_DIR/lib"
  cp "$tmp"/whl/tritonclient-2.51.0.data/data/bin/perf_analyzer "$PA_DIR/bin/"
  chmod +x "$PA_DIR/bin/perf_analyzer"
  rm -rf "$tmp"
fi
# perf_analyzer needs libb64.so.0d and libcudart.so.12: both come with nvidia-pytriton's libs.
LIBS="$("$VPY" -c 'import site; print(site.getsitepackages()[0])')/nvidia_pytriton.libs"
for base in libb64 libcudart; do
  src="$(ls "$LIBS"/${base}*.so* 2>/dev/null | head -n1 || true)"
  case "$base" in libb64) name=libb64.so.0d ;; libcudart) name=libcudart.so.12 ;; esac
  if [ -n "$src" ] && [ ! -e "$PA_DIR/lib/$name" ]; then ln -sf "$src" "$PA_DIR/lib/$name"; fi
done
# `thfm serve` passes the restricted-API key to tritonserver through a helper preloaded into it
# (thfm_serve/argv_secret.py), built once with the system C compiler; build it now so that a host
# without one is found at set-up rather than at the first `thfm serve`.
if ! "$VPY" -c "from thfm_serve.argv_secret import shim_path; from thfm_serve.server import backend_directory; shim_path(backend_directory())" 2>/dev/null; then
  log "WARNING: no C compiler (cc): thfm serve needs one once, to build its key helper (apt-get install gcc)"
fi
log "ready: $VENV"
