"""This machine's measured matmul peak per precision: the yardstick every utilisation figure uses.

The instruction sets (thfm_serve.machine) say which kernels exist; only a measurement says how fast
they run on this machine at this thread count (the same class has shown 169 and 453 GFLOP/s fp32 on
two machines). `perf/bench_core.py` and `perf/bench_e2e.py` measure it in the run they report;
`thfm export` records it in its report from a per-machine cache, so the export's phase times can be
read against it without paying the measurement on every export.

Per precision the peak is the fastest of the backends that serve or reference it:
- fp32: torch.matmul and onnxruntime MatMul;
- bf16: torch.matmul in bf16 (emulated through fp32, and slower than it, without avx512_bf16/amx_bf16);
- int8: torch._int_mm where the build has it, onnxruntime MatMulInteger and QLinearMatMul (u8 x s8,
  the operand order VNNI multiplies natively; without VNNI onnxruntime goes through vpmaddubsw).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .machine import read_cpu

logger = logging.getLogger(__name__)

BENCH_SIZE = 3072  # the benchmarks' square matmul
EXPORT_SIZE = 2048  # thfm export's (once per machine): about 10 s where bf16 is emulated
CACHE_ENV = "THFM_CACHE_DIR"
METHOD = 2  # part of the cache key: a change to how the peak is measured invalidates cached ones


PROBE_SIZE = 256  # every backend is timed at this size first
MAX_CALL_S = 3.0  # a backend whose full-size call would take longer is reported at the probe size


def _gflops(fn: Callable[[], Any], flops: float, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


def _backends(threads: int) -> dict[tuple[str, str], Callable[[int], Callable[[], Any]]]:
    """(precision, backend) -> a function of the matrix size that prepares the operands and returns
    the call to time."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from .serving.sessions import session_options

    rng = np.random.default_rng(0)

    def torch_mm(dt: Any) -> Callable[[int], Callable[[], Any]]:
        def make(n: int):
            a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
            return lambda: torch.matmul(a, b)
        return make

    def int_mm(n: int):
        a8 = torch.randint(-127, 127, (n, n), dtype=torch.int8)
        b8 = torch.randint(-127, 127, (n, n), dtype=torch.int8)
        return lambda: torch._int_mm(a8, b8)

    def ort_call(n: int, nodes: list, a_type: int, out_type: int, inits: list, x: np.ndarray):
        graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("A", a_type, [n, n])],
                                  [helper.make_tensor_value_info("Y", out_type, [n, n])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        s = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
        return lambda: s.run(None, {"A": x})

    def w8(n: int):
        return numpy_helper.from_array(rng.integers(-127, 127, (n, n)).astype(np.int8), "B")

    def u8(n: int):
        return rng.integers(0, 255, (n, n)).astype(np.uint8)

    def ort_fp32(n: int):
        return ort_call(n, [helper.make_node("MatMul", ["A", "B"], ["Y"])], TensorProto.FLOAT, TensorProto.FLOAT,
                        [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "B")],
                        rng.standard_normal((n, n)).astype(np.float32))

    def ort_integer(n: int):
        return ort_call(n, [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], TensorProto.UINT8, TensorProto.INT32,
                        [w8(n)], u8(n))

    def ort_qlinear(n: int):
        # u8 x s8 -> u8: the kernel the int8 core's linears run on once onnxruntime fuses their Q/DQ
        # pairs; its requantised 8-bit output moves less memory than MatMulInteger's int32.
        scalar = lambda name, v, dt: numpy_helper.from_array(np.array(v, dtype=dt), name)  # noqa: E731
        return ort_call(n, [helper.make_node("QLinearMatMul", ["A", "sa", "za", "B", "sb", "zb", "sy", "zy"], ["Y"])],
                        TensorProto.UINT8, TensorProto.UINT8,
                        [w8(n), scalar("sa", 0.02, np.float32), scalar("za", 128, np.uint8), scalar("sb", 0.01, np.float32),
                         scalar("zb", 0, np.int8), scalar("sy", 0.5, np.float32), scalar("zy", 128, np.uint8)], u8(n))

    return {("fp32", "torch.matmul"): torch_mm(torch.float32), ("fp32", "onnxruntime MatMul"): ort_fp32,
            ("bf16", "torch.matmul"): torch_mm(torch.bfloat16), ("int8", "torch._int_mm"): int_mm,
            # u8 x s8: the operand order x86 VNNI (vpdpbusd) multiplies natively.
            ("int8", "onnxruntime MatMulInteger"): ort_integer, ("int8", "onnxruntime QLinearMatMul"): ort_qlinear}


