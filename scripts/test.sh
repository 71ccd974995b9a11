#!/usr/bin/env bash
# Set up (idempotent), then run the tests. Extra arguments go to pytest, e.g.
#   scripts/test.sh -m slow        # the long tests
#   scripts/test.sh tests/test_model.py -k parity
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
