"""Sessions for the exported submodels, run on behalf of python-backend models.

Every graph runs in onnxruntime's CPU provider unless its spec's runtime is OpenVINO: a VAE exported
with --vae-precision bf16 (onnxruntime has no bf16 convolution kernels, so that fp32 graph runs in
OpenVINO's CPU plugin with bf16 inference precision: oneDNN's AVX-512 BF16 / AMX convolutions), an
fp32 VAE exported with --vae-runtime openvino (f32 inference precision; the default on the classes
where it was measured faster, machine.cpu_vae_runtime), and a core exported with --core-runtime openvino. All sit behind
onnxruntime's session API.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..contract.params import _int_param
from ..contract.protocol import CORE, MODEL_MANIFEST, ONNX_FILE, PARAM_THREADS
from ..contract.specs import Precision, Runtime, SubmodelSpec
from ..errors import CheckpointError, ShapeError, ThfmError
from ..machine import CpuFeatures, read_cpu
from .assets import load_assets, repository_root

logger = logging.getLogger(__name__)


def session_options(threads: int = 0):
    """The onnxruntime session options of the served models (the benchmarks time these too)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # 0 lets onnxruntime use one thread per core; a value caps it where several models share cores.
    opts.intra_op_num_threads = int(threads)
    # Each python model is its own process and the models of a request run one after another on the
    # same cores: a thread pool spinning after its run would steal CPU from the next model.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No CPU memory arena: the arena keeps its peak and grows with fragmentation, and a graph that
    # mixes channels-last int8 convolutions with float ones (the int8 VAE decoder's float tail) grew
    # it past 17 GB on one 17x256x256 row, killed by the OOM killer; without it the same call peaked
    # at 3.2 GB, and the fp32 and every-Conv int8 decoders ran no slower (export/RESULTS.md).
    opts.enable_cpu_mem_arena = False
    return opts


