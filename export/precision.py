"""The PyTorch modules each precision exports, and which precision runs where.

Every exported module takes and returns float32 (specs.py: interface dtypes never change), so a
low-precision graph casts on the way in and out.

fp16 also keeps the residual stream (the hidden states between and through the blocks) in fp32:
Wan's activations overflow fp16 there (see _residual_fp32); bf16 has fp32's range and needs no such
island, which is one reason bf16 is the GPU default (DEFAULT_PRECISION).

fp16/bf16 keep fp32 islands:
- diffusers' ``WanTransformer3DModel._keep_in_fp32_modules`` (rope, time_embedder, scale_shift_table,
  norm1/2/3): Wan in plain fp16 is known to overflow in these; diffusers' own code already upcasts
  around them (FP32LayerNorm, ``.float()`` before the modulation), so they only need fp32 weights;
- the patch embedding (diffusers' ``_skip_layerwise_casting_patterns`` and TensorRT Model Optimizer's
  quantisation skip list; it is one small Conv3d on the raw latent). Keeping it fp32 also keeps the
  graph valid ONNX at opset 20, where Conv has no bfloat16 type;
- THFM's keypoint heads (LayerNorm + 2-layer MLP on 1 token per frame: negligible cost, and they
  produce the numbers users read directly).
The rotary tables are built in float64 by diffusers; they are cast to float32 before export (the
core applies ``.float()`` to them anyway, so values are unchanged) and export fails on any double.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from thfm_serve.errors import ThfmError

from thfm_serve.contract.specs import OPENVINO_CORE_PRECISIONS, Precision, Runtime, Target

logger = logging.getLogger(__name__)

TORCH_DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16,
                # int8/fp8 quantise the fp32 graph (Q/DQ in ONNX); the PyTorch module is the fp32 one.
                Precision.INT8: torch.float32, Precision.FP8: torch.float32}
QUANTIZED = (Precision.INT8, Precision.FP8)

# Measured here (onnxruntime 1.32 CPU): fp16 graphs run. bf16 graphs are valid ONNX but the CPU
# provider has no bfloat16 kernels for them ("Could not find an implementation for Expand(13)";
# with a bf16 patch embedding, for Conv(22)), so a bf16 model cannot be served on --target cpu.
# TensorRT builds bf16 engines (Ampere and newer), so bf16 is a gpu precision.
SUPPORTED = {
    Target.CPU: (Precision.FP32, Precision.FP16, Precision.INT8),
    Target.GPU: (Precision.FP32, Precision.BF16, Precision.FP16, Precision.INT8, Precision.FP8),
}
# Wan was trained in bf16 and fp16 overflows in its residual stream (see lowered_core); NVIDIA's own
# Wan TensorRT pipeline builds the transformer in bf16. The CPU default depends on the CPU's
# instruction sets and is chosen by thfm_serve.machine.cpu_recipe (never bf16: no kernels).
DEFAULT_PRECISION = {Target.GPU: Precision.BF16}


def default_precision(target: Target) -> tuple[Precision, str]:
    """(precision, why) when --precision is not given: the GPU's fixed default, or for the CPU the
    recipe for the machine this runs on (the machine that serves what it exports, by default)."""
    if target == Target.CPU:
        from thfm_serve.machine import cpu_recipe, read_cpu

        recipe = cpu_recipe(read_cpu())
        return Precision(recipe.precision), f"machine class {recipe.machine_class}: {recipe.reason}"
    return DEFAULT_PRECISION[target], f"the {target.value} target's default"


def default_vae_precision(target: Target) -> tuple[Precision, str]:
    """(VAE precision, why) when --vae-precision is not given: fp32 on gpu; on cpu the VAE recipe for
    this machine's instruction sets (thfm_serve.machine.cpu_vae_recipe: bf16 with bf16 instructions)."""
    if target == Target.CPU:
        from thfm_serve.machine import cpu_vae_recipe, read_cpu

        recipe = cpu_vae_recipe(read_cpu())
        return Precision(recipe.precision), f"machine class {recipe.machine_class}: {recipe.reason}"
    return Precision.FP32, f"the {target.value} target keeps the VAE fp32"


def default_core_runtime(target: Target, precision: Precision) -> tuple[Runtime, str]:
    """(core runtime, why) when --core-runtime is not given: on cpu this machine's choice for the
    precision (thfm_serve.machine.cpu_core_runtime), onnxruntime where OpenVINO is not installed; the gpu
    target's core is a TensorRT engine, and its spec says onnxruntime (the ONNX it is built from)."""
    if target != Target.CPU:
        return Runtime.ONNXRUNTIME, f"the {target.value} target's core is a TensorRT engine"
    from thfm_serve.machine import cpu_core_runtime, read_cpu
    from thfm_serve.serving.sessions import openvino_missing

    runtime, why = cpu_core_runtime(read_cpu(), precision.value)
    if runtime == Runtime.OPENVINO.value and openvino_missing():
        return Runtime.ONNXRUNTIME, f"{why}; but OpenVINO is not installed, so onnxruntime"
    return Runtime(runtime), why


