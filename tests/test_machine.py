"""The machine's instruction sets, its class, and the CPU recipe chosen for it, on cpuinfo text of
each CPU class these machines have been seen with (flags abridged from real /proc/cpuinfo lines)."""

from __future__ import annotations

import logging

import pytest

from thfm_serve.machine import cpu_core_runtime, cpu_recipe, cpu_vae_recipe, parse_cpuinfo, read_cpu, torch_bf16_advice

_BASE = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
         "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid pni pclmulqdq ssse3 cx16 sse4_1 sse4_2 "
         "x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm")
XEON_AMX = _BASE + (" fma bmi1 avx2 smep bmi2 erms avx512f avx512dq rdseed adx avx512ifma clflushopt clwb avx512cd "
                    "sha_ni avx512bw avx512vl avx_vnni avx512_bf16 avx512vbmi umip avx512_vbmi2 gfni vaes avx512_vnni "
                    "avx512_bitalg avx512_vpopcntdq serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8")
EPYC_AVX512 = _BASE + (" fma bmi1 avx2 smep bmi2 erms avx512f avx512dq rdseed adx avx512ifma clflushopt clwb "
                       "avx512cd sha_ni avx512bw avx512vl avx512_bf16 avx512vbmi umip avx512_vbmi2 gfni vaes "
                       "avx512_vnni avx512_bitalg avx512_vpopcntdq")
EPYC_AVX2 = _BASE + " fma bmi1 avx2 smep bmi2 erms rdseed adx clflushopt clwb sha_ni umip vaes vpclmulqdq"
OLD_X86 = _BASE  # AVX but no AVX2/FMA


def cpuinfo(model: str, vendor: str, flags: str, processors: int = 2) -> str:
    block = (f"vendor_id\t: {vendor}\ncpu family\t: 25\nmodel name\t: {model}\nflags\t\t: {flags}\n"
             "bugs\t\t: sysret_ss_attrs spectre_v1\n")
    return "\n".join(f"processor\t: {i}\n{block}" for i in range(processors))


CLASSES = [
    # (cpuinfo, class, bf16, int8_dot, recipe precision)
    (cpuinfo("Intel(R) Xeon(R) Platinum 8481C", "GenuineIntel", XEON_AMX), "amx", True, True, "int8"),
    (cpuinfo("AMD EPYC 9B14", "AuthenticAMD", EPYC_AVX512), "avx512-vnni-bf16", True, True, "int8"),
    (cpuinfo("AMD EPYC 7B12", "AuthenticAMD", EPYC_AVX2), "avx2-fma", False, False, "int8"),
    (cpuinfo("Intel(R) Xeon(R) CPU E5-2670", "GenuineIntel", OLD_X86), "baseline", False, False, "fp32"),
]


@pytest.mark.parametrize("text,cls,bf16,int8_dot,precision", CLASSES)
def test_machine_class_and_recipe(text, cls, bf16, int8_dot, precision):
    cpu = parse_cpuinfo(text)
    assert cpu.machine_class == cls
    assert (cpu.bf16, cpu.int8_dot) == (bf16, int8_dot)
    assert cpu.model and cpu.vendor in ("GenuineIntel", "AuthenticAMD")
    recipe = cpu_recipe(cpu)
    assert recipe.precision == precision and recipe.machine_class == cls
    assert recipe.precision != "bf16"  # no onnxruntime CPU kernels, whatever the CPU
    assert cls in cpu.describe() and cpu.model in cpu.describe()
    assert cpu.to_dict()["class"] == cls and cpu.to_dict()["isa"]["avx2"] == (cls != "baseline")


def test_isa_flags_are_read_exactly():
    """Flags are whole words: avx512_vnni must not be read from avx512_vnni_xyz, nor avx2 from avx."""
    cpu = parse_cpuinfo(cpuinfo("X", "GenuineIntel", _BASE + " avx512_vnni_xyz"))
    assert not cpu.has("avx512_vnni") and not cpu.has("avx2") and cpu.machine_class == "baseline"
    isa = parse_cpuinfo(CLASSES[0][0]).isa
    assert all(isa.values()) and set(isa) >= {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni",
                                              "amx_bf16", "amx_int8", "amx_tile"}
    epyc2 = parse_cpuinfo(CLASSES[2][0]).isa
    assert [k for k, v in epyc2.items() if v] == ["avx2", "fma"]


