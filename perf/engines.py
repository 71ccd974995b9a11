"""Engines that run the core and the VAE on CPU: one loader per kind, numpy in, numpy out.

Kinds:
  "onnxruntime"  an exported ONNX graph (fp32, or int8 Q/DQ) in onnxruntime's CPU provider, with the
                 session options the server uses (thfm_serve.serving.sessions.session_options), so
                 the benchmark times what is served;
  "torch-fp32"   the PyTorch modules from the checkpoint, fp32;
  "torch-bf16"   the core in bfloat16 with the exporter's fp32 islands (export.precision.lowered_core:
                 the module the bf16 export is made from and validated against). onnxruntime has no
                 bfloat16 CPU kernels (export/precision.py), so on CPU bf16 runs only in PyTorch,
                 where oneDNN uses the CPU's AVX512-BF16 (and AMX where present) matmul instructions.
                 The VAE has no bf16 engine: the export policy keeps it fp32 (thfm_serve/contract/specs.py).

Every engine is a callable ``engine({name: array}) -> {name: array}`` with the spec's tensor names,
and also answers onnxruntime's InferenceSession calls (``run(output_names, feed)``, ``get_inputs()``,
``get_outputs()``), so code written for a session (thfm_serve.serving.OnnxModel) takes any engine
unchanged.

Interfaces stay float32 at every precision (thfm_serve/contract/specs.py): a bf16 engine casts inside.

Benchmark-only code: it lives with the benchmarks (perf/), imported by perf/bench_core.py as a
sibling module, and by tests/test_perf.py with perf/ on sys.path.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from thfm_serve.contract.protocol import (
    CORE,
    CORE_IN,
    CORE_OUT,
    DECODER_IN,
    DECODER_OUT,
    ENCODER_IN,
    ENCODER_OUT,
    VAE_DECODER,
    VAE_ENCODER,
)
from thfm_serve.errors import CheckpointError, ThfmError

logger = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
TORCH_FP32 = "torch-fp32"
TORCH_BF16 = "torch-bf16"
CORE_KINDS = (ONNXRUNTIME, TORCH_FP32, TORCH_BF16)
VAE_KINDS = (ONNXRUNTIME, TORCH_FP32)

# Tensor names per submodel (contract.protocol: the names the export specs are built with).
IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    CORE: (CORE_IN, CORE_OUT),
    VAE_ENCODER: ((ENCODER_IN,), (ENCODER_OUT,)),
    VAE_DECODER: ((DECODER_IN,), (DECODER_OUT,)),
}


def physical_cores() -> int:
    """Cores this process may run on (affinity), the thread count that measured best for both
    onnxruntime and PyTorch here: more threads than cores only adds contention."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class IOName:
    """What onnxruntime's NodeArg offers that callers use: the name."""

    name: str


class Engine:
    """Base: name bookkeeping and the InferenceSession-compatible surface."""

    kind = "engine"

    def __init__(self, model: str, input_names: Sequence[str], output_names: Sequence[str]):
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- onnxruntime.InferenceSession surface
    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray], run_options: Any = None) -> list[np.ndarray]:
        out = self(feed)
        return [out[n] for n in (output_names or self.output_names)]

    def get_inputs(self) -> list[IOName]:
        return [IOName(n) for n in self.input_names]

    def get_outputs(self) -> list[IOName]:
        return [IOName(n) for n in self.output_names]

    def describe(self) -> str:
        return f"{self.model} on {self.kind}"


# --- onnxruntime --------------------------------------------------------------------------------

class OrtEngine(Engine):
    kind = ONNXRUNTIME

    def __init__(self, path: str | Path, model: str = "", threads: int | None = None):
        import onnxruntime as ort

        from thfm_serve.serving.sessions import session_options

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: export the model first (`thfm export`)")
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(path), sess_options=session_options(threads or physical_cores()),
                                            providers=["CPUExecutionProvider"])
        super().__init__(model or path.parent.parent.name, [i.name for i in self.session.get_inputs()],
                         [o.name for o in self.session.get_outputs()])
        self.path = path
        logger.info("%s: onnxruntime session for %s in %.1f s", self.model, path, time.perf_counter() - t0)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: np.ascontiguousarray(inputs[n], dtype=np.float32) for n in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def run(self, output_names, feed, run_options=None):
        return self.session.run(output_names, feed, run_options)


# --- PyTorch ------------------------------------------------------------------------------------

