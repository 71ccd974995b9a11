#!/usr/bin/env bash
# End-to-end demo on a fresh machine: set up, export a checkpoint for CPU, serve it with tritonserver,
# run `thfm predict --url` on a clip, and write outputs and pictures.
#
#   scripts/demo.sh              # the small trained THFM shipped in the package (thfm_serve/weights/
#                                # thfm-small) on a rendered clip of an unseen seed; prints `thfm eval`
#                                # against the clip's ground truth
#   scripts/demo.sh VIDEO        # the same model on your video (outputs and pictures, no ground truth)
#   THFM_DEMO_CHECKPOINT=CK scripts/demo.sh      # serve CK instead (e.g. one `thfm train` wrote)
#   THFM_DEMO_CHECKPOINT=random scripts/demo.sh  # a tiny random-weight checkpoint: the path only, the
#                                                # outputs are noise
#
# Everything goes under runs/demo/ (THFM_DEMO_DIR overrides). Re-running reuses the checkpoint and the
# exported models (the exporter checks their manifests) and overwrites the outputs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${THFM_DEMO_DIR:-$ROOT/runs/demo}"
log() { echo "[demo] $*" >&2; }

"$ROOT/scripts/setup.sh"
PY="$ROOT/.venv/bin/python"
THFM=("$PY" -m thfm_serve.cli)
mkdir -p "$RUN"
RUN="$(cd "$RUN" && pwd)"

# 1. The checkpoint: THFM_DEMO_CHECKPOINT, else the trained small THFM shipped in the package, else
#    (THFM_DEMO_CHECKPOINT=random, or a package without it) a tiny random one, kept when complete.
CK="$RUN/checkpoint"
TRAINED="$("$PY" -c "from thfm_serve.checkpoint import TRAINED_SMALL, missing_parts; print('' if missing_parts(TRAINED_SMALL) else TRAINED_SMALL)" 2>/dev/null || true)"
MEANINGFUL=1
if [ "${THFM_DEMO_CHECKPOINT:-}" = random ] || { [ -z "${THFM_DEMO_CHECKPOINT:-}" ] && [ -z "$TRAINED" ]; }; then
  MEANINGFUL=0
  if ! "$PY" -c "import sys; from thfm_serve.checkpoint import missing_parts; sys.exit(1 if missing_parts(sys.argv[1]) else 0)" "$CK" 2>/dev/null; then
    log "writing a tiny random checkpoint to $CK (random weights: the outputs are noise)"
    rm -rf "$CK"
    "${THFM[@]}" init-checkpoint --preset tiny --out "$CK"
  fi
elif [ -n "${THFM_DEMO_CHECKPOINT:-}" ]; then
  CK="$(cd "$THFM_DEMO_CHECKPOINT" && pwd)"
  log "using checkpoint $CK"
else
  CK="$TRAINED"
  log "using the trained small THFM $CK"
fi

# 2. Export for CPU (reuses models whose manifest matches the checkpoint; about 2 minutes the first time).
REPO="$RUN/model_repository"
log "exporting to $REPO"
# fp32 core and VAE: the served answers then equal the in-process pipeline's to float rounding.
"${THFM[@]}" export --checkpoint "$CK" --repo "$REPO" --target cpu --precision fp32 --vae-precision fp32

# 3. The clip: the argument, or one the project draws itself.
GT=""
if [ $# -ge 1 ]; then
  CLIP="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
  [ -f "$CLIP" ] || { log "no such file: $1"; exit 2; }
elif [ "$MEANINGFUL" = 1 ]; then
  # A rendered person with exact ground truth; seed 9999 is outside the documented training seeds.
  GT="$RUN/ground_truth"
  rm -rf "$GT"
  # Drawn at the checkpoint's own grid (its thfm/config.json), where the model was trained to see people.
  read -r GH GW < <("$PY" -c "import json, sys; c = json.load(open(sys.argv[1])); print(c['height'], c['width'])" "$CK/thfm/config.json")
  "${THFM[@]}" synth --out "$GT" --clips 1 --frames 33 --height "$GH" --width "$GW" --seed 9999
  GT="$GT/clip_00000"
  CLIP="$GT/video.mp4"
else
  CLIP="$RUN/walking.mp4"
  "$PY" -m thfm_serve.client.democlip "$CLIP" --frames 40 --width 256 --height 192
fi

# 4. Serve on free ports, in the background; stopped on any exit (success, failure or Ctrl-C).
read -r HTTP_PORT GRPC_PORT METRICS_PORT < <("$PY" -c "
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks: s.close()")
SERVER_LOG="$RUN/serve.log"
log "starting tritonserver (gRPC 127.0.0.1:$GRPC_PORT, log $SERVER_LOG)"
"${THFM[@]}" serve --repo "$REPO" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" \
  --metrics-port "$METRICS_PORT" --log "$RUN/tritonserver.log" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    log "stopping tritonserver"
    kill -TERM "$SERVER_PID" 2>/dev/null || true  # `thfm serve` shuts tritonserver down cleanly on SIGTERM
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# Ready = every model loaded (strict readiness). Give up if `thfm serve` exits or after 5 minutes.
if ! "$PY" - "$GRPC_PORT" "$SERVER_PID" <<'EOF'
import os, sys, time
import tritonclient.grpc as grpcclient
port, pid = sys.argv[1], int(sys.argv[2])
client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}", channel_args=[("grpc.enable_http_proxy", 0)])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("tritonserver exited before it was ready")
    try:
        if client.is_server_ready(client_timeout=2):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit("tritonserver was not ready after 300 s")
EOF
then
  log "the server did not come up; the end of $SERVER_LOG:"
  tail -n 20 "$SERVER_LOG" >&2
  exit 1
fi

# 5. Predict through the server; outputs and pictures under $RUN/outputs.
OUT="$RUN/outputs"
rm -rf "$OUT"
"${THFM[@]}" predict "$CLIP" --url "127.0.0.1:$GRPC_PORT" --tasks all --out "$OUT" --pictures
if [ -n "$GT" ]; then
  log "accuracy against the rendered ground truth (thfm eval):"
  "${THFM[@]}" eval "$OUT" "$GT" --json "$RUN/eval.json" --markdown "$RUN/eval.md"
fi

stop_server
trap - EXIT
log "done: clip $CLIP"
log "results (<task>.npz): $OUT"
log "pictures (<task>.mp4, <task>.png): $OUT/pictures"
echo "$OUT"
