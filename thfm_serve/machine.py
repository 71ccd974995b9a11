"""The CPU this runs on: its instruction sets, its machine class, and the CPU recipe that fits it.

Ratios between engines and precisions depend on the CPU class (docs: on an AVX2-only EPYC the int8
core was 1.59x fp32, on AVX-512 VNNI machines about 4x; PyTorch bf16 was 6.6x *slower* than fp32
where bf16 is emulated), so every measurement records the class and `thfm export --target cpu`
chooses its precision from it. Torch-free: reads /proc/cpuinfo only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")

# Linux's names (arch/x86/include/asm/cpufeatures.h) of the instruction sets that pick kernels here.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_bf16", "amx_int8", "amx_tile")


@dataclass(frozen=True)
class CpuFeatures:
    """What /proc/cpuinfo says about the first processor (all processors of one machine agree)."""

    model: str
    vendor: str
    flags: frozenset[str]

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def isa(self) -> dict[str, bool]:
        return {f: f in self.flags for f in ISA_FLAGS}

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (AVX-512 BF16 dot products or AMX-BF16 tiles); without it PyTorch
        emulates bf16 through fp32 and is several times slower than fp32."""
        return self.has("avx512_bf16") or (self.has("amx_bf16") and self.has("amx_tile"))

    @property
    def int8_dot(self) -> bool:
        """A u8 x s8 dot-product instruction (VNNI in AVX-512 or AVX, or AMX-INT8): onnxruntime's int8
        GEMM then accumulates without the saturating 16-bit step of AVX2's vpmaddubsw."""
        return self.has("avx512_vnni") or self.has("avx_vnni") or (self.has("amx_int8") and self.has("amx_tile"))

    @property
    def int8_weight_bits(self) -> int:
        """The widest int8 weights onnxruntime multiplies exactly here: 8 with a dot-product instruction,
        7 without (255 x 127 x 2 overflows vpmaddubsw's int16 pair sums; 255 x 64 x 2 does not). The
        exporter quantises to it and serving warns about graphs wider than it."""
        return 8 if self.int8_dot else 7

    @property
    def machine_class(self) -> str:
        """A short name for the kernel class: amx, avx512-vnni-bf16, avx512-vnni, avx512, avx2-vnni,
        avx2-fma, or baseline (no AVX2)."""
        if self.has("amx_tile") and (self.has("amx_bf16") or self.has("amx_int8")):
            return "amx"
        if self.has("avx512f"):
            if self.has("avx512_vnni"):
                return "avx512-vnni-bf16" if self.has("avx512_bf16") else "avx512-vnni"
            return "avx512"
        if self.has("avx2"):
            return "avx2-vnni" if self.has("avx_vnni") else ("avx2-fma" if self.has("fma") else "avx2")
        return "baseline"

    def describe(self) -> str:
        """One line for result tables: class, model and the instruction sets present."""
        present = ", ".join(f for f, on in self.isa.items() if on) or "none of " + ", ".join(ISA_FLAGS)
        return f"{self.machine_class} ({self.model or 'unknown CPU'}; {present})"

    def to_dict(self) -> dict[str, object]:
        return {"class": self.machine_class, "model": self.model, "vendor": self.vendor, "isa": self.isa,
                "bf16": self.bf16, "int8_dot": self.int8_dot}


def parse_cpuinfo(text: str) -> CpuFeatures:
    """CpuFeatures from the text of /proc/cpuinfo (the first processor's block)."""
    model = vendor = ""
    flags: frozenset[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.split())
    return CpuFeatures(model=model, vendor=vendor, flags=flags or frozenset())


def read_cpu(path: Path | str | None = None) -> CpuFeatures:
    """This machine's CpuFeatures; an unreadable cpuinfo (not Linux) gives no flags, i.e. "baseline",
    which chooses only what runs everywhere. path: default CPUINFO."""
    path = Path(path) if path is not None else CPUINFO
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError as e:
        logger.warning("cannot read %s (%s): assuming a CPU without AVX2, AVX-512 or AMX", path, e)
        return CpuFeatures(model="", vendor="", flags=frozenset())


@dataclass(frozen=True)
class CpuRecipe:
    """The core precision `--target cpu` exports when none is given, and why."""

    precision: str  # a Precision value (contract.specs); never bf16 (no onnxruntime CPU kernels)
    reason: str
    machine_class: str


