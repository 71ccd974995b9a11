"""INT8 core for onnxruntime (``--target cpu``): explicit Q/DQ ONNX from the fp32 ONNX.

The exporter's ``--target gpu`` int8/fp8 cores are written by NVIDIA ModelOpt instead
(tensorrt_ptq.py: Q/DQ on the linears' inputs only, the rest bf16, what TensorRT fuses).

onnxruntime.quantization.quantize_static in QDQ format, calibrated on Wan latents of calibration
clips (calibration.py) with every task's prompt embedding. Weights are int8, symmetric, one scale
per output channel. Activations follow the kernels (RECIPES):
- "gpu": int8 symmetric activations, the linears and attention's QK^T/PV products quantised, each
  MatMul's output too. It was the first GPU recipe and is kept only as a comparison for
  perf/int8_recipes.py and perf/bench_core.py: quantising outputs and Softmax per-tensor is what
  tensorrt_ptq.py avoids;
- cpu (onnxruntime on x86): uint8 asymmetric activations, the operand order VNNI's vpdpbusd
  multiplies natively; onnxruntime then fuses every DQ -> MatMul -> Q into QLinearMatMul. With int8
  activations part of the MatMuls stay DequantizeLinear(weight) -> float MatMul after optimisation,
  a weight dequantisation per call. Only the linears are quantised: quantised attention products
  add a QLinearSoftmax that costs more than the int8 products save (measured by perf/int8_recipes.py;
  perf/README.md has the numbers). On a CPU without VNNI (AVX2 only) the weights are 7-bit
  ("cpu-no-vnni", chosen by recipe_for from the CPU the export runs on): onnxruntime's AVX2 kernel
  sums pairs of u8 x s8 products in saturating int16, which 8-bit weights overflow.
Both files run in onnxruntime on CPU, which is how they are validated here.

Calibration (MinMax ranges of every quantised MatMul's input and output): for a recipe on the
linears only, from PyTorch forward hooks on the fp32 core's nn.Linear modules, matched to the ONNX
MatMuls through the exporter's name scopes (a Linear exports as MatMul(x, W^T) + Add(bias), so the
output range is taken before the bias). onnxruntime's own calibrator holds the fp32 model several
times over (loaded model, augmented copy, its session, the quantizer's copy): on the 1.3B-shaped core
it was killed by the OOM killer at 24 GB. A recipe with attention products (QK^T, PV have no module
to hook) uses onnxruntime's calibrator, which needs more memory than this machine has at 1.3B.

Only MatMuls are quantised; everything else stays fp32. Excluded by module (ONNX nodes carry the
torch module path in their metadata):
- ``transformer.patch_embedding`` and ``transformer.condition_embedder``: TensorRT Model Optimizer's
  diffusers recipe skips both (input-facing; the condition path feeds every block's modulation);
- ``transformer.proj_out`` and THFM's ``heads``: the last projections produce the outputs users
  read (latent and keypoints) and cost little; measured on the tiny checkpoint, quantising them
  added most of the keypoint drift (export/RESULTS.md).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class QdqRecipe:
    """How the int8 core is quantised for one export target (see the module docstring for why)."""

    name: str
    activations: str  # "uint8" or "int8"
    activation_symmetric: bool
    attention_products: bool  # also quantise MatMuls between two activations (QK^T, PV)
    weights: str = "int8"  # "int8" or "uint8" (u8 x u8 GEMM: no vpmaddubsw saturation without VNNI)
    reduce_range: bool = False  # 7-bit weights: u8 x s7 pairs cannot saturate vpmaddubsw's int16 sums

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8

    def quantize_static_kwargs(self) -> dict[str, Any]:
        """The onnxruntime quantize_static options of this recipe (calibration and nodes aside)."""
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ, "op_types_to_quantize": ["MatMul"], "per_channel": True,
            "activation_type": QuantType.QUInt8 if self.activations == "uint8" else QuantType.QInt8,
            "weight_type": QuantType.QUInt8 if self.weights == "uint8" else QuantType.QInt8,
            "reduce_range": self.reduce_range,
            "extra_options": {
                "ActivationSymmetric": self.activation_symmetric,
                "WeightSymmetric": True,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # weights [K, N]: one scale per output
            },
        }

    def describe(self) -> str:
        act = f"{self.activations} {'symmetric' if self.activation_symmetric else 'asymmetric'} activations"
        what = "linears and attention products" if self.attention_products else "linears only"
        weights = f"{'7-bit ' if self.weight_bits == 7 else ''}{self.weights} per-channel weights"
        return f"onnxruntime quantize_static QDQ, MinMax, {act}, {weights}, {what} ({self.name})"


RECIPES = {
    "gpu": QdqRecipe("tensorrt", activations="int8", activation_symmetric=True, attention_products=True),
    "cpu": QdqRecipe("onnxruntime-x86", activations="uint8", activation_symmetric=False, attention_products=False),
    # CPUs without a u8 x s8 dot-product instruction (AVX2 only): onnxruntime's u8 x s8 GEMM there
    # multiplies with vpmaddubsw, which adds each pair of products into an int16 with saturation
    # (255 * 127 * 2 > 32767). With 7-bit weights a pair stays below it (255 * 64 * 2 = 32640). On an
    # AVX2-only EPYC the 8-bit recipe's task drift at 1.3B was 10-14x the VNNI machines' (depth
    # abs-rel 0.027 against 0.0019, normals 5.3 against 0.38 deg: export/RESULTS.md), past the
    # bounds; perf/int8_recipes.py measures the variants on such a CPU.
    "cpu-no-vnni": QdqRecipe("onnxruntime-x86-7bit", activations="uint8", activation_symmetric=False,
                             attention_products=False, reduce_range=True),
}


def saturates_8bit_weights(cpu: Any = None) -> bool:
    """Whether `cpu` (default: this machine's, thfm_serve.machine.read_cpu) multiplies u8 x s8 without
    a dot-product instruction (no VNNI), so that int8 graphs there need 7-bit weights (see RECIPES)."""
    from thfm_serve.machine import read_cpu

    return (cpu or read_cpu()).int8_weight_bits < 8


def recipe_for(target: Any, cpu: Any = None) -> QdqRecipe:
    """The recipe of a target; for "cpu", the one for `cpu`'s int8 instructions (default: this
    machine's, thfm_serve.machine.read_cpu), the machine that serves what it exports by default."""
    key = getattr(target, "value", target)
    if key not in RECIPES:
        raise ExportError(f"int8: no quantisation recipe for target {key!r} (known: {', '.join(RECIPES)})")
    if key == "cpu" and saturates_8bit_weights(cpu):
        key = "cpu-no-vnni"
    return RECIPES[key]


def matmuls_to_quantize(model: onnx.ModelProto, recipe: QdqRecipe, exclude: Iterable[str]) -> tuple[list[str], list[str]]:
    """(MatMul nodes to quantise, MatMul nodes excluded by module) for `recipe`. Without attention
    products only MatMuls by a weight initializer (the linears) are quantised."""
    skip = set(excluded_nodes(model, exclude, ["MatMul"]))
    candidates = [n for n in model.graph.node if n.op_type == "MatMul"] if recipe.attention_products else weight_matmuls(model)
    return [n.name for n in candidates if n.name not in skip], sorted(skip)


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls by a weight initializer: the traced nn.Linear layers."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]


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


def _quantize_static(what: str, *args: Any, **kwargs: Any) -> None:
    """onnxruntime's quantize_static with its pre-processing hint silenced and its failures (plain
    exceptions for calibration problems) raised as an ExportError that names `what`."""
    from onnxruntime.quantization import quantize_static

    hint_filter = _DropPreprocessHint()
    root = logging.getLogger()
    root.addFilter(hint_filter)
    for handler in root.handlers:
        handler.addFilter(hint_filter)
    try:
        quantize_static(*args, **kwargs)
    except Exception as e:
        raise ExportError(f"{what}: quantize_static failed: {type(e).__name__}: {str(e).splitlines()[0][:400]}") from e
    finally:
        root.removeFilter(hint_filter)
        for handler in root.handlers:
            handler.removeFilter(hint_filter)


class _Reader:
    """onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - unused by MinMax
        pass


def linear_matmuls(model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """ONNX MatMul node -> (torch module path, input tensor, output tensor) for every MatMul by a
    weight initializer whose innermost traced scope names its module (as in ExportCore.named_modules)."""
    out = {}
    for n in weight_matmuls(model):
        scopes = [s for s in node_scopes(n) if "." in s]
        if scopes:
            out[n.name] = (scopes[-1], n.input[0], n.output[0])
    return out


CALIBRATION_DTYPES = ("fp32", "bf16")


def calibration_dtype_for(cpu: Any) -> str:
    """The precision the calibration forwards run in on this CPU: bf16 where it has bf16 matmul
    instructions (AVX512-BF16, AMX), fp32 elsewhere (emulated bf16 is slower than fp32).

    Only the MinMax ranges come from these forwards, and bf16 moves them little: on the tiny
    checkpoint every Linear's range stays within 2 % of fp32's (tests/test_export_tiny.py); on the
    1.3B-shaped core the int8 graph's validation and task drift equal those of fp32 calibration
    within noise (export/RESULTS.md). The int8 graph is then validated against the fp32 PyTorch core,
    as always. On that core the fp32 forwards (4 clips x 6 task rows at 17x256x256) were the largest
    part of an int8 export."""
    return "bf16" if cpu.bf16 else "fp32"


def torch_linear_ranges(module: Any, samples: list[dict[str, np.ndarray]],
                        dtype: str = "fp32") -> dict[str, tuple[float, float, float, float]]:
    """Per nn.Linear of `module` (the fp32 module the ONNX was exported from): (input min, input max,
    pre-bias output min, pre-bias output max) over the samples, from forward hooks; the forwards run
    in `dtype` (bf16: CPU autocast, the module's weights untouched)."""
    import contextlib

    import torch

    if dtype not in CALIBRATION_DTYPES:
        raise ExportError(f"calibration dtype {dtype!r}: choose one of {', '.join(CALIBRATION_DTYPES)}")

    stats: dict[str, list[float]] = {}

    def hook(name: str):
        def fn(mod, args, out):
            x = args[0]
            y = out - mod.bias if mod.bias is not None else out
            vals = [float(x.min()), float(x.max()), float(y.min()), float(y.max())]
            old = stats.get(name)
            stats[name] = vals if old is None else [min(old[0], vals[0]), max(old[1], vals[1]),
                                                   min(old[2], vals[2]), max(old[3], vals[3])]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            for feed in samples:
                module(*(torch.from_numpy(np.ascontiguousarray(feed[k])) for k in ("latent", "text")))
    finally:
        for h in handles:
            h.remove()
    return {k: tuple(v) for k, v in stats.items()}


def hook_calibration_cache(model: onnx.ModelProto, nodes: list[str], module: Any, samples: list[dict[str, np.ndarray]],
                           path: Path, dtype: str = "fp32") -> int:
    """Write an onnxruntime MinMax calibration cache (TensorsData JSON) for the input and output of
    every MatMul in `nodes`, measured by torch_linear_ranges; return how many tensors it covers.
    Fails when a MatMul to quantise has no Linear to measure (its range would be missing)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    matmuls = linear_matmuls(model)
    ranges = torch_linear_ranges(module, samples, dtype)
    missing = [n for n in nodes if n not in matmuls or matmuls[n][0] not in ranges]
    if missing:
        raise ExportError(f"int8: no nn.Linear range for {len(missing)} MatMul(s) to quantise, e.g. {missing[:3]} "
                          "(scopes do not match the module paths)")
    tensors: dict[str, tuple[np.float32, np.float32]] = {}
    for n in nodes:
        path_, x, y = matmuls[n]
        lo_x, hi_x, lo_y, hi_y = ranges[path_]
        if x in tensors:  # one activation feeding several linears (q, k, v): the union of their views
            lo_x, hi_x = min(lo_x, float(tensors[x][0])), max(hi_x, float(tensors[x][1]))
        tensors[x] = (np.float32(lo_x), np.float32(hi_x))
        tensors[y] = (np.float32(lo_y), np.float32(hi_y))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, tensors), path)
    return len(tensors)


def quantize_core(fp32_path: Path, out_path: Path, samples: list[dict[str, np.ndarray]], target: Any,
                  exclude: Iterable[str] = DEFAULT_EXCLUDE, external_data: bool = False,
                  module: Any = None, calibration_dtype: str = "fp32") -> dict[str, Any]:
    """Write the Q/DQ model for `target` ("cpu", "gpu" or a QdqRecipe) to out_path; return what was
    done (for the report). `module`: the fp32 torch module fp32_path was exported from; given, a
    recipe on the linears only is calibrated by forward hooks (see the module docstring), run in
    `calibration_dtype` (calibration_dtype_for)."""
    from onnxruntime.quantization import CalibrationMethod

    recipe = target if isinstance(target, QdqRecipe) else recipe_for(target)
    if not samples:
        raise ExportError("int8: no calibration samples")
    model = onnx.load(str(fp32_path), load_external_data=False)
    nodes, skip = matmuls_to_quantize(model, recipe, exclude)
    use_hooks = module is not None and not recipe.attention_products
    calibration = (f"torch forward hooks on the nn.Linear modules (MinMax, {calibration_dtype} forwards)" if use_hooks
                   else "onnxruntime MinMax calibrator")
    logger.info("int8 (%s): calibrating on %d samples by %s; %d MatMul nodes excluded (%s)", recipe.name, len(samples),
                calibration, len(skip), ", ".join(exclude))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="thfm-calib-") as tmp:
        calib_kwargs: dict[str, Any] = {"calibration_data_reader": _Reader(samples)}
        if use_hooks:
            t0 = time.perf_counter()
            cache = Path(tmp) / "ranges.json"
            hook_calibration_cache(model, nodes, module, samples, cache, calibration_dtype)
            calib_kwargs = {"calibration_data_reader": None, "calibration_cache_path": str(cache)}
            seconds["calibrate_s"] = round(time.perf_counter() - t0, 1)
        del model
        t0 = time.perf_counter()
        _quantize_static(
            "int8", str(fp32_path), str(out_path), nodes_to_quantize=nodes, nodes_to_exclude=skip,
            use_external_data_format=external_data, calibrate_method=CalibrationMethod.MinMax,
            **calib_kwargs, **recipe.quantize_static_kwargs(),
        )
        # Without hooks, onnxruntime's calibrator runs inside quantize_static: both are in this figure.
        seconds["quantize_s"] = round(time.perf_counter() - t0, 1)
    from .onnx_export import onnx_files

    for f in onnx_files(out_path):
        # The quantizer writes external data through a private temporary file (mode 0600); a server
        # running as another user than the exporter must be able to read the weights.
        f.chmod(f.stat().st_mode | 0o444)
    stats = qdq_stats(out_path)
    if stats["quantized_matmuls"] == 0:
        raise ExportError(f"int8: {out_path.name} has no quantized MatMul (Q/DQ insertion failed): {stats}")
    stats.update({"excluded_scopes": list(exclude), "excluded_nodes": len(skip), "calibration_samples": len(samples),
                  "recipe": recipe.name, "method": recipe.describe(), "calibration": calibration,
                  "weight_bits": recipe.weight_bits,
                  "calibration_dtype": calibration_dtype if use_hooks else "fp32", **seconds})
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


# --- the int8 Wan VAE (--vae-precision int8, --target cpu) -------------------------------------
#
# The Wan VAE (diffusers AutoencoderKLWan) is causal 3D convolutions, RMS norms, SiLU and one
# attention per mid block; the convolutions carry nearly all of its work. Q/DQ goes on the Conv ops
# only, in the form onnxruntime's CPU provider fuses (DQ(x), DQ(w) -> Conv -> Q  =>  QLinearConv):
# int8 weights, symmetric, one scale per output channel (axis 0 of a Conv weight), and uint8
# asymmetric activations (VNNI's u8 x s8 order, as the core's CPU recipe). Does onnxruntime's int8
# conv cover the 3D convolutions? Yes, as read from the optimised graph (qlinear_conv_counts): with
# ORT_ENABLE_ALL, onnxruntime 1.32 rewrites every 3D Conv of the Q/DQ graph (kernels 3x3x3 and
# 1x1x1) and the 2D ones of the resampling layers into com.microsoft QLinearConv in channels-last
# layout, with Transposes at the layout boundaries; none is left as DequantizeLinear -> float Conv.
# Calibration is onnxruntime's MinMax calibrator (the VAE has no Linear layers for the core's hook
# calibration). Its augmented graph returns each calibrated tensor's ReduceMin/ReduceMax, not the
# tensor, so what it keeps per sample is two scalars a tensor. It runs one row per call and in
# priority order (single_rows, minmax_cache): a Wan2.1-1.3B-shaped decoder sample at 17x256x256 (a
# latent and four dense rows) in one call, in the calibrator's default session, had the process
# killed by the OOM killer on a 24 GB machine. (CalibMaxIntermediateOutputs is not used: in
# onnxruntime 1.32 it drops the collected ranges instead of merging them.)

VAE_OP_TYPES = ("Conv",)

# The decoder's float tail. Dense pose writes the part index as I/24 in one channel, so an error of
# 1/48 flips a part; through int8 activations all the way to the pixels, a trained small decoder kept
# 73% of the parts and a Wan2.1-1.3B-shaped one 78% (export/RESULTS.md). The error that matters is
# added where the maps are at full resolution: the last up block and conv_out, which stay float.
# (Found by weight name, diffusers' AutoencoderKLWan layout: decoder.up_blocks.<i>, decoder.conv_out.)
DECODER_UP_BLOCK = re.compile(r"(?:^|\.)decoder\.up_blocks\.(\d+)\.")
DECODER_CONV_OUT = re.compile(r"(?:^|\.)decoder\.conv_out\.")


def decoder_tail_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes of the decoder's last up block and of its conv_out (by their weights'
    names); empty for a graph without a decoder (the encoder)."""
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1]
    blocks = {n.name: int(m.group(1)) for n in convs if (m := DECODER_UP_BLOCK.search(n.input[1]))}
    last = max(blocks.values(), default=None)
    return [n.name for n in convs
            if DECODER_CONV_OUT.search(n.input[1]) or (last is not None and blocks.get(n.name) == last)]


@dataclass(frozen=True)
class VaeQdqRecipe:
    """How the VAE graphs are quantised for onnxruntime on CPU (see the section comment above)."""

    name: str = "onnxruntime-x86-conv-float-tail"
    op_types: tuple[str, ...] = VAE_OP_TYPES
    float_tail: bool = True  # the decoder's last up block and conv_out stay float (decoder_tail_convs)
    reduce_range: bool = False  # 7-bit weights, for CPUs without VNNI (as the core's "cpu-no-vnni")

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8

    def float_convs(self, model: onnx.ModelProto) -> list[str]:
        """The Convs this recipe leaves in float in `model`."""
        return decoder_tail_convs(model) if self.float_tail else []

    def quantize_static_kwargs(self) -> dict[str, Any]:
        from onnxruntime.quantization import QuantFormat, QuantType

        return {
            "quant_format": QuantFormat.QDQ, "op_types_to_quantize": list(self.op_types), "per_channel": True,
            "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": self.reduce_range,
            "extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True},
        }

    def describe(self) -> str:
        tail = ", the decoder's last up block and conv_out in float" if self.float_tail else ""
        bits = "7-bit " if self.weight_bits == 7 else ""
        return (f"onnxruntime quantize_static QDQ, MinMax, uint8 asymmetric activations, {bits}int8 symmetric per-channel "
                f"weights, {'/'.join(self.op_types)} only{tail} ({self.name})")


VAE_RECIPE = VaeQdqRecipe()
# QLinearConv runs on the same u8 x s8 GEMM kernels as the core's linears: without VNNI its 8-bit
# weights saturate them too (the tiny checkpoint's int8 decoder failed its export validation on an
# AVX2-only EPYC, maps max abs 0.18-0.26 against atol 0.1).
VAE_RECIPE_NO_VNNI = VaeQdqRecipe(name="onnxruntime-x86-conv-float-tail-7bit", reduce_range=True)


def vae_recipe_for(cpu: Any = None) -> VaeQdqRecipe:
    """The int8 VAE recipe for `cpu` (default: this machine's), as recipe_for for the core."""
    return VAE_RECIPE_NO_VNNI if saturates_8bit_weights(cpu) else VAE_RECIPE


def quantize_vae(fp32_path: Path, out_path: Path, samples: list[dict[str, np.ndarray]],
                 recipe: VaeQdqRecipe | None = None) -> dict[str, Any]:
    """Write the int8 Q/DQ VAE graph (encoder or decoder) to out_path, calibrated on `samples` (input
    feeds from the distribution the graph serves); check its structure (fatal) and return the report."""
    from onnxruntime.quantization import CalibrationMethod

    if not samples:
        raise ExportError("int8 VAE: no calibration samples")
    recipe = recipe or vae_recipe_for()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = single_rows(samples)
    logger.info("int8 VAE (%s): calibrating %s on %d samples (%d rows, one per run)", recipe.name,
                fp32_path.parent.name, len(samples), len(rows))
    keep_float = recipe.float_convs(onnx.load(str(fp32_path), load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="thfm-vae-calib-") as tmp:
        cache = Path(tmp) / "ranges.json"
        minmax_cache(fp32_path, rows, recipe.op_types, cache)
        _quantize_static("int8 VAE", str(fp32_path), str(out_path), calibration_data_reader=None,
                         calibration_cache_path=str(cache), calibrate_method=CalibrationMethod.MinMax,
                         nodes_to_exclude=keep_float, **recipe.quantize_static_kwargs())
    out_path.chmod(out_path.stat().st_mode | 0o444)
    stats = check_conv_qdq(onnx.load(str(out_path)), keep_float)
    stats["onnxruntime_optimised"] = check_qlinear_conv(out_path, stats["quantized_convs"], len(keep_float))
    stats.update({"calibration_samples": len(samples), "calibration_rows": len(rows), "recipe": recipe.name,
                  "weight_bits": recipe.weight_bits,
                  "method": recipe.describe()})
    return stats


def minmax_cache(fp32_path: Path, rows: list[dict[str, np.ndarray]], op_types: Iterable[str], cache: Path) -> int:
    """Write onnxruntime's MinMax ranges of the inputs and outputs of `op_types` over `rows` as a
    calibration cache (TensorsData JSON) for quantize_static; return how many tensors it covers.

    This is onnxruntime's own calibrator (its augmented graph, its range arithmetic) run in a session
    whose nodes execute in priority order. The augmented graph reads every calibrated tensor a second
    time, by a ReduceMin/ReduceMax; in the default order those run late and keep their tensors alive
    meanwhile: one Wan2.1-1.3B decoder row at 17x256x256 peaked at 14.2 GB that way and at 3.2 GB in
    priority order (2.4 GB for the plain decoder), and took 140 s against 56 s (AMX Xeon, 2 threads)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="thfm-calib-") as tmp:
        calibrator = create_calibrator(Path(fp32_path), list(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the calibrator's own
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_cpu_mem_arena = False
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        try:
            calibrator.collect_data(_Reader(rows))
            tensors = calibrator.compute_data()
        except Exception as e:
            raise ExportError(f"int8 VAE: calibration failed: {type(e).__name__}: {str(e).splitlines()[0][:400]}") from e
        del calibrator
    save_tensors_data(tensors, cache)
    return len(tensors.data)


def single_rows(samples: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each sample's batch split into one-row feeds: MinMax over the rows is MinMax over the batch, at
    one row's memory per run (see the section comment)."""
    out = []
    for s in samples:
        batch = {len(v) for v in s.values()}
        if len(batch) != 1:
            raise ExportError(f"int8 VAE: a calibration sample's inputs disagree on the batch: "
                              f"{ {k: list(v.shape) for k, v in s.items()} }")
        out += [{k: v[i : i + 1] for k, v in s.items()} for i in range(batch.pop())]
    return out


def check_conv_qdq(model: onnx.ModelProto, float_convs: Iterable[str] = ()) -> dict[str, int]:
    """Every Conv of `model` but `float_convs` reads a dequantised activation and a dequantised int8
    weight with one symmetric scale per output channel, and its output is quantised again (uint8): the
    pattern onnxruntime fuses into QLinearConv; the `float_convs` read a float weight. ExportError
    naming the first offenders otherwise (an unquantised graph fails here)."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    if not convs:
        raise ExportError("int8 VAE: the graph has no Conv to quantise")
    keep_float = set(float_convs)
    if missing := keep_float - {n.name for n in convs}:
        raise ExportError(f"int8 VAE: Conv(s) to keep float are not in the graph: {sorted(missing)[:3]}")
    problems = []
    for n in convs:
        x, w = (producer.get(n.input[i]) for i in (0, 1))
        why = None
        if n.name in keep_float:
            if n.input[1] not in inits or inits[n.input[1]].data_type != onnx.TensorProto.FLOAT:
                why = "it should stay float but its weight is not a float initializer"
        elif x is None or x.op_type != "DequantizeLinear":
            why = "its input is not dequantised"
        elif w is None or w.op_type != "DequantizeLinear" or w.input[0] not in inits:
            why = "its weight is not a dequantised initializer"
        else:
            q, scale = inits[w.input[0]], inits.get(w.input[1])
            out_channels = q.dims[0]
            axis = next((a.i for a in w.attribute if a.name == "axis"), 1)
            if q.data_type != onnx.TensorProto.INT8:
                why = f"its weight is {onnx.TensorProto.DataType.Name(q.data_type)}, not INT8"
            elif scale is None or int(np.prod(scale.dims)) != out_channels or axis != 0:
                why = "its weight is not quantised per output channel"
            elif len(w.input) > 2 and w.input[2] in inits and onnx.numpy_helper.to_array(inits[w.input[2]]).any():
                why = "its weight zero point is not 0 (not symmetric)"
            elif x.input[0] not in producer or producer[x.input[0]].op_type != "QuantizeLinear":
                why = "its input is not quantised"
            elif not any(c.op_type == "QuantizeLinear" for c in consumers.get(n.output[0], [])):
                why = "its output is not quantised"
        if why:
            problems.append(f"{n.name} ({why})")
    if problems:
        raise ExportError(f"int8 VAE: {len(problems)} of {len(convs)} Conv(s) lack the Q/DQ onnxruntime fuses into "
                          f"QLinearConv, e.g. {'; '.join(problems[:3])}")
    ops = [n.op_type for n in model.graph.node]
    return {"convs": len(convs), "quantized_convs": len(convs) - len(keep_float), "float_convs": len(keep_float),
            "quantize_linear": ops.count("QuantizeLinear"),
            "dequantize_linear": ops.count("DequantizeLinear"),
            "int8_initializers": sum(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)}


def qlinear_conv_counts(path: Path) -> dict[str, int]:
    """The graph as onnxruntime's CPU provider runs it (ORT_ENABLE_ALL, as serving.sessions does):
    QLinearConv by kernel rank ("qlinear_conv_2d", "qlinear_conv_3d"), and the float Convs left."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="thfm-ortopt-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        opts.intra_op_num_threads = 1
        # The optimised file is written when the session is created; nothing is run.
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        model = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    out = {"qlinear_conv_2d": 0, "qlinear_conv_3d": 0, "float_conv": 0}
    for n in model.graph.node:
        if n.op_type == "QLinearConv":
            shape = next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), [])
            out[f"qlinear_conv_{3 if len(shape) == 3 else 2}d"] += 1
        elif n.op_type in ("Conv", "FusedConv", "NchwcConv"):
            out["float_conv"] += 1
    return out


def check_qlinear_conv(path: Path, convs: int, float_convs: int = 0) -> dict[str, int]:
    """Fatal unless onnxruntime turns every quantised Conv into QLinearConv and leaves only the
    recipe's `float_convs` in float: a Q/DQ Conv it leaves in float would run the fp32 kernel with a
    dequantisation per call, slower than fp32."""
    counts = qlinear_conv_counts(path)
    fused = counts["qlinear_conv_2d"] + counts["qlinear_conv_3d"]
    if fused < convs or counts["float_conv"] > float_convs:
        raise ExportError(f"int8 VAE: onnxruntime fused {fused} of {convs} quantised Conv(s) into QLinearConv "
                          f"({counts}); the int8 conv kernels would not run")
    return counts
