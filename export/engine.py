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

After a build the plan is validated (``validate_plan``): it runs on the inputs saved as polygraphy
JSON by the ONNX validation and its outputs are compared with PyTorch's at the spec's tolerances,
fatally, like the ONNX validation; the engine's layer information is dumped next to the plan and
searched for fused attention (unfused attention at the max profile materialises the [S, S] score
matrix per head: hundreds of GB at 81x480x832). Everything here is written against TensorRT 10's
Python API and unit-tested with a stand-in module (tests/test_engine.py); it has not been run on
a GPU by this project.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from thfm_serve.config import TASKS
from thfm_serve.errors import ExportError

from thfm_serve.contract import protocol
from thfm_serve.contract.specs import SubmodelSpec
from thfm_serve.gpu_options import plan_version_problem, same_engine_version, serving_tensorrt_version  # noqa: F401

logger = logging.getLogger(__name__)

PLAN_NAME = protocol.PLAN_FILE
LAYERS_NAME = "engine_layers.json"
WORKSPACE_BYTES = 8 << 30
# TensorRT 10 removed implicit batch and the EXPLICIT_BATCH flag, added strongly typed networks with
# bf16/fp8 Q/DQ, and set_input_shape/execute_async_v3; earlier versions cannot build these graphs.
MIN_TENSORRT_MAJOR = 10
# The profile's opt batch: a client asks for every task by default (`--tasks all`), and the entry
# model runs one core row per task, so the kernels are tuned for that batch, not for 1.
TYPICAL_TASKS = len(TASKS)


def import_tensorrt() -> Any:
    try:
        import tensorrt  # noqa: F401  (only present on GPU hosts)
    except ImportError as e:
        raise ExportError(
            "TensorRT is not installed here, so no engine was built (the ONNX files and reports are written "
            "and validated). Run the same `thfm export ... --target gpu` on a host with TensorRT (for example "
            f"NVIDIA's TensorRT or Triton container), or pass --no-engine to stop after the ONNX stage. ({e})"
        ) from None
    check_tensorrt_version(tensorrt)
    return tensorrt


def check_tensorrt_version(trt: Any) -> str:
    """TensorRT's version string; ExportError when it is older than MIN_TENSORRT_MAJOR."""
    version = str(getattr(trt, "__version__", "unknown"))
    m = re.match(r"(\d+)\.", version)
    if not m or int(m.group(1)) < MIN_TENSORRT_MAJOR:
        raise ExportError(f"TensorRT {version} is too old: the engine builder needs TensorRT >= {MIN_TENSORRT_MAJOR} "
                          "(strongly typed networks, bf16/fp8 Q/DQ, execute_async_v3); use the NVIDIA container "
                          "named in model_repository/README.md")
    return version


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


def gpu_name() -> str | None:
    """Marketing name of GPU 0 ("NVIDIA H100 80GB HBM3"), or None. Two GPUs of one SM (an H100 PCIe
    and an H100 SXM, an L4 and an RTX 4090) tune differently, so caches and plans are keyed by it."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # pragma: no cover - a broken CUDA torch must not stop the build
        pass
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.strip().splitlines()
            if out:
                return out[0].strip()
        except (subprocess.SubprocessError, OSError):
            pass
    return None


def _slug(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text or "unknown").strip("-").lower() or "unknown"


def engine_profile(spec: SubmodelSpec, opt_batch: int = TYPICAL_TASKS) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The spec's TensorRT profile with the opt batch set to `opt_batch` (clamped to the profile):
    the spec's opt is the export shape (batch 1), which would tune every kernel for one task."""
    lo, _, hi = spec.profiles["batch"]
    batch = max(lo, min(hi, int(opt_batch)))
    dims = {**spec.dims("opt"), "batch": batch}
    out = {}
    for name, (mn, _, mx) in spec.trt_profile().items():
        out[name] = (tuple(mn), tuple(spec.shape(name, dims)), tuple(mx))
    return out


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


def engine_key(trt: Any, onnx_path: Path, spec: SubmodelSpec, sm: str | None, gpu: str | None = None,
               opt_batch: int = TYPICAL_TASKS) -> dict[str, Any]:
    """What an engine depends on: a plan whose manifest differs in any of these is rebuilt."""
    return {
        "onnx_sha256": onnx_hash(onnx_path),
        "tensorrt_version": str(trt.__version__),
        "gpu_sm": sm,
        "gpu_name": gpu,
        "precision": spec.precision,
        "profiles": {k: [list(s) for s in v] for k, v in engine_profile(spec, opt_batch).items()},
        "strongly_typed": True,
    }