def time_onnx(path: str | Path, feed: Mapping[str, np.ndarray], threads: int, runs: int,
              warmup: int) -> dict[str, Any]:
    """One ONNX graph in onnxruntime with the server's session options: wall time per run and the
    last run's outputs by name (for drift against a reference)."""
    from thfm_serve.serving import create_session

    sess = create_session(path, threads)
    for _ in range(warmup):
        sess.run(None, dict(feed))
    times, out = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = sess.run(None, dict(feed))
        times.append(time.perf_counter() - t0)
    names = [o.name for o in sess.get_outputs()]
    return {"times_s": times, "median_s": statistics.median(times), "outputs": dict(zip(names, out))}


def set_torch_threads(threads: int | None = None) -> int:
    import torch

    n = int(threads or physical_cores())
    torch.set_num_threads(n)
    return n


class TorchEngine(Engine):
    """A torch module behind numpy: float32 arrays in, float32 arrays out (cast inside)."""

    def __init__(self, model: str, module: Any, kind: str, input_dtype: Any = None):
        names_in, names_out = IO_NAMES[model]
        super().__init__(model, names_in, names_out)
        self.module = module
        self.kind = kind
        self.input_dtype = input_dtype

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[n], dtype=np.float32)) for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return {n: t.float().numpy() for n, t in zip(self.output_names, out)}


def _load_checkpoint(path: str | Path):
    from thfm_serve.checkpoint import load_checkpoint

    return load_checkpoint(path, dtype=__import__("torch").float32, text_encoder=False)


def torch_core_module(checkpoint: Any, kind: str, compile: bool = False) -> Callable:
    """The core module for a torch kind, float32 interface (export.precision.ExportCore)."""
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.contract.specs import Precision

    precision = {TORCH_FP32: Precision.FP32, TORCH_BF16: Precision.BF16}[kind]
    core = checkpoint.core()
    module = lowered_core(core, precision)
    if precision != Precision.FP32:
        # lowered_core made a low-precision copy; drop the fp32 weights it was copied from.
        checkpoint.transformer = None
        checkpoint._core = None
        del core
    if compile:
        import torch

        module = torch.compile(module, dynamic=False)
    return module


def load_core_engine(kind: str, path: str | Path, *, threads: int | None = None, compile: bool = False,
                     checkpoint: Any = None) -> Engine:
    """The core on one engine.

    kind "onnxruntime": ``path`` is the exported model.onnx (fp32 or int8 Q/DQ);
    kind "torch-fp32"/"torch-bf16": ``path`` is the THFM checkpoint directory (or pass a loaded
    ``checkpoint``). ``compile`` wraps the torch module in torch.compile (measured slower here on CPU;
    kept for hosts where it helps).
    """
    if kind not in CORE_KINDS:
        raise ThfmError(f"unknown core engine {kind!r}; choose from {', '.join(CORE_KINDS)}")
    if kind == ONNXRUNTIME:
        return OrtEngine(path, CORE, threads)
    set_torch_threads(threads)
    t0 = time.perf_counter()
    ck = checkpoint if checkpoint is not None else _load_checkpoint(path)
    module = torch_core_module(ck, kind, compile=compile)
    logger.info("core: %s module ready in %.1f s", kind, time.perf_counter() - t0)
    return TorchEngine(CORE, module, kind)


def load_vae_engine(kind: str, path: str | Path, which: str, *, threads: int | None = None,
                    checkpoint: Any = None) -> Engine:
    """The VAE encoder (which="vae_encoder") or decoder ("vae_decoder") on one engine; ``path`` as in
    load_core_engine."""
    if which not in (VAE_ENCODER, VAE_DECODER):
        raise ThfmError(f"which must be {VAE_ENCODER!r} or {VAE_DECODER!r}, got {which!r}")
    if kind not in VAE_KINDS:
        raise ThfmError(f"unknown VAE engine {kind!r}; choose from {', '.join(VAE_KINDS)} "
                        "(the VAE stays fp32: thfm_serve/contract/specs.py)")
    if kind == ONNXRUNTIME:
        return OrtEngine(path, which, threads)
    set_torch_threads(threads)
    ck = checkpoint if checkpoint is not None else _load_checkpoint(path)
    module = ck.vae_encoder() if which == VAE_ENCODER else ck.vae_decoder()
    return TorchEngine(which, module, kind)


__all__ = [
    "CORE_KINDS", "Engine", "IO_NAMES", "IOName", "ONNXRUNTIME", "OrtEngine", "TORCH_BF16", "TORCH_FP32",
    "TorchEngine", "VAE_KINDS", "load_core_engine", "load_vae_engine", "physical_cores",
    "set_torch_threads", "torch_core_module",
]