def cpu_recipe(cpu: CpuFeatures) -> CpuRecipe:
    """The fastest recipe that is correct on `cpu` for the served path (onnxruntime's CPU provider;
    cpu_core_runtime says where OpenVINO runs the int8 core instead).

    - bf16 is never chosen: onnxruntime's CPU provider has no bf16 kernels (export/precision.py), and
      where the CPU has no bf16 instructions even PyTorch emulates it, slower than fp32.
    - int8 (Q/DQ linears, validated fatally against fp32 at export) wherever onnxruntime has int8
      GEMM kernels, i.e. AVX2 and up: measured faster than fp32 on every class seen (1.4-1.6x on an
      AVX2-only EPYC, about 4x with AVX-512 VNNI). Without VNNI the export quantises the weights to
      7 bits (export/quantize.py recipe_for), which keeps AVX2's int8 GEMM from saturating.
    - fp32 below AVX2, where onnxruntime's int8 path has no vector kernels to gain from.
    """
    cls = cpu.machine_class
    if cpu.has("avx2"):
        if cpu.int8_dot:
            why = "a u8 x s8 dot-product instruction (" + ", ".join(
                f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if cpu.has(f)) + ") runs onnxruntime's int8 GEMM natively"
        else:
            why = ("AVX2 int8 GEMM (vpmaddubsw) measured 1.4-1.6x faster than fp32 on an AVX2-only EPYC; no VNNI, "
                   "so the weights are 7-bit (vpmaddubsw's int16 pair sums saturate with 8-bit ones)")
        return CpuRecipe("int8", f"int8 Q/DQ linears: {why}; bf16 not considered (no onnxruntime CPU kernels)", cls)
    return CpuRecipe("fp32", "fp32: no AVX2, so onnxruntime has no vector int8 GEMM to gain from; "
                     "bf16 not considered (no onnxruntime CPU kernels)", cls)


def cpu_vae_recipe(cpu: CpuFeatures) -> CpuRecipe:
    """The VAE precision `thfm export --target cpu` writes when --vae-precision is not given.

    - bf16 where the CPU has bf16 instructions: the fp32 graph run by OpenVINO's CPU plugin in bf16
      (serving.sessions). On the AVX-512 BF16 EPYC class the served Wan2.1 VAE then ran at 107-108%
      of the bf16 matmul peak (the fp32 onnxruntime one at 63-74% of the fp32 peak, half as high),
      and the 1.3B-shaped request end to end at 2.68x the PyTorch pipeline (1.46x with the fp32 VAE),
      its task drift far inside the export's bounds (perf/README.md, export/RESULTS.md). The export
      still checks those bounds, fatally.
    - fp32 elsewhere: without bf16 instructions bf16 is emulated, slower than fp32, and refused; the
      int8 VAE stays an explicit choice (its dense pose drift failed the bound on the Wan2.1 shape's
      random weights and its validation on the trained small checkpoint).
    """
    if cpu.bf16:
        return CpuRecipe("bf16", "bf16 VAE in OpenVINO: the CPU has bf16 instructions (" + ", ".join(
            f for f in ("amx_bf16", "avx512_bf16") if cpu.has(f)) + ")", cpu.machine_class)
    return CpuRecipe("fp32", "fp32 VAE: no bf16 instructions (bf16 would be emulated, slower than fp32); int8 only "
                     "when asked for", cpu.machine_class)


# Machine classes where OpenVINO's f32 convolutions ran the fp32 Wan VAE faster than onnxruntime's, with
# the same values, the 1.3B shape at 17x256x256 on 2 threads: AVX2-only EPYC, encoder 99.9 -> 78.8 s
# (1.27x), decoder row 184.2 -> 153.6 s (1.20x; 213.9 -> 186.2 s, 1.15x, in another hour), max abs
# difference 5e-6 (README, --vae-runtime and the AVX2 benchmark);
# AVX-512 VNNI/BF16 EPYC, encoder 34.0 -> 26.1 s, decoder row 58.2 -> 44.7 s (1.30x each), 4e-6
# (export/RESULTS.md); Xeon with AMX, encoder 25.0 -> 17.6 s (1.42x), decoder row 40.8 -> 29.8 s
# (1.37x), 5e-6 (perf/runtimes.py, README). On the last two the default VAE is bf16, so this is for
# --vae-precision fp32. Classes not measured keep onnxruntime.
OPENVINO_FP32_VAE_CLASSES = ("avx2-fma", "avx512-vnni-bf16", "amx")