def _require_openvino() -> None:
    """A ThfmError naming what to install or choose instead when OpenVINO cannot run here."""
    from thfm_serve.serving.sessions import openvino_missing

    missing = openvino_missing()
    if missing:
        raise ThfmError(missing)


def check_core_runtime(target: Target, precision: Precision, runtime: Runtime) -> None:
    """--core-runtime openvino: the cpu target, an int8 or fp32 core (contract.specs.OPENVINO_CORE_PRECISIONS),
    and OpenVINO installed."""
    if runtime != Runtime.OPENVINO:
        return
    if target != Target.CPU:
        raise ThfmError(f"--core-runtime openvino is for --target cpu; --target {target.value} builds a TensorRT engine "
                        "for the core")
    if precision not in OPENVINO_CORE_PRECISIONS:
        raise ThfmError(f"--core-runtime openvino runs an int8 or fp32 core (OpenVINO lowers the int8 one's float part "
                        f"to bf16 where the CPU has bf16 instructions); got --precision {precision.value}: use "
                        "--core-runtime onnxruntime")
    _require_openvino()


def default_vae_runtime(target: Target, vae_precision: Precision) -> tuple[Runtime, str]:
    """(VAE runtime, why) when --vae-runtime is not given: on cpu this machine's choice for the VAE
    precision (thfm_serve.machine.cpu_vae_runtime), onnxruntime for an fp32 VAE where OpenVINO is not
    installed; the gpu target's VAE runs in Triton's onnxruntime backend."""
    if target != Target.CPU:
        return Runtime.ONNXRUNTIME, f"the {target.value} target serves the VAE through Triton's onnxruntime backend"
    from thfm_serve.machine import cpu_vae_runtime, read_cpu
    from thfm_serve.serving.sessions import openvino_missing

    runtime, why = cpu_vae_runtime(read_cpu(), vae_precision.value)
    if runtime == Runtime.OPENVINO.value and vae_precision == Precision.FP32 and openvino_missing():
        return Runtime.ONNXRUNTIME, f"{why}; but OpenVINO is not installed, so onnxruntime"
    return Runtime(runtime), why


def check_vae_runtime(target: Target, vae_precision: Precision, runtime: Runtime) -> None:
    """--vae-runtime: a bf16 VAE runs only in OpenVINO (onnxruntime has no bf16 kernels) and an int8 one
    only in onnxruntime (its Q/DQ placement is onnxruntime's conv recipe); openvino is for --target cpu
    and needs OpenVINO installed."""
    if vae_precision == Precision.BF16 and runtime != Runtime.OPENVINO:
        raise ThfmError("--vae-precision bf16 runs in OpenVINO (onnxruntime's CPU provider has no bf16 kernels): "
                        "drop --vae-runtime onnxruntime or use --vae-precision fp32")
    if runtime != Runtime.OPENVINO:
        return
    if target != Target.CPU:
        raise ThfmError(f"--vae-runtime openvino is for --target cpu; --target {target.value} serves the VAE through "
                        "Triton's onnxruntime backend")
    if vae_precision == Precision.INT8:
        raise ThfmError("--vae-precision int8 runs in onnxruntime (its Q/DQ placement is onnxruntime's int8 convolution "
                        "recipe): use --vae-runtime onnxruntime, or --vae-precision fp32 with --vae-runtime openvino")
    _require_openvino()


def check_target_precision(target: Target, precision: Precision) -> None:
    if precision == Precision.FP8 and target != Target.GPU:
        raise ThfmError("--precision fp8 cannot run on --target cpu: fp8 Q/DQ graphs need a GPU with fp8 tensor "
                        "cores (Hopper, Ada or newer) through TensorRT; use --target gpu")
    if precision not in SUPPORTED[target]:
        raise ThfmError(
            f"--precision {precision.value} cannot run on --target {target.value}: onnxruntime's CPU provider "
            "has no bfloat16 kernels, so Triton could not serve it on CPU. Use fp32, fp16 or int8 "
            "on cpu, or --target gpu (TensorRT builds bf16 engines; add --no-engine to only write the ONNX)"
        )


def check_target_vae_precision(target: Target, vae_precision: Precision, cpu=None) -> None:
    """--vae-precision int8 is a recipe for onnxruntime's CPU int8 conv kernels (quantize.VAE_RECIPE),
    bf16 the fp32 graph run by OpenVINO's CPU plugin in bf16; the GPU repository serves the VAE through
    Triton's onnxruntime backend on the GPU, for which neither was built or measured. bf16 is refused
    on a CPU without bf16 instructions: the export validates what it writes on this machine, and
    emulated bf16 is slower than fp32 (the serving side falls back to f32 on such a CPU)."""
    if vae_precision != Precision.FP32 and target != Target.CPU:
        raise ThfmError(f"--vae-precision {vae_precision.value} is for --target cpu only (onnxruntime's CPU int8 "
                        f"convolutions, OpenVINO's CPU bf16 ones); --target {target.value} keeps the VAE fp32")
    if vae_precision == Precision.BF16:
        from thfm_serve.machine import read_cpu

        cpu = cpu or read_cpu()
        if not cpu.bf16:
            raise ThfmError(f"--vae-precision bf16 needs a CPU with bf16 instructions (avx512_bf16 or amx_bf16); this one "
                            f"is {cpu.machine_class}, where bf16 is emulated and slower than fp32: use fp32 or int8")
        _require_openvino()