def test_recipe_reasons_name_the_deciding_instructions():
    amx, epyc512, epyc2, old = (cpu_recipe(parse_cpuinfo(c[0])) for c in CLASSES)
    assert "amx_int8" in amx.reason and "avx512_vnni" in epyc512.reason and "amx" not in epyc512.reason
    assert "no VNNI" in epyc2.reason and "no AVX2" in old.reason


def test_torch_bf16_only_with_bf16_instructions():
    assert torch_bf16_advice(parse_cpuinfo(CLASSES[0][0])) is None
    assert torch_bf16_advice(parse_cpuinfo(CLASSES[1][0])) is None
    assert "no bf16 instructions" in torch_bf16_advice(parse_cpuinfo(CLASSES[2][0]))
    # AMX-BF16 without the tile state is unusable: not bf16.
    assert not parse_cpuinfo(cpuinfo("X", "GenuineIntel", EPYC_AVX2 + " amx_bf16")).bf16


def test_unreadable_cpuinfo_is_the_baseline(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        cpu = read_cpu(tmp_path / "missing")
    assert cpu.machine_class == "baseline" and cpu_recipe(cpu).precision == "fp32"
    assert "cannot read" in caplog.text
    assert read_cpu(_write(tmp_path, CLASSES[2][0])).machine_class == "avx2-fma"


def _write(tmp_path, text):
    p = tmp_path / "cpuinfo"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,cls,precision", [(c[0], c[1], c[4]) for c in CLASSES])
def test_export_default_precision_follows_the_machine(monkeypatch, tmp_path, text, cls, precision):
    """`thfm export --target cpu` without --precision takes the machine's recipe and says why; the
    GPU default does not depend on the CPU."""
    from thfm_serve import machine
    from thfm_serve.contract.specs import Precision, Target
    from thfm_serve.export.precision import default_precision

    monkeypatch.setattr(machine, "CPUINFO", _write(tmp_path, text))
    got, why = default_precision(Target.CPU)
    assert got == Precision(precision) and cls in why
    assert default_precision(Target.GPU)[0] == Precision.BF16


def test_int8_weights_follow_the_dot_product_instruction():
    """With VNNI or AMX the CPU recipe keeps 8-bit weights; without (AVX2 only) they are 7-bit, so that
    vpmaddubsw's int16 sum of two u8 x s8 products cannot saturate (255 * 64 * 2 < 32767)."""
    from thfm_serve.export.quantize import recipe_for

    amx, epyc512, epyc2, old = (parse_cpuinfo(c[0]) for c in CLASSES)
    for cpu in (amx, epyc512):
        assert not recipe_for("cpu", cpu).reduce_range and recipe_for("cpu", cpu).name == "onnxruntime-x86"
    for cpu in (epyc2, old):
        recipe = recipe_for("cpu", cpu)
        assert recipe.reduce_range and recipe.quantize_static_kwargs()["reduce_range"] is True
        assert recipe.name == "onnxruntime-x86-7bit" and "7-bit" in recipe.describe()
    assert "7-bit" in cpu_recipe(epyc2).reason
    # The GPU recipe does not depend on the host CPU.
    assert recipe_for("gpu", epyc2) == recipe_for("gpu", amx)


def test_serving_warns_of_8bit_int8_weights_on_a_cpu_without_vnni():
    """A graph quantised with 8-bit weights (on a VNNI machine, or before the 7-bit recipe) served on
    an AVX2-only CPU saturates its int8 kernel: the served model says so when it loads, and how to fix it."""
    from thfm_serve.serving.sessions import int8_weights_warning

    amx, _, epyc2, _ = (parse_cpuinfo(c[0]) for c in CLASSES)

    def manifest(precision="int8", **quantization):
        return {"spec": {"precision": precision}, "machine": {"class": "avx512-vnni-bf16"},
                "report": {"quantization": quantization}}

    warning = int8_weights_warning("core", manifest(weight_bits=8), epyc2)
    assert warning.startswith("core: ") and "avx512-vnni-bf16" in warning and "avx2-fma" in warning
    assert "thfm export --target cpu" in warning and "7 bits" in warning
    assert int8_weights_warning("core", manifest(), epyc2)  # a manifest from before weight_bits: 8-bit
    assert int8_weights_warning("core", manifest(weight_bits=8), amx) is None
    assert int8_weights_warning("core", manifest(weight_bits=7), epyc2) is None
    assert int8_weights_warning("core", manifest("fp32"), epyc2) is None
    assert int8_weights_warning("core", {}, epyc2) is None


@pytest.mark.parametrize("text,cls,bf16,int8_dot,precision", CLASSES)
def test_vae_recipe_is_bf16_only_with_bf16_instructions(text, cls, bf16, int8_dot, precision):
    """The VAE default per class: bf16 (OpenVINO) exactly where the CPU has bf16 instructions, never
    int8 (an explicit choice), and the reason names what decided."""
    recipe = cpu_vae_recipe(parse_cpuinfo(text))
    assert recipe.machine_class == cls
    assert recipe.precision == ("bf16" if bf16 else "fp32")
    assert ("bf16 instructions" in recipe.reason) and (("amx_bf16" in recipe.reason) == (cls == "amx"))


def test_export_default_vae_precision_follows_the_machine(monkeypatch):
    from thfm_serve import machine
    from thfm_serve.contract.specs import Precision, Target
    from thfm_serve.export.precision import default_vae_precision

    for text, cls, bf16, *_ in CLASSES:
        monkeypatch.setattr(machine, "read_cpu", lambda text=text: parse_cpuinfo(text))
        precision, why = default_vae_precision(Target.CPU)
        assert precision == (Precision.BF16 if bf16 else Precision.FP32) and cls in why
        assert default_vae_precision(Target.GPU)[0] == Precision.FP32


@pytest.mark.parametrize("text,cls,bf16,int8_dot,precision", CLASSES)
def test_core_runtime_is_openvino_only_for_an_int8_core_with_bf16_instructions(text, cls, bf16, int8_dot, precision):
    """The core's runtime per class: OpenVINO for the int8 core exactly where the CPU has bf16
    instructions (its float part then runs bf16), onnxruntime for every other core and CPU; the
    reason names the class and, where OpenVINO is refused, the measurement that refused it."""
    from thfm_serve.serving.sessions import openvino_inference_precision

    cpu = parse_cpuinfo(text)
    runtime, why = cpu_core_runtime(cpu, "int8")
    assert runtime == ("openvino" if bf16 else "onnxruntime") and cls in why
    assert ("AVX2-only EPYC" in why) == (not bf16)
    assert cpu_core_runtime(cpu, "fp32")[0] == "onnxruntime"
    assert openvino_inference_precision("int8", cpu) == ("bf16" if bf16 else "f32")
    assert openvino_inference_precision("fp32", cpu) == "f32"


def test_export_default_core_runtime_follows_the_machine(monkeypatch):
    from thfm_serve import machine
    from thfm_serve.contract.specs import Precision, Runtime, Target
    from thfm_serve.export.precision import default_core_runtime

    for text, cls, bf16, *_ in CLASSES:
        monkeypatch.setattr(machine, "read_cpu", lambda text=text: parse_cpuinfo(text))
        runtime, why = default_core_runtime(Target.CPU, Precision.INT8)
        assert runtime == (Runtime.OPENVINO if bf16 else Runtime.ONNXRUNTIME) and cls in why
        assert default_core_runtime(Target.CPU, Precision.FP32)[0] == Runtime.ONNXRUNTIME
        assert default_core_runtime(Target.GPU, Precision.INT8)[0] == Runtime.ONNXRUNTIME
