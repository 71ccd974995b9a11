#!/usr/bin/env bash
# Soak test: perf_analyzer at concurrency 8 for 5 minutes against the tiny CPU repository, sampling the
# memory of tritonserver and every python-backend stub (perf/soak.py says how and what "no steady
# growth" means). Writes rss.csv, perf_analyzer.csv, summary.json, rss.png and README.md to
# perf/results/soak/; the checkpoint, repository and server log go to runs/soak/.
#
#   scripts/soak.sh                                  # the recorded run: --duration 300 --concurrency 8
#   scripts/soak.sh --duration 600 --concurrency 16  # any perf/soak.py option
#
# Exits 0 when perf_analyzer saw no failure, the server counted no failed request and memory did not
# grow; 1 otherwise (the figures are written either way).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
export SOAK_COMMAND="scripts/soak.sh${*:+ $*}"
exec "$ROOT/.venv/bin/python" perf/soak.py "$@"