def create_session(path: str | Path, threads: int = 0, spec: SubmodelSpec | None = None):
    """A CPU session for one exported graph: onnxruntime, or OpenVINO where the spec's runtime says so."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: export the model first (`thfm export`)")
    if spec is not None and runs_in_openvino(spec):
        # A compiled core holds its own repacked weights (2 GB for the 1.3B shape's int8 core): keep one.
        return OpenVinoSession(path, threads, spec.precision, max_shapes=1 if spec.name == CORE else 4)
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])


def runs_in_openvino(spec: SubmodelSpec) -> bool:
    """The spec's runtime (contract.specs.default_runtime: a bf16 VAE; --vae-runtime and --core-runtime
    openvino); every other graph runs in onnxruntime (a GPU repository's core in TensorRT)."""
    return spec.runtime == Runtime.OPENVINO.value


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return (f"OpenVINO is not installed ({e}); the bf16 VAE and --core-runtime openvino run in OpenVINO's "
                "CPU plugin: pip install the project (it pins openvino) or export with --vae-precision fp32 and "
                "--core-runtime onnxruntime")
    return None


def openvino_inference_precision(precision: str, cpu: CpuFeatures) -> str:
    """OpenVINO's inference precision for a graph of this precision on this CPU.

    - bf16 (the bf16 VAE: the fp32 graph lowered to bf16): bf16, or f32 on a CPU without bf16
      instructions, where it would be emulated (correct, only slower; the session warns).
    - int8 (the Q/DQ core): its quantised linears run int8 whatever the hint; the float remainder
      (attention products, norms, softmax, RoPE) runs bf16 where the CPU has bf16 instructions. On the
      AVX-512 BF16 EPYC class that made the 1.3B core 1.74x onnxruntime's int8 (perf/README.md); the
      export validates it in this session against PyTorch fp32 (fatal past the spec's int8
      tolerances) and reports its task drift.
    - fp32: f32.
    """
    if precision in (Precision.BF16.value, Precision.INT8.value) and cpu.bf16:
        return "bf16"
    return "f32"


@dataclass(frozen=True)
class _Port:
    name: str


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO's CPU plugin, with onnxruntime's session API as the serving
    code uses it (get_inputs, get_outputs, run), so OnnxModel batches and checks it alike.

    The inference precision follows the graph's (openvino_inference_precision).

    The graph is compiled for one batch row of each distinct input shape, with that shape fixed, and a
    batch runs row by row:
    - fixed shapes: compiled with dynamic height and width, OpenVINO 2026.4's bf16 decoder was wrong
      along the right edge of the frame (the trained small checkpoint at 192x192: max abs 0.72 on
      [0, 1] maps in the last 64 columns, exact elsewhere), while the same graph reshaped to the
      input's shape stayed within 0.04 (PyTorch bf16 autocast: 0.02);
    - one row: these graphs are compute-bound at a window's size, so a batch gains nothing (the 1.3B
      shape's decoder: 4 rows in 88.8 s one by one, 87.3 s as one batch, equal outputs; its int8 core:
      one row 6.0 s, 6 rows as one batch 35.5-36.7 s), while every compiled shape costs a compilation
      and memory (the 1.3B int8 core: 2 GB each). A server then compiles once per window grid.
    The least recently used compiled shape is dropped beyond max_shapes. In bf16, each shape's model
    has its one-frame causal convolutions padded explicitly first (explicit_time_padding: OpenVINO's
    AMX kernel for them is wrong).
    """

    def __init__(self, path: Path, threads: int = 0, precision: str = "bf16", cpu: CpuFeatures | None = None,
                 max_shapes: int = 4):
        missing = openvino_missing()
        if missing:
            raise ThfmError(missing)
        import openvino as ov

        cpu = cpu or read_cpu()
        hint = openvino_inference_precision(precision, cpu)
        if precision == Precision.BF16.value and hint != "bf16":
            logger.warning("%s: bf16 graph on a CPU without bf16 instructions (%s): OpenVINO runs it in f32",
                           path, cpu.machine_class)
        self._config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core = ov.Core()
        self._model = self._core.read_model(str(path))
        self.path = Path(path)
        self.precision = precision
        self.inference_precision = hint
        self.max_shapes = max(1, int(max_shapes))
        self._inputs = [_Port(p.get_any_name()) for p in self._model.inputs]
        self._outputs = [_Port(p.get_any_name()) for p in self._model.outputs]
        self._requests: dict[tuple, object] = {}  # one row's input shapes -> infer request, least recently used first

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def _request(self, row_shapes: Mapping[str, Sequence[int]]):
        key = tuple((p.name, tuple(row_shapes[p.name])) for p in self._inputs)
        request = self._requests.pop(key, None)
        if request is None:
            while len(self._requests) >= self.max_shapes:  # free the old one before compiling the new
                self._requests.pop(next(iter(self._requests)))
            model = self._model.clone()
            model.reshape({name: list(shape) for name, shape in key})
            if self.inference_precision == "bf16":
                explicit_time_padding(model)
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
            logger.info("%s: compiled by OpenVINO for %s (%s %s)", self.path.name, dict(key), self.precision,
                        self.inference_precision)
        self._requests[key] = request
        return request

    def prepare(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Compile for these input shapes now (a server does it for the export shape at load, so the
        first request does not wait for the compilation)."""
        self._request({n: (1, *tuple(shape)[1:]) for n, shape in shapes.items()})

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = [o.name for o in self._outputs] if output_names is None else list(output_names)
        rows = {int(np.shape(v)[0]) for v in feeds.values()}
        if len(rows) != 1:
            raise ShapeError(f"{self.path.name}: inputs disagree on the batch size: "
                             + ", ".join(f"{n} {np.shape(v)}" for n, v in feeds.items()))
        request = self._request({n: (1, *np.shape(v)[1:]) for n, v in feeds.items()})
        out: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i in range(rows.pop()):
            results = request.infer({n: np.ascontiguousarray(v[i : i + 1]) for n, v in feeds.items()})
            # The request's output buffers are reused by the next call: copy them out.
            by_name = {port.get_any_name(): value for port, value in results.items()}
            for n in names:
                out[n].append(np.array(by_name[n], copy=True))
        return [np.concatenate(out[n], axis=0) for n in names]


