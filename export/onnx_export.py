"""PyTorch module -> clean ONNX file, driven by a SubmodelSpec.

Steps: torch.onnx.export(dynamo=True) with the spec's dynamic shapes (the legacy exporter fails on
Wan's aten::rms_norm); the onnxscript optimizer's passes (constant folding, its rewrite rules but
one, dead code, initializer de-duplication; `optimize_graph`); graph inputs/outputs renamed to the
spec's axis symbols; a float64 check (TensorRT has no double); save (external data above 2 GB, the
protobuf limit); ONNX shape inference and the full checker on the saved file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from thfm_serve.errors import ExportError

from thfm_serve.contract.specs import SubmodelSpec

logger = logging.getLogger(__name__)

# Protobuf cannot serialise a message over 2 GiB; bigger models keep weights in model.onnx.data.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data (what torch and onnxruntime expect)


def trace_dims(spec: SubmodelSpec) -> dict[str, int]:
    """Base dims for the example inputs the exporter traces with.

    torch.export specialises any dim whose example size is 0 or 1, so every dynamic dim is traced
    at >= 2 (clamped to its profile), whatever the export (opt) shape is.
    """
    dims = spec.dims("opt")
    for d in spec.dynamic_dims:
        lo, opt, hi = spec.profiles[d]
        dims[d] = min(max(opt, 2), hi)
    return dims


def module_bytes(module: Any) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _quiet_exporter_logs() -> None:
    # The onnxscript/onnx_ir passes log every initializer they de-duplicate at INFO: thousands of
    # lines for a 30-layer model that say nothing to a user.
    for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo", "torch.fx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def export_onnx(module: Any, spec: SubmodelSpec, path: Path, opset: int | None = None) -> Path:
    """Export `module` (forward(*inputs in spec order)) to `path`; returns the path.

    The module must take and return float32 tensors in the spec's order (low-precision modules cast
    inside; see precision.py).
    """
    import torch

    _quiet_exporter_logs()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = spec.dummy_inputs(trace_dims(spec), seed=0)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    external = module_bytes(module) > PROTOBUF_LIMIT * 0.9  # headroom for the graph itself
    logger.info("exporting %s to ONNX (%s, trace shapes %s)", spec.name, "external data" if external else "single file",
                {n: tuple(a.shape) for n, a in example.items()})
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module, args, input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=spec.torch_dynamic_shapes(), dynamo=True, external_data=external,
                optimize=False, opset_version=opset, verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean "this module does not export"
        raise ExportError(f"{spec.name}: torch.onnx.export failed: {type(e).__name__}: {_first_line(e)}") from e
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise ExportError(f"{spec.name}: torch.onnx.export returned no program")
    optimize_graph(program.model)

    _rename_io_dims(program.model, spec)
    doubles = _doubles_in_ir(program.model)
    if doubles:
        raise ExportError(f"{spec.name}: float64 values in the exported graph (TensorRT has no double): "
                          f"{', '.join(doubles[:10])}{' ...' if len(doubles) > 10 else ''}")
    for stale in (path, path.with_name(path.name + EXTERNAL_DATA_SUFFIX)):
        if stale.exists():
            stale.unlink()
    program.save(str(path), external_data=external)
    del program
    finalize_onnx(path, spec)
    return path


def rewrite_rules() -> list[Any]:
    """onnxscript's default rewrite rules (what torch.onnx.export(optimize=True) applies) without
    `slice_split_rule`.

    That rule (two Slices of one tensor that cover it -> one Split) is the only default rule whose
    pattern has two output nodes, and onnxscript matches such a pattern by scanning every node of
    the graph for each candidate Slice: quadratic in the graph's size. On the Wan2.1-1.3B-shaped core
    (30 blocks, rotary embeddings made of Slices) it took most of the optimizer's time, itself most
    of the export's trace (export/RESULTS.md). On this project's graphs the rule never fires: the
    1.3B-shaped core and the tiny preset's graphs come out identical to torch's optimize=True path
    (tests/test_export_specs.py); where it would, two Slices compute what the Split would."""
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import slice_split_rule

    rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r is not slice_split_rule]
    if len(rules) != len(rewriter._DEFAULT_REWRITE_RULES) - 1:
        raise ExportError("onnxscript's default rewrite rules no longer hold slice_split_rule once: "
                          "check export.onnx_export.rewrite_rules against the installed onnxscript")
    return rules


def optimize_graph(model: Any) -> None:
    """The onnxscript optimizer torch.onnx.export(optimize=True) runs (onnxscript.optimizer.optimize_ir,
    then its ONNX fusions; the passes and limits of the pinned onnxscript 0.7.2), in place, with
    `rewrite_rules()` in the rewrite step."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import onnx_fusions

    loop = ir.passes.PassManager(
        [_constant_folding.FoldConstantsPass(shape_inference=True,
                                             input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                             output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
         rewriter.RewritePass(rewrite_rules()),
         common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
        steps=2, early_stop=True)
    ir.passes.Sequential(
        common.InlinePass(), loop, common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(model)
    onnx_fusions.fuse(model)


def finalize_onnx(path: Path, spec: SubmodelSpec) -> None:
    """Shape inference, the full checker and the float64 check on a saved file (in place)."""
    path = Path(path)
    try:
        # infer_shapes_path works on the file, so models with external data never load whole.
        onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=False, data_prop=True)
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{spec.name}: {path.name} fails the ONNX checker: {_first_line(e)}") from None
    doubles = doubles_in_proto(onnx.load(str(path), load_external_data=False))
    if doubles:
        raise ExportError(f"{spec.name}: float64 values in {path.name} after shape inference (TensorRT has no "
                          f"double): {', '.join(doubles[:10])}")


def onnx_files(path: Path) -> list[Path]:
    """The model file and its external-data file, if any."""
    path = Path(path)
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    return [p for p in (path, data) if p.exists()]


# --- checks -------------------------------------------------------------------------------------

def _rename_io_dims(model: Any, spec: SubmodelSpec) -> None:
    """Set graph input/output dim names to the spec's symbols ("2*hp", "4*latent_frames-3").

    The exporter names input dims after the torch Dims but may give outputs internal names ("s45")
    when it cannot relate them; the spec knows the relation, and validation runs every output at
    several shapes, so a wrong name cannot hide a wrong shape.
    """
    import onnx_ir as ir

    symbols = spec.onnx_dim_params()
    for value in list(model.graph.inputs) + list(model.graph.outputs):
        if value.name not in symbols or value.shape is None:
            continue
        dims = list(value.shape)
        for axis, sym in symbols[value.name].items():
            if axis < len(dims) and not isinstance(dims[axis], int):
                dims[axis] = ir.SymbolicDim(sym)
        value.shape = ir.Shape(dims)


def _doubles_in_ir(model: Any) -> list[str]:
    import onnx_ir as ir

    found = []
    for value in model.graph.initializers.values():
        if value.dtype == ir.DataType.DOUBLE:
            found.append(f"initializer {value.name}")
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        for out in node.outputs:
            if out.dtype == ir.DataType.DOUBLE:
                found.append(f"{node.op_type} {node.name} -> {out.name}")
    return found


def doubles_in_proto(model: onnx.ModelProto) -> list[str]:
    """Every place a float64 appears: initializers, Constant/Cast attributes, typed values."""
    dbl = onnx.TensorProto.DOUBLE
    found = [f"initializer {t.name}" for t in model.graph.initializer if t.data_type == dbl]

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == dbl:
                    found.append(f"{node.op_type} {node.name} constant")
                if node.op_type in ("Cast", "CastLike") and attr.name == "to" and attr.i == dbl:
                    found.append(f"Cast {node.name} to double")
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type == dbl:
                found.append(f"value {v.name}")

    walk(model.graph)
    return found


def io_summary(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """name -> {dtype, shape (ints and dim_params), kind} for graph inputs and outputs."""
    out = {}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for v in values:
            tt = v.type.tensor_type
            shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                     for d in tt.shape.dim]
            out[v.name] = {"kind": kind, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": shape}
    return out


def check_structure(path: Path, spec: SubmodelSpec) -> dict[str, Any]:
    """Names, order, dtypes, ranks, symbolic axes and static sizes against the spec (ExportError listing
    every mismatch)."""
    model = onnx.load(str(path), load_external_data=False)
    io = io_summary(model)
    problems = []
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != spec.input_names:
        problems.append(f"inputs {got_in} != spec {spec.input_names}")
    if got_out != spec.output_names:
        problems.append(f"outputs {got_out} != spec {spec.output_names}")
    symbols = spec.onnx_dim_params()
    for t in spec.inputs + spec.outputs:
        if t.name not in io:
            continue
        info = io[t.name]
        if info["dtype"] != t.dtype:
            problems.append(f"{t.name}: dtype {info['dtype']} != {t.dtype}")
        if len(info["shape"]) != len(t.shape):
            problems.append(f"{t.name}: rank {len(info['shape'])} != {len(t.shape)}")
            continue
        want_static = spec.shape(t.name, "opt")
        for axis, got in enumerate(info["shape"]):
            if axis in symbols[t.name]:
                if got != symbols[t.name][axis]:
                    problems.append(f"{t.name} axis {axis}: {got!r}, expected symbolic {symbols[t.name][axis]!r}")
            elif got != want_static[axis]:
                problems.append(f"{t.name} axis {axis}: {got!r}, expected static {want_static[axis]}")
    if problems:
        raise ExportError(f"{spec.name}: {Path(path).name} does not match its spec: " + "; ".join(problems))
    return {"inputs": got_in, "outputs": got_out, "io": io, "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


def op_counts(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


def initializer_dtypes(path: Path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for t in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        out[name] = out.get(name, 0) + int(np.prod(t.dims)) if t.dims else out.get(name, 0) + 1
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:500]

