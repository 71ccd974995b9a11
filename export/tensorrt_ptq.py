"""Low-precision cores for TensorRT (``--target gpu --precision int8|fp8``) through NVIDIA ModelOpt.

ModelOpt's ONNX post-training quantization (``modelopt.onnx.quantization.quantize``) is NVIDIA's
own tool for writing Q/DQ graphs that TensorRT fuses. It is used with these placement rules (the
graph checks in ``qdq_placement`` test them):

- Q/DQ on the *inputs* of the weighted MatMuls only (the transformer's linears): TensorRT fuses
  DQ -> MatMul into an int8/fp8 GEMM and keeps the bias Add and everything after it in the high
  precision. Nothing quantises a MatMul's output, so no logit is rounded before Softmax and no
  linear before its bias.
- Attention products (QK^T, PV) are not quantised (``disable_mha_qdq``): a per-tensor int8
  Softmax output rounds most attention probabilities to zero at real sequence lengths (32,760
  tokens at 81x480x832 give probabilities around 1/32760, far below one int8 step of 1/127), and
  TensorRT's fused attention runs in 16-bit anyway.
- Excluded by module, as for the CPU recipe (quantize.DEFAULT_EXCLUDE): the patch embedding, the
  condition embedder, the output projection and THFM's keypoint heads.
- The rest of the graph is converted to a 16-bit type (``high_precision_dtype``): bf16, the GPU
  default (Wan was trained in bf16; fp16 overflows in its residual stream). Quantising an fp32
  graph and leaving it fp32 would make every unquantised op run in fp32 in a strongly typed engine.

Calibration: ModelOpt's max calibrator on onnxruntime's CPU provider, over the same calibration
samples as the CPU recipe (clip latents x every task's prompt). ModelOpt is optional (the ``gpu``
extra); without it the export says how to install it.

ModelOpt runs in a child process (``python -m thfm_serve.export.tensorrt_ptq``): it patches
onnxruntime.quantization's calibrators and quantizer globally when it quantises
(``modelopt.onnx.quantization.ort_patching``), which would change the CPU recipe (quantize.py) and
any onnxruntime calibration run later in the same process.

fp8 (E4M3, per-tensor) needs a GPU with fp8 tensor cores (Hopper, Ada or newer): TensorRT builds
it there; onnxruntime's CPU provider runs the graph here only through onnx's reference evaluator.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from thfm_serve.errors import ExportError

logger = logging.getLogger(__name__)

# bf16 everywhere the graph is not quantised: see the module docstring and precision.py.
HIGH_PRECISION_DTYPE = "bf16"
MODES = ("int8", "fp8")
QUANTIZED_OPS = ("MatMul",)
_EXCLUDABLE = ("MatMul", "Gemm", "Conv")


def import_modelopt_quantize() -> Any:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise ExportError(
            "int8/fp8 for --target gpu is written by NVIDIA ModelOpt, which is not installed: "
            "pip install 'thfm-serve[gpu]' (or nvidia-modelopt==0.47.0 onnxslim ml_dtypes lief "
            f"onnxconverter-common) and run the export again ({e})"
        ) from None
    return quantize


def quantize_for_tensorrt(fp32_path: Path, out_path: Path, samples: list[dict[str, np.ndarray]], mode: str,
                          exclude: Iterable[str], external_data: bool = False,
                          high_precision_dtype: str = HIGH_PRECISION_DTYPE) -> dict[str, Any]:
    """Write the ModelOpt Q/DQ core for TensorRT to out_path; return what was done (for the report).

    samples: calibration feeds {"latent": [B,...], "text": [B,...]} (one row per task), fed to
    ModelOpt one row at a time.
    """
    from .quantize import excluded_nodes

    if mode not in MODES:
        raise ExportError(f"TensorRT quantisation mode {mode!r}: choose from {', '.join(MODES)}")
    if not samples:
        raise ExportError(f"{mode}: no calibration samples")
    import_modelopt_quantize()  # fail here, with the install hint, rather than in the child process
    model = onnx.load(str(fp32_path), load_external_data=False)
    skip = excluded_nodes(model, exclude, _EXCLUDABLE)
    del model
    data = {k: np.concatenate([s[k] for s in samples], axis=0) for k in samples[0]}
    logger.info("%s (ModelOpt, for TensorRT): calibrating on %d rows; %d nodes excluded (%s); the rest in %s", mode,
                len(data["latent"]), len(skip), ", ".join(exclude), high_precision_dtype)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="thfm-modelopt-") as tmp:
        np.savez(Path(tmp) / "calibration.npz", **data)
        job = {"onnx": str(fp32_path), "out": str(out_path), "mode": mode, "calibration": str(Path(tmp) / "calibration.npz"),
               "exclude": skip, "high_precision_dtype": high_precision_dtype, "external_data": bool(external_data)}
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", __name__, str(Path(tmp) / "job.json")], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()][-3:]
        raise ExportError(f"{mode}: ModelOpt quantisation failed (exit {proc.returncode}): " + " | ".join(tail)[-600:])
    if not out_path.is_file():
        raise ExportError(f"{mode}: ModelOpt wrote no {out_path.name}")
    placement = qdq_placement(onnx.load(str(out_path), load_external_data=False))
    problems = placement_problems(placement, high_precision_dtype)
    if problems:
        raise ExportError(f"{mode}: the quantised graph breaks the TensorRT placement rules: " + "; ".join(problems))
    return {
        **placement, "excluded_scopes": list(exclude), "excluded_nodes": len(skip),
        "calibration_samples": len(samples), "calibration_rows": int(len(data["latent"])),
        "recipe": f"modelopt-{mode}", "high_precision_dtype": high_precision_dtype,
        "method": (f"NVIDIA ModelOpt ONNX PTQ ({mode}, max calibration on onnxruntime CPU), Q/DQ on the inputs of "
                   f"the weighted MatMuls, attention products and excluded modules unquantised, the rest {high_precision_dtype}"),
        "calibration": "ModelOpt max calibrator (onnxruntime CPU)",
    }


def _run_job(job_path: str) -> None:
    """The child process: ModelOpt's quantize on one job written by quantize_for_tensorrt."""
    job = json.loads(Path(job_path).read_text())
    quantize = import_modelopt_quantize()
    with np.load(job["calibration"]) as npz:
        data = {k: npz[k] for k in npz.files}
    quantize(
        job["onnx"], quantize_mode=job["mode"], calibration_data=data, calibration_method="max",
        calibration_eps=["cpu"], op_types_to_quantize=list(QUANTIZED_OPS),
        nodes_to_exclude=[f"^{re.escape(n)}$" for n in job["exclude"]], disable_mha_qdq=True,
        high_precision_dtype=job["high_precision_dtype"], use_external_data_format=job["external_data"],
        output_path=job["out"], log_level="WARNING",
    )