def build_engine(onnx_path: Path, spec: SubmodelSpec, out_dir: Path, previous: dict[str, Any] | None = None,
                 trt: Any = None, force: bool = False, opt_batch: int = TYPICAL_TASKS,
                 validate: bool = True, device: str = "cuda") -> dict[str, Any]:
    """Build (or reuse) ``out_dir/model.plan`` from onnx_path; returns the engine manifest.

    previous: the engine manifest stored with the model version, if any. `trt` is the tensorrt
    module (tests pass a stand-in to check the calls; real builds leave it None). validate: run
    validate_plan on the polygraphy inputs next to the ONNX (fatal). device: where the plan's
    buffers live (torch device; "cuda" on a GPU host).
    """
    trt = trt if trt is not None else import_tensorrt()
    version = check_tensorrt_version(trt)
    sm, gpu = gpu_sm(), gpu_name()
    key = engine_key(trt, onnx_path, spec, sm, gpu, opt_batch)
    plan = out_dir / PLAN_NAME
    if not force and previous and plan.exists() and sm is not None and previous.get("key") == key \
            and previous.get("plan_sha256") == sha256_file(plan):
        logger.info("%s: engine %s matches its manifest (TensorRT %s, %s %s, %s); reused", spec.name, plan, version,
                    gpu, sm, spec.precision)
        return previous
    if previous:
        logger.info("%s: engine manifest differs (%s); rebuilding", spec.name,
                    ", ".join(k for k in key if previous.get("key", {}).get(k) != key[k]) or "plan changed")

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # TensorRT 10 networks are explicit-batch only; strongly typed: the ONNX types decide (module docstring).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file resolves model.onnx.data next to the model (external weights above 2 GB).
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"{spec.name}: TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors[:5]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    # Layer names, types, precisions and tactics in the engine inspector (which kernels ran, whether
    # attention fused); costs nothing at run time.
    if hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    cache_path = out_dir / f"timing-trt{version}-{sm or 'unknown'}-{_slug(gpu)}.cache"
    _set_timing_cache(config, cache_path, spec.name)

    profile = builder.create_optimization_profile()
    shapes = engine_profile(spec, opt_batch)
    for name, (mn, opt, mx) in shapes.items():
        profile.set_shape(name, mn, opt, mx)
    config.add_optimization_profile(profile)

    logger.info("%s: building TensorRT %s engine (%s, strongly typed) for %s (%s) with profile %s", spec.name,
                version, spec.precision, gpu, sm, shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{spec.name}: TensorRT failed to build the engine (see the TensorRT log above)")
    _write_atomic(plan, serialized)
    del serialized
    _write_atomic(cache_path, config.get_timing_cache().serialize())
    manifest: dict[str, Any] = {"key": key, "plan": plan.name, "plan_sha256": sha256_file(plan),
                                "plan_bytes": plan.stat().st_size, "timing_cache": cache_path.name}
    logger.info("%s: wrote %s (%.1f MB)", spec.name, plan, plan.stat().st_size / 1e6)
    if validate:
        try:
            manifest["validation"] = validate_plan(trt, plan, spec, onnx_path.parent / "polygraphy", device=device)
        except ExportError:
            plan.unlink(missing_ok=True)  # a plan that fails validation must not be served
            raise
    return manifest


def _set_timing_cache(config: Any, cache_path: Path, name: str) -> None:
    """Load the timing cache into the builder config; a cache TensorRT refuses (another GPU or
    version wrote it, or it is corrupt) is replaced by a fresh one rather than silently ignored."""
    data = cache_path.read_bytes() if cache_path.exists() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if data:
        logger.warning("%s: TensorRT refused the timing cache %s; starting a new one", name, cache_path.name)
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
    raise ExportError(f"{name}: TensorRT could not set a timing cache ({cache_path.name})")


def _write_atomic(path: Path, data: Any) -> None:
    """Write a buffer (TensorRT's IHostMemory, bytes) to a temporary file and rename it over `path`.

    IHostMemory exposes the buffer protocol: memoryview writes it without a second host copy of a
    multi-GB plan, and a crash mid-write never leaves a truncated plan under the served name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- plan validation ------------------------------------------------------------------------------

def load_polygraphy(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The inputs and the PyTorch outputs the ONNX validation saved (validate.save_polygraphy)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    inputs_path, outputs_path = directory / "inputs.json", directory / "pytorch_outputs.json"
    for p in (inputs_path, outputs_path):
        if not p.is_file():
            raise ExportError(f"plan validation needs {p} (written by the ONNX validation); re-export with --force")
    feeds = load_json(str(inputs_path))
    results = RunResults.load(str(outputs_path))
    (_, iterations), = list(results.items())
    return dict(feeds[0]), {k: np.asarray(v) for k, v in iterations[0].items()}


def run_plan(trt: Any, plan: Path, feed: Mapping[str, np.ndarray], device: str = "cuda") -> dict[str, np.ndarray]:
    """Run a serialized plan once on `feed` with TensorRT 10's tensor API; outputs as numpy.

    Buffers are torch tensors on `device` (torch is already a dependency; its CUDA build is in
    NVIDIA's containers), addressed by name through set_tensor_address and run by execute_async_v3.
    """
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(plan, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise ExportError(f"TensorRT cannot deserialize {plan.name} (built by another TensorRT version or GPU?)")
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    missing = sorted(set(inputs) - set(feed))
    if missing:
        raise ExportError(f"{plan.name}: no saved input for engine input(s) {missing}")
    for name in inputs:
        array = np.ascontiguousarray(feed[name])
        buffers[name] = torch.from_numpy(array).to(device)
        context.set_input_shape(name, tuple(array.shape))
    for name in names:
        if name in buffers:
            continue
        shape = tuple(context.get_tensor_shape(name))
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.empty(shape, dtype=dtype, device=device)
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream() if device.startswith("cuda") else None
    handle = stream.cuda_stream if stream is not None else 0
    if not context.execute_async_v3(handle):
        raise ExportError(f"{plan.name}: TensorRT execution failed (see the TensorRT log above)")
    if stream is not None:
        stream.synchronize()
    return {n: buffers[n].cpu().numpy() for n in names if n not in inputs}


def validate_plan(trt: Any, plan: Path, spec: SubmodelSpec, polygraphy_dir: Path, device: str = "cuda") -> dict[str, Any]:
    """Run the plan on the saved validation inputs and compare with PyTorch at the spec's tolerances
    (ExportError naming the outputs that failed); dump the layer information and report whether
    attention was fused. Returns the numbers for the engine manifest."""
    feed, reference = load_polygraphy(polygraphy_dir)
    got = run_plan(trt, plan, feed, device)
    outputs, failures = {}, []
    for name in spec.output_names:
        if name not in got:
            failures.append(f"{name}: missing from the engine's outputs")
            continue
        ok, max_abs, max_rel = spec.tolerances[name].check(got[name], reference[name]) \
            if got[name].shape == reference[name].shape else (False, float("inf"), float("inf"))
        outputs[name] = {"max_abs": max_abs, "max_rel": max_rel, "ok": ok, "shape": list(got[name].shape)}
        if not ok:
            tol = spec.tolerances[name]
            failures.append(f"{name}: max abs {max_abs:.4g}, max rel {max_rel:.4g} (atol {tol.atol}, rtol {tol.rtol}; "
                            f"shapes {list(got[name].shape)} vs {list(reference[name].shape)})")
    if failures:
        raise ExportError(f"{spec.name}: the TensorRT plan does not match PyTorch on the saved inputs: " + "; ".join(failures))
    layers = engine_layers(trt, plan)
    (plan.parent / LAYERS_NAME).write_text(json.dumps(layers, indent=1) + "\n")
    attention = attention_fusion(layers)
    if not attention["fused"]:
        logger.warning("%s: attention is NOT fused in %s (%d unfused Softmax layer(s)): at the max profile every "
                       "head materialises the full score matrix, hundreds of GB at 81x480x832", spec.name, plan.name,
                       attention["unfused_softmax"])
    logger.info("%s: plan validated against PyTorch (%s); attention fused: %s", spec.name,
                ", ".join(f"{k} max abs {v['max_abs']:.3g}" for k, v in outputs.items()), attention["fused"])
    return {"inputs": {k: list(np.shape(v)) for k, v in feed.items()}, "outputs": outputs, "attention": attention,
            "layers": len(layers), "layer_info": LAYERS_NAME}


def engine_layers(trt: Any, plan: Path) -> list[dict[str, Any]]:
    """The engine inspector's per-layer JSON (names, types, precisions, tactics)."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(plan, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


# An unfused attention leaves a standalone SoftMax layer between two matrix multiplies; a fused one
# (Myelin's MHA/flash kernels, inside a ForeignNode, or TensorRT 10's attention layer) does not.
# The kernel names are reported too, for a reader of the manifest.
_FUSED_KERNEL = re.compile(r"fmha|flash|mha", re.IGNORECASE)


def attention_fusion(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the engine's attention is fused: no standalone Softmax layer is left."""
    def text(layer: dict[str, Any]) -> str:
        return " ".join(str(layer.get(k, "")) for k in ("Name", "LayerType", "TacticName", "Metadata"))

    kernels = [layer.get("Name", "") for layer in layers if _FUSED_KERNEL.search(text(layer))]
    softmax = [layer.get("Name", "") for layer in layers if str(layer.get("LayerType", "")).lower() == "softmax"]
    return {"fused": not softmax, "unfused_softmax": len(softmax), "fused_kernel_layers": len(kernels),
            "examples": softmax[:3] or kernels[:3]}



def describe(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest.get("key", {}), sort_keys=True)