def measure(threads: int, size: int = BENCH_SIZE, runs: int = 7, warmup: int = 2) -> dict[str, Any]:
    """GFLOP/s of `size`-square matmuls per precision and backend on `threads` threads (torch's thread
    count is set to it), with the machine class that produced them.

    Each backend is first timed at PROBE_SIZE; one whose `size` call would take over MAX_CALL_S is
    reported at that size instead (listed in "probe_only"): emulated paths run at a few hundred
    MFLOP/s (torch bf16 without avx512_bf16/amx_bf16 and torch._int_mm measured 0.3 and 1.2 GFLOP/s
    on an AVX2-only EPYC, a minute per 2048^3 call), far below any peak they could set."""
    import torch

    torch.set_num_threads(int(threads))
    n = int(size)
    load = os.getloadavg()[0]
    res: dict[str, dict[str, float]] = {"fp32": {}, "bf16": {}, "int8": {}}
    probe_only: dict[str, str] = {}
    for (prec, name), make in _backends(int(threads)).items():
        p = min(PROBE_SIZE, n)
        try:
            probe = _gflops(make(p), 2.0 * p**3, 1, 1)
        except RuntimeError as e:  # not every build has every kernel (torch._int_mm on CPU)
            logger.warning("%s: %s", name, str(e).splitlines()[0])
            continue
        predicted_s = 2.0 * n**3 / (probe * 1e9)
        if predicted_s > MAX_CALL_S:
            res[prec][name] = probe
            probe_only[f"{prec} {name}"] = f"{p}^3 (a {n}^3 call would take about {predicted_s:.0f} s)"
            continue
        res[prec][name] = _gflops(make(n), 2.0 * n**3, runs, warmup)
    cpu = read_cpu()
    # The peaks mean little without the instruction sets that produced them (bf16 without
    # avx512_bf16/amx_bf16 is emulated; int8 without VNNI goes through vpmaddubsw).
    return {"size": n, "threads": int(threads), "runs": runs, "loadavg_1m": round(load, 2), "gflops": res,
            "probe_only": probe_only,
            "peak": {p: max(v.values()) if v else None for p, v in res.items()},
            "machine_class": cpu.machine_class, "isa": cpu.isa}


def cache_dir() -> Path:
    """$THFM_CACHE_DIR, else $XDG_CACHE_HOME/thfm-serve, else ~/.cache/thfm-serve."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "thfm-serve"


def machine_key(threads: int, size: int) -> str:
    """What a cached peak is valid for: the CPU (model and every flag), the thread count, the matmul
    size and the library versions whose kernels were timed."""
    import onnxruntime as ort
    import torch

    cpu = read_cpu()
    text = json.dumps([METHOD, cpu.model, sorted(cpu.flags), int(threads), int(size), torch.__version__, ort.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached(threads: int, size: int = EXPORT_SIZE, runs: int = 3, directory: Path | None = None) -> dict[str, Any]:
    """measure(threads, size, runs), measured once per machine key and then read back from the cache
    (`"cached": true`). A measurement taken while the 1-minute load average was at least the core
    count is returned but not cached; an unwritable cache only costs the measurement again."""
    path = Path(directory or cache_dir()) / f"matmul_peak-{machine_key(threads, size)}.json"
    try:
        out = json.loads(path.read_text())
        return {**out, "cached": True}
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    out = measure(threads, size=size, runs=runs, warmup=1)
    out["measure_s"] = round(time.perf_counter() - t0, 1)
    if out["loadavg_1m"] >= (os.cpu_count() or 1):
        # Other work had every core busy: the figure stands for this report but would understate
        # every later one, so it is not cached.
        logger.warning("matmul peak measured with 1-min load %.1f on %d cores: not cached", out["loadavg_1m"],
                       os.cpu_count() or 1)
        return {**out, "cached": False}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(path)
    except OSError as e:
        logger.warning("matmul peak not cached (%s): %s", path, e)
    return {**out, "cached": False}


def describe(peak: dict[str, Any]) -> str:
    """One line, e.g. "fp32 169, bf16 368, int8 729 GFLOP/s (avx512-vnni-bf16, 2 threads, 2048^3 matmuls)"."""
    vals = ", ".join(f"{p} {v:.0f}" if v >= 10 else f"{p} {v:.2g}" for p, v in peak["peak"].items() if v)
    slow = f"; at a smaller size: {', '.join(peak['probe_only'])}" if peak.get("probe_only") else ""
    return f"{vals} GFLOP/s ({peak['machine_class']}, {peak['threads']} threads, {peak['size']}^3 matmuls{slow})"