def cpu_vae_runtime(cpu: CpuFeatures, precision: str) -> tuple[str, str]:
    """(runtime, why): what runs the VAE graphs when `thfm export --target cpu` is given no --vae-runtime.

    - openvino for a bf16 VAE, always: onnxruntime's CPU provider has no bf16 kernels;
    - onnxruntime for an int8 VAE: its Q/DQ placement is onnxruntime's int8 convolution recipe
      (export/quantize.py VAE_RECIPE), not measured in OpenVINO;
    - openvino (f32 inference precision) for an fp32 VAE on the classes in OPENVINO_FP32_VAE_CLASSES,
      onnxruntime elsewhere.
    """
    if precision == "bf16":
        return "openvino", "a bf16 VAE runs in OpenVINO (onnxruntime's CPU provider has no bf16 kernels)"
    if precision == "int8":
        return "onnxruntime", "the int8 VAE's Q/DQ placement is onnxruntime's int8 convolution recipe"
    if cpu.machine_class in OPENVINO_FP32_VAE_CLASSES:
        return "openvino", (f"machine class {cpu.machine_class}: fp32 VAE in OpenVINO (f32), whose convolutions ran "
                            "the Wan VAE 1.2-1.4x faster than onnxruntime's on this class, same values")
    return "onnxruntime", (f"machine class {cpu.machine_class}: fp32 VAE in onnxruntime (OpenVINO f32 measured faster "
                           f"only on {', '.join(OPENVINO_FP32_VAE_CLASSES)})")


def cpu_core_runtime(cpu: CpuFeatures, precision: str) -> tuple[str, str]:
    """(runtime, why): what runs the core graph when `thfm export --target cpu` is given no --core-runtime.

    - openvino for the int8 core where the CPU has bf16 instructions: OpenVINO runs the same Q/DQ
      graph's linears in int8 and its float remainder (attention products, norms, softmax) in bf16.
      On the AVX-512 BF16 EPYC class the 1.3B core at 17x256x256 took 38.0 s for six task rows, against
      66.1 s in onnxruntime (1.74x; 45.1 s with the remainder in f32), within the export's tolerances,
      and the request end to end went from 2.68x to 3.21x the PyTorch pipeline (perf/README.md). On
      a Xeon with AMX the same rows took 13.1 s against 45.2 s (3.46x; 20.5 s in f32; perf/runtimes.py).
    - onnxruntime elsewhere: on the AVX2-only EPYC class OpenVINO 2026.4 ran the int8 core slower than
      onnxruntime (3.98 s against 2.28 s for four 1.3B blocks) and the fp32 one no faster (3.58 s
      against 3.35 s). CPUs with VNNI but no bf16 have not been measured, so they keep onnxruntime.
    """
    if precision == "int8" and cpu.bf16:
        return "openvino", (f"machine class {cpu.machine_class}: int8 core in OpenVINO, its float remainder in bf16 "
                            "(the CPU has bf16 instructions; 1.74x onnxruntime's int8 on the AVX-512 BF16 EPYC class, "
                            "3.46x on the amx class)")
    if precision == "int8":
        return "onnxruntime", (f"machine class {cpu.machine_class}: no bf16 instructions, where OpenVINO's int8 core "
                               "was slower than onnxruntime's (AVX2-only EPYC: 3.98 s against 2.28 s)")
    return "onnxruntime", f"a {precision} core runs in onnxruntime (OpenVINO's int8 recipe is the one measured faster)"


def torch_bf16_advice(cpu: CpuFeatures) -> str | None:
    """None when PyTorch bf16 on this CPU is native; otherwise why it will be slower than fp32."""
    if cpu.bf16:
        return None
    return (f"this CPU ({cpu.machine_class}) has no bf16 instructions (avx512_bf16 / amx_bf16): PyTorch emulates "
            "bf16 through fp32 and runs slower than fp32 (6.6x slower measured on an AVX2-only EPYC)")
