"""The soak test (scripts/soak.sh): perf_analyzer at concurrency 8 for 5 minutes against the tiny CPU
repository with no failed request and no steady growth of server memory. Slow: about 7 minutes
(export included the first time). Run it with `scripts/test.sh -m slow tests/test_soak.py`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(1800)
def test_soak_five_minutes_at_concurrency_8(tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run([str(ROOT / "scripts" / "soak.sh"), "--duration", "300", "--concurrency", "8",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1700)
    summary = json.loads((out / "summary.json").read_text())
    memory = summary["memory"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["passed"] and summary["perf_analyzer"]["returncode"] == 0
    assert memory["requests_failed"] == 0 and memory["requests_ok"] > 0
    assert memory["rss_slope_mib_per_min_second_half"] < memory["threshold_mib_per_min"]
    assert summary["dead_stubs"] == []
    for name in ("rss.csv", "perf_analyzer.csv", "rss.png", "README.md"):
        assert (out / name).is_file(), name
