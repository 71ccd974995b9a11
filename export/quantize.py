"""INT8 core: explicit Q/DQ ONNX (QuantizeLinear/DequantizeLinear) from the fp32 ONNX.

onnxruntime.quantization.quantize_static in QDQ format, calibrated on Wan latents of calibration
clips (calibration.py) with every task's prompt embedding. The format is chosen for TensorRT, which
consumes explicitly quantised ONNX: int8 symmetric activations and weights (TensorRT supports zero
points of 0 only), per-channel weights along the output axis. The same file runs in onnxruntime on
CPU (VNNI/AMX int8 kernels), which is how it is validated here.

Only MatMuls are quantised (the transformer's linears and attention products); everything else
stays fp32. Excluded by module (ONNX nodes carry the torch module path in their metadata):
- ``transformer.patch_embedding`` and ``transformer.condition_embedder``: TensorRT Model Optimizer's
  diffusers recipe skips both (input-facing; the condition path feeds every block's modulation);
- ``transformer.proj_out`` and THFM's ``heads``: the last projections produce the outputs users
  read (latent and keypoints) and cost little; measured on the tiny checkpoint, quantising them
  added most of the keypoint drift (export/RESULTS.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx

from thfm_serve.errors import ExportError

logger = logging.getLogger(__name__)

DEFAULT_EXCLUDE = (
    "transformer.patch_embedding",
    "transformer.condition_embedder",
    "transformer.proj_out",
    "heads",
)
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The torch module paths a node was traced under (from the dynamo exporter's metadata)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                import ast

                scopes = ast.literal_eval(prop.value)
                return [s for s in scopes if isinstance(s, str)]
            except (ValueError, SyntaxError):
                return []
    return []


# precision.ExportCore wraps ThfmCore as attribute `core`, so traced scopes read "core.transformer...".
WRAPPER_PREFIX = "core."


def excluded_nodes(model: onnx.ModelProto, exclude: Iterable[str], op_types: Iterable[str]) -> list[str]:
    """Names of `op_types` nodes traced inside any of the ThfmCore module paths in `exclude`."""
    prefixes = tuple(exclude)
    ops = set(op_types)
    out = []
    for n in model.graph.node:
        if n.op_type not in ops:
            continue
        scopes = [s[len(WRAPPER_PREFIX):] if s.startswith(WRAPPER_PREFIX) else s for s in node_scopes(n)]
        if any(s == p or s.startswith(p + ".") for s in scopes for p in prefixes):
            out.append(n.name)
    return out


class _DropPreprocessHint(logging.Filter):
    """onnxruntime's quantizer logs "Please consider pre-processing before quantization" on the root
    logger for every model. Its pre-processing (symbolic shape inference, graph optimisation) is for
    fixed-shape CNNs; our graph was already optimised and shape-inferred by the exporter."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


class _Reader:
    """onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - unused by MinMax
        pass


def quantize_core(fp32_path: Path, out_path: Path, samples: list[dict[str, np.ndarray]],
                  exclude: Iterable[str] = DEFAULT_EXCLUDE, external_data: bool = False) -> dict[str, Any]:
    """Write the Q/DQ model to out_path; return what was done (for the report)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not samples:
        raise ExportError("int8: no calibration samples")
    model = onnx.load(str(fp32_path), load_external_data=False)
    op_types = ["MatMul"]
    skip = excluded_nodes(model, exclude, op_types)
    logger.info("int8: calibrating on %d samples; %d MatMul nodes excluded (%s)", len(samples), len(skip), ", ".join(exclude))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    hint_filter = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint_filter)
    for handler in root.handlers:
        handler.addFilter(hint_filter)
    try:
        quantize_static(
            str(fp32_path), str(out_path), _Reader(samples),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=skip,
            use_external_data_format=external_data, calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": True,  # TensorRT: zero point 0 only
                "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weights [K, N]: one scale per output
            },
        )
    except Exception as e:  # onnxruntime raises plain exceptions for calibration problems
        raise ExportError(f"int8: quantize_static failed: {type(e).__name__}: {str(e).splitlines()[0][:400]}") from e
    finally:
        root.removeFilter(hint_filter)
        for handler in root.handlers:
            handler.removeFilter(hint_filter)
    stats = qdq_stats(out_path)
    if stats["quantized_matmuls"] == 0:
        raise ExportError(f"int8: {out_path.name} has no quantized MatMul (Q/DQ insertion failed): {stats}")
    stats.update({"excluded_scopes": list(exclude), "excluded_nodes": len(skip), "calibration_samples": len(samples),
                  "method": "onnxruntime quantize_static QDQ, MinMax, int8 symmetric, per-channel weights"})
    return stats


def qdq_stats(path: Path) -> dict[str, int]:
    """Count Q/DQ nodes and the quantized MatMuls: every input comes from a DequantizeLinear (an
    excluded MatMul can still read a dequantized activation shared with a quantized neighbour, but
    its float weight is not dequantized, so it is not counted)."""
    model = onnx.load(str(path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if all(i in producer and producer[i].op_type == "DequantizeLinear" for i in n.input)]
    return {
        "matmuls": len(matmuls),
        "quantized_matmuls": len(quantized),
        "quantize_linear": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
        "dequantize_linear": sum(n.op_type == "DequantizeLinear" for n in model.graph.node),
        "int8_initializers": sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer),
    }
