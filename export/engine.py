"""TensorRT engine for the core (``--target gpu``), built ahead of serving from the validated ONNX.

Written against TensorRT's Python API (10.x): OnnxParser into a STRONGLY_TYPED network, one
optimisation profile from the spec (the same min/opt/max as config.pbtxt and perf_analyzer), a
timing cache, a serialised plan, and a manifest (ONNX hash, TensorRT version, GPU SM, precision,
profiles). A plan whose manifest does not match is rebuilt.

Strongly typed for every precision: the ONNX already says which tensors are fp16/bf16 (with the fp32
islands of precision.py) or int8 (explicit Q/DQ), so TensorRT must follow the graph's types rather
than pick its own; the builder precision flags (FP16/INT8/BF16) are not set (TensorRT rejects them
on strongly typed networks). The engine is therefore the graph that was validated on CPU.

TensorRT cannot be installed on the machines this project is developed on (its wheels fetch
libraries from NVIDIA's index); without it ``build_engine`` raises ExportError saying so, after
every earlier stage has run. Building must happen on a host with TensorRT (NVIDIA's containers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from thfm_serve.errors import ExportError

from thfm_serve.contract.specs import SubmodelSpec

logger = logging.getLogger(__name__)

PLAN_NAME = "model.plan"
WORKSPACE_BYTES = 8 << 30


def import_tensorrt() -> Any:
    try:
        import tensorrt  # noqa: F401  (only present on GPU hosts)
    except ImportError as e:
        raise ExportError(
            "TensorRT is not installed here, so no engine was built (the ONNX files and reports are written "
            "and validated). Run the same `thfm export ... --target gpu` on a host with TensorRT (for example "
            f"NVIDIA's TensorRT or Triton container), or pass --no-engine to stop after the ONNX stage. ({e})"
        ) from None
    return tensorrt


def gpu_sm() -> str | None:
    """Compute capability of GPU 0 as "sm_XY", or None when it cannot be read."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"sm_{major}{minor}"
    except Exception:  # pragma: no cover - a broken CUDA torch must not stop the build
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return "sm_" + out[0].replace(".", "")
        except (subprocess.SubprocessError, OSError):
            pass
    return None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def onnx_hash(onnx_path: Path) -> str:
    """Hash of the model file and its external data, if any."""
    h = hashlib.sha256()
    for p in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        if p.exists():
            h.update(p.name.encode())
            h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def engine_key(trt: Any, onnx_path: Path, spec: SubmodelSpec, sm: str | None) -> dict[str, Any]:
    """What an engine depends on: a plan whose manifest differs in any of these is rebuilt."""
    return {
        "onnx_sha256": onnx_hash(onnx_path),
        "tensorrt_version": str(trt.__version__),
        "gpu_sm": sm,
        "precision": spec.precision,
        "profiles": {k: [list(s) for s in v] for k, v in spec.trt_profile().items()},
        "strongly_typed": True,
    }


def build_engine(onnx_path: Path, spec: SubmodelSpec, out_dir: Path, previous: dict[str, Any] | None = None,
                 trt: Any = None, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) ``out_dir/model.plan`` from onnx_path; returns the engine manifest.

    previous: the engine manifest stored with the model version, if any. `trt` is the tensorrt
    module (tests pass a recording stand-in to check the calls; real builds leave it None).
    """
    trt = trt if trt is not None else import_tensorrt()
    sm = gpu_sm()
    key = engine_key(trt, onnx_path, spec, sm)
    plan = out_dir / PLAN_NAME
    if not force and previous and plan.exists() and sm is not None and previous.get("key") == key \
            and previous.get("plan_sha256") == sha256_file(plan):
        logger.info("%s: engine %s matches its manifest (TensorRT %s, %s, %s); reused", spec.name, plan, key["tensorrt_version"],
                    sm, spec.precision)
        return previous
    if previous:
        logger.info("%s: engine manifest differs (%s); rebuilding", spec.name,
                    ", ".join(k for k in key if previous.get("key", {}).get(k) != key[k]) or "plan changed")

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        # TensorRT < 10 needs it spelled out; 10.x has only explicit batch (the flag is deprecated).
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file resolves model.onnx.data next to the model (external weights above 2 GB).
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{spec.name}: TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    cache_path = out_dir / f"timing-trt{key['tensorrt_version']}-{sm or 'unknown'}.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    for name, (mn, opt, mx) in spec.trt_profile().items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)

    logger.info("%s: building TensorRT %s engine (%s, strongly typed) with profile %s", spec.name, key["tensorrt_version"],
                spec.precision, spec.trt_profile())
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{spec.name}: TensorRT failed to build the engine (see the TensorRT log above)")
    plan.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    manifest = {"key": key, "plan": plan.name, "plan_sha256": sha256_file(plan), "plan_bytes": plan.stat().st_size,
                "timing_cache": cache_path.name}
    logger.info("%s: wrote %s (%.1f MB)", spec.name, plan, plan.stat().st_size / 1e6)
    return manifest


def describe(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest.get("key", {}), sort_keys=True)