_FLOAT_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64"}
# Ops that do the arithmetic (their output type is what TensorRT runs them in, strongly typed).
_COMPUTE_OPS = ("MatMul", "Gemm", "Conv", "Add", "Mul", "Softmax", "Gelu", "LayerNormalization", "Sigmoid", "Div",
                "Sub")


def qdq_placement(model: onnx.ModelProto) -> dict[str, Any]:
    """Where the Q/DQ nodes sit in a graph, and which float type each kind of compute op runs in.

    quantized_matmuls: MatMuls whose every input comes from a DequantizeLinear;
    activation_products: of those, MatMuls of two activations (QK^T, PV), weight_matmuls the rest;
    quantized_outputs: MatMuls whose output feeds a QuantizeLinear;
    softmax_qdq: Softmax nodes with a Q/DQ on their input or output;
    compute_dtypes: op type -> {float type: count} from the graph's inferred types.
    """
    model = onnx.shape_inference.infer_shapes(model)
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)

    def dq_of(name: str) -> onnx.NodeProto | None:
        node = producer.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def from_weight(dq: onnx.NodeProto) -> bool:
        src = dq.input[0]
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear":  # Q(weight) -> DQ: ModelOpt's fake-quantised weights
            src = q.input[0]
        while src in producer and producer[src].op_type in ("Cast", "Transpose", "Identity"):
            src = producer[src].input[0]
        return src in inits or (src in producer and producer[src].op_type == "Constant")

    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if all(dq_of(i) is not None for i in n.input)]
    products = [n.name for n in quantized if not any(from_weight(dq_of(i)) for i in n.input)]
    quantized_outputs = [n.name for n in matmuls if any(c.op_type == "QuantizeLinear" for c in consumers[n.output[0]])]
    softmax_qdq = [n.name for n in model.graph.node if n.op_type == "Softmax"
                   and (dq_of(n.input[0]) is not None
                        or any(c.op_type == "QuantizeLinear" for c in consumers[n.output[0]]))]
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    compute: dict[str, dict[str, int]] = {}
    for n in model.graph.node:
        if n.op_type in _COMPUTE_OPS and n.output[0] in types and types[n.output[0]] in _FLOAT_NAMES:
            per = compute.setdefault(n.op_type, {})
            name = _FLOAT_NAMES[types[n.output[0]]]
            per[name] = per.get(name, 0) + 1
    return {
        "matmuls": len(matmuls), "quantized_matmuls": len(quantized), "activation_products": products,
        "weight_matmuls": len(quantized) - len(products), "quantized_outputs": quantized_outputs,
        "softmax_qdq": softmax_qdq,
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "compute_dtypes": compute,
    }


def placement_problems(placement: dict[str, Any], high_precision_dtype: str) -> list[str]:
    """What in a placement (qdq_placement) breaks the rules of the module docstring."""
    out = []
    if placement["weight_matmuls"] == 0:
        out.append("no weighted MatMul is quantised")
    if placement["quantized_outputs"]:
        out.append(f"{len(placement['quantized_outputs'])} MatMul output(s) quantised, e.g. {placement['quantized_outputs'][:2]}")
    if placement["softmax_qdq"]:
        out.append(f"Q/DQ around Softmax {placement['softmax_qdq'][:2]}")
    if placement["activation_products"]:
        out.append(f"attention products quantised {placement['activation_products'][:2]}")
    want = {"bf16": "bfloat16", "fp16": "float16"}.get(high_precision_dtype, high_precision_dtype)
    counts = collections.Counter()
    for per in placement["compute_dtypes"].values():
        counts.update(per)
    low = counts.get(want, 0)
    if counts and low < 0.9 * sum(counts.values()):
        out.append(f"only {low} of {sum(counts.values())} compute ops are {want} ({dict(counts)})")
    return out


if __name__ == "__main__":
    _run_job(sys.argv[1])