def wan_fp32_modules() -> tuple[str, ...]:
    from diffusers import WanTransformer3DModel

    return tuple(WanTransformer3DModel._keep_in_fp32_modules or ())


def rope_to_float32(core: nn.Module) -> None:
    """Cast Wan's float64 rotary tables to float32 in place.

    Value-preserving: ThfmCore only slices/expands these tables and calls ``.float()`` on the result,
    so rounding once up front gives the same float32 values, and no double reaches the graph.
    """
    rope = core.transformer.rope
    for name in ("freqs_cos", "freqs_sin"):
        buf = getattr(rope, name, None)
        if buf is not None and buf.dtype == torch.float64:
            setattr(rope, name, buf.float())


class _Cast:
    """Forward (pre-)hook that casts floating tensors to a dtype (picklable, unlike a lambda)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def _cast(self, x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.to(self.dtype)
        if isinstance(x, tuple):
            return tuple(self._cast(v) for v in x)
        return x

    def pre(self, module, args):
        return self._cast(args)

    def post(self, module, args, output):
        return self._cast(output)


class _CastFirst:
    """Forward pre-hook casting only the first positional argument (the hidden states): an
    attention's rotary tables and context keep their own dtypes."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            return (args[0].to(self.dtype), *args[1:])
        return args


def _residual_fp32(low: nn.Module, dtype: torch.dtype) -> None:
    """Keep the residual stream between (and through) the blocks in fp32; only the attention and
    feed-forward sub-layers compute in `dtype`.

    Wan's hidden states grow past fp16's 65,504 in the residual stream, which diffusers'
    ``WanTransformerBlock`` adds in fp32 (``hidden_states.float() + ...``) but then casts back with
    ``.type_as(hidden_states)``. With fp32 hidden states entering the blocks that cast keeps fp32,
    so the sum never rounds to fp16; each sub-layer casts its input down and its output back up.
    """
    tr = low.transformer
    for block in tr.blocks:
        for sub in (block.attn1, block.attn2, block.ffn):
            sub.register_forward_pre_hook(_CastFirst(dtype))
            sub.register_forward_hook(_Cast(torch.float32).post)
    # The output norm keeps the fp32 type too; its projection computes in `dtype`.
    tr.proj_out.register_forward_pre_hook(_CastFirst(dtype))


def _keep_fp32(module: nn.Module, out_dtype: torch.dtype) -> None:
    """Make `module` an fp32 island: fp32 weights, inputs cast up, outputs cast to `out_dtype`."""
    module.float()
    module.register_forward_pre_hook(_Cast(torch.float32).pre)
    module.register_forward_hook(_Cast(out_dtype).post)


class ExportCore(nn.Module):
    """ThfmCore with the float32 interface: inputs cast to the compute dtype, outputs back to float32."""

    def __init__(self, core: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.core = core
        self.dtype = dtype

    def forward(self, latent: torch.Tensor, text: torch.Tensor):
        # latent stays float32: it enters through the fp32 patch embedding.
        pred, kp2d, kp3d = self.core(latent, text.to(self.dtype))
        return pred.float(), kp2d.float(), kp3d.float()


def lowered_core(core: nn.Module, precision: Precision) -> nn.Module:
    """The module exported for `precision`. fp32/int8: the core itself (float64 rope cast away);
    fp16/bf16: a copy in that dtype with the fp32 islands above."""
    rope_to_float32(core)
    dtype = TORCH_DTYPES[precision]
    if dtype == torch.float32:
        return ExportCore(core, torch.float32).eval()
    islands = set(wan_fp32_modules())
    low = copy.deepcopy(core)
    for name, tensor in list(low.named_parameters()) + list(low.named_buffers()):
        if not tensor.is_floating_point():
            continue
        keep = bool(islands & set(name.split(".")))
        tensor.data = tensor.data.to(torch.float32 if keep else dtype)
    residual_fp32 = precision == Precision.FP16
    # fp16: the patch embedding hands fp32 tokens to the fp32 residual stream (_residual_fp32).
    _keep_fp32(low.transformer.patch_embedding, torch.float32 if residual_fp32 else dtype)
    for head in (low.heads.head2d, low.heads.head3d):
        _keep_fp32(head, torch.float32)
    if residual_fp32:
        _residual_fp32(low, dtype)
    logger.info("core in %s with fp32 islands: %s, patch_embedding, keypoint heads%s", precision.value,
                ", ".join(sorted(islands)), ", the residual stream" if residual_fp32 else "")
    return ExportCore(low, dtype).eval()


def precision_summary(module: nn.Module) -> dict[str, int]:
    """Parameter count per dtype (for the report)."""
    out: dict[str, int] = {}
    for p in module.parameters():
        key = str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.numel()
    return out
