"""The measured matmul peak: what the benchmarks and the export report carry next to the machine class."""

from __future__ import annotations

import json

import pytest

from thfm_serve import matmul_peak
from thfm_serve.machine import read_cpu


def test_measure_reports_every_precision_with_the_machine_class():
    peak = matmul_peak.measure(1, size=96, runs=2, warmup=1)
    assert peak["machine_class"] == read_cpu().machine_class
    assert set(peak["gflops"]) == {"fp32", "bf16", "int8"}
    assert {"torch.matmul", "onnxruntime MatMul"} <= set(peak["gflops"]["fp32"])
    assert "onnxruntime QLinearMatMul" in peak["gflops"]["int8"]
    for prec, backends in peak["gflops"].items():
        assert peak["peak"][prec] == max(backends.values()) > 0


@pytest.fixture
def quiet(monkeypatch):
    """A machine with no other load (the suite's own processes must not decide what these tests see)."""
    monkeypatch.setattr(matmul_peak.os, "getloadavg", lambda: (0.0, 0.0, 0.0))


def test_cached_measures_once_per_machine_key(tmp_path, quiet):
    first = matmul_peak.cached(1, size=96, runs=2, directory=tmp_path)
    files = list(tmp_path.glob("matmul_peak-*.json"))
    assert first["cached"] is False and len(files) == 1
    # A second call reads the file back instead of measuring: what it returns is what was stored.
    stored = json.loads(files[0].read_text())
    stored["peak"]["fp32"] = 12345.0
    files[0].write_text(json.dumps(stored))
    again = matmul_peak.cached(1, size=96, runs=2, directory=tmp_path)
    assert again["cached"] is True and again["peak"]["fp32"] == 12345.0
    # Another thread count is another key, measured anew.
    other = matmul_peak.cached(2, size=96, runs=2, directory=tmp_path)
    assert other["cached"] is False and len(list(tmp_path.glob("matmul_peak-*.json"))) == 2
    assert matmul_peak.machine_key(1, 96) != matmul_peak.machine_key(2, 96) != matmul_peak.machine_key(2, 128)


def test_unreadable_cache_is_measured_again(tmp_path, quiet):
    path = tmp_path / f"matmul_peak-{matmul_peak.machine_key(1, 96)}.json"
    path.write_text("{not json")
    out = matmul_peak.cached(1, size=96, runs=1, directory=tmp_path)
    assert out["cached"] is False and json.loads(path.read_text())["peak"]["fp32"] > 0


def test_describe_names_class_threads_and_size():
    line = matmul_peak.describe({"peak": {"fp32": 169.4, "bf16": 368.0, "int8": 729.2}, "machine_class": "avx2-fma",
                                 "threads": 2, "size": 2048})
    assert line == "fp32 169, bf16 368, int8 729 GFLOP/s (avx2-fma, 2 threads, 2048^3 matmuls)"


def test_a_backend_too_slow_at_full_size_is_reported_at_the_probe_size(monkeypatch):
    """An emulated kernel (torch bf16 without bf16 instructions ran at 0.3 GFLOP/s on an AVX2-only
    EPYC: a minute per 2048^3 call) is timed at the probe size, and says so, instead of for minutes."""
    monkeypatch.setattr(matmul_peak, "MAX_CALL_S", 0.0)  # every full-size call counts as too slow
    peak = matmul_peak.measure(1, size=512, runs=5, warmup=2)
    probe = matmul_peak.PROBE_SIZE
    assert set(peak["probe_only"]) == {f"{p} {b}" for p, v in peak["gflops"].items() for b in v}
    assert all(v.startswith(f"{probe}^3 (a 512^3 call would take about") for v in peak["probe_only"].values())
    assert "at a smaller size: fp32 torch.matmul" in matmul_peak.describe(peak)


def test_a_peak_measured_on_a_busy_machine_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(matmul_peak.os, "getloadavg", lambda: (64.0, 1.0, 1.0))
    out = matmul_peak.cached(1, size=96, runs=1, directory=tmp_path)
    assert out["cached"] is False and out["loadavg_1m"] == 64.0 and out["peak"]["fp32"] > 0
    assert not list(tmp_path.glob("matmul_peak-*.json"))