def explicit_time_padding(model) -> int:
    """Rewrite, in place, each 3-D convolution of a statically shaped OpenVINO model whose input has
    fewer frames than its kernel and that pads in time: the time padding becomes zero frames
    concatenated to its input. Returns how many were rewritten.

    Why: on a Xeon with AMX, OpenVINO 2026.4's (and 2025.4's) bf16 convolution over a one-frame
    input with causal time padding (pads 2 before, 0 after, kernel 3) is wrong for some input
    channel counts (of those tried, 1, 3, 5, 7 and 12 were wrong, 2, 4, 6, 8 and 16 right): relative
    error 1, NaN with 96 output channels, and different from one run to the next. The Wan VAE's
    first chunk is one frame and its conv_in has 3 channels, so the bf16 encoder's latent was wrong
    from the first frame on. The same
    convolution over 2+ frames, or over the zero frames concatenated explicitly, is right (relative
    error 0.003, bf16 rounding), as it is on the AVX-512 BF16 path without AMX. Only the one-frame
    convolutions of a chunk are touched: they are small next to the others.
    """
    import openvino.opset13 as ops

    count = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        data, weights = op.input_value(0), op.input_value(1)
        shape, kernel = data.get_partial_shape(), weights.get_partial_shape()
        if shape.rank.get_length() != 5 or not shape.is_static or not kernel.is_static:
            continue
        attrs = op.get_attributes()
        before, after = attrs["pads_begin"][0], attrs["pads_end"][0]
        if not (before or after) or shape[2].get_length() >= kernel[2].get_length():
            continue
        dims = [d.get_length() for d in shape]
        dtype = data.get_element_type().to_dtype()
        parts = [ops.constant(np.zeros([*dims[:2], before, *dims[3:]], dtype)).output(0)] if before else []
        parts.append(data)
        if after:
            parts.append(ops.constant(np.zeros([*dims[:2], after, *dims[3:]], dtype)).output(0))
        padded = ops.concat(parts, axis=2)
        conv = ops.convolution(padded, weights, attrs["strides"], [0, *attrs["pads_begin"][1:]],
                               [0, *attrs["pads_end"][1:]], attrs["dilations"])
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(conv.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


def _read_manifest(version_dir: Path) -> dict:
    try:
        return json.loads((version_dir / MODEL_MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def int8_weights_warning(name: str, manifest: Mapping, cpu: CpuFeatures | None = None) -> str | None:
    """Why an int8 graph will be less accurate on this CPU than the export validated, or None.

    Without a u8 x s8 dot-product instruction (AVX2 only) onnxruntime sums pairs of int8 products in
    a saturating int16, which 8-bit weights overflow: the export quantises to 7 bits on such a CPU
    (export/quantize.py), but a graph exported on a VNNI machine, or before that recipe, has 8-bit
    weights (manifest: report.quantization.weight_bits, absent = 8)."""
    if manifest.get("spec", {}).get("precision") != "int8":
        return None
    bits = manifest.get("report", {}).get("quantization", {}).get("weight_bits", 8)
    cpu = cpu or read_cpu()
    if bits <= cpu.int8_weight_bits:
        return None
    where = manifest.get("machine", {}).get("class", "an unrecorded CPU")
    return (f"{name}: this int8 graph has 8-bit weights (exported on {where}); this CPU ({cpu.machine_class}) has no "
            "u8 x s8 dot-product instruction, so onnxruntime's int8 kernel saturates on them (the 1.3B core's task "
            "drift from fp32 was 10-14x that on VNNI machines). Re-export on this machine (`thfm export --target "
            "cpu`), which quantises the weights to 7 bits")


class OnnxModel:
    """One exported submodel run by onnxruntime on behalf of a python-backend model.

    With dynamic batching Triton hands over several requests at once; requests whose non-batch
    shapes agree are concatenated along the batch axis and run in one call (up to the spec's max
    batch), which is where batching pays: one pass over the weights for all rows.
    """

    def __init__(self, spec: SubmodelSpec, session):
        self.spec = spec
        self.session = session
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != spec.input_names or got_out != spec.output_names:
            raise CheckpointError(f"{spec.name}: the ONNX graph has inputs {got_in} / outputs {got_out}, the "
                                  f"repository manifest says {spec.input_names} / {spec.output_names}")

    @classmethod
    def load(cls, model_dir: str | Path, version: str | int, name: str,
             params: Mapping[str, str] | None = None) -> "OnnxModel":
        """From a python model's directory (args["model_repository"]): <dir>/<version>/model.onnx, and
        its spec from the repository manifest."""
        assets = load_assets(repository_root(model_dir))
        if name not in assets.specs:
            raise CheckpointError(f"the repository manifest has no spec for {name!r}")
        threads = _int_param(params or {}, PARAM_THREADS, 0)
        version_dir = Path(model_dir) / str(version)
        warning = int8_weights_warning(name, _read_manifest(version_dir))
        if warning:
            logger.warning(warning)
        spec = assets.specs[name]
        session = create_session(version_dir / ONNX_FILE, threads, spec)
        if isinstance(session, OpenVinoSession):
            session.prepare({t.name: spec.shape(t.name, "opt") for t in spec.inputs})
        return cls(spec, session)

    def check(self, inputs: Mapping[str, np.ndarray]) -> None:
        for t in self.spec.inputs:
            if t.name in inputs and np.asarray(inputs[t.name]).dtype != np.dtype(t.dtype):
                raise ShapeError(f"{self.spec.name}: input {t.name!r} must be {t.dtype}, got {inputs[t.name].dtype}")
        self.spec.check_inputs(inputs)
        for t in self.spec.inputs:
            check_finite(self.spec.name, t.name, inputs.get(t.name))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(inputs)
        outs = self.session.run(self.spec.output_names, {n: np.ascontiguousarray(inputs[n]) for n in self.spec.input_names})
        return dict(zip(self.spec.output_names, outs))

    def run_many(self, batch: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray] | ThfmError]:
        """One result (or the request's error) per request, in order."""
        results: list[dict[str, np.ndarray] | ThfmError | None] = [None] * len(batch)
        groups: dict[tuple, list[int]] = {}
        for i, inputs in enumerate(batch):
            try:
                self.check(inputs)
            except ThfmError as e:
                results[i] = e
                continue
            key = tuple((n, tuple(inputs[n].shape[1:])) for n in self.spec.input_names)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            for chunk in _chunks(members, [batch[i][self.spec.input_names[0]].shape[0] for i in members],
                                 self.spec.max_batch):
                joined = {n: np.concatenate([batch[i][n] for i in chunk], axis=0) for n in self.spec.input_names}
                outs = self.run(joined)
                start = 0
                for i in chunk:
                    rows = batch[i][self.spec.input_names[0]].shape[0]
                    results[i] = {k: v[start : start + rows] for k, v in outs.items()}
                    start += rows
        return results  # type: ignore[return-value]


def check_finite(model: str, name: str, x: np.ndarray | None) -> None:
    """ShapeError when a float input holds NaN or Inf (it would come back as NaN maps and keypoints,
    or as garbage from a TensorRT engine, with no error).

    One float64 sum decides: the sum of finite float32/float16 values cannot overflow float64, and
    any NaN or Inf makes it non-finite. That is one pass without a boolean temporary, a few ms for a
    Wan2.1 latent; the exact count is computed only for the error message.
    """
    if x is None:
        return
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or np.isfinite(x.sum(dtype=np.float64)):
        return
    nan = int(np.count_nonzero(np.isnan(x)))
    inf = int(np.count_nonzero(np.isinf(x)))
    raise ShapeError(f"{model}: input {name!r} has {nan} NaN and {inf} Inf values of {x.size}; "
                     "inputs must be finite")


def _chunks(members: list[int], rows: list[int], limit: int) -> list[list[int]]:
    """Split requests into consecutive groups of at most `limit` rows (each request stays whole)."""
    out, cur, n = [], [], 0
    for m, r in zip(members, rows):
        if cur and n + r > limit:
            out.append(cur)
            cur, n = [], 0
        cur.append(m)
        n += r
    if cur:
        out.append(cur)
    return out

