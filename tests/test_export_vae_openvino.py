"""`thfm export --vae-runtime openvino`: the fp32 Wan VAE graph served by OpenVINO's CPU plugin in f32.

The machine's choice (machine.cpu_vae_runtime, what `thfm export` takes without the flag) and the
combinations refused; then one module-scoped export of the tiny checkpoint whose fp32 VAE pair is
re-exported for OpenVINO from the served tests' cached repository. OpenVINO f32 runs on every x86 CPU,
so these tests run everywhere: the served sessions are OpenVINO's in f32, within the fp32 tolerances of
the PyTorch VAE, and a real tritonserver answers as the same repository does in process.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from thfm_serve.contract.protocol import CORE, VAE_DECODER, VAE_ENCODER
from thfm_serve.contract.specs import AUTO_RUNTIME, Precision, Runtime, Target, build_specs
from thfm_serve.errors import ThfmError
from thfm_serve.export import build, export_repository
from thfm_serve.export.precision import check_vae_runtime
from thfm_serve.machine import cpu_vae_runtime, parse_cpuinfo
from thfm_serve.options import ExportOptions
from thfm_serve.serving.sessions import OpenVinoSession, runs_in_openvino

WINDOW, HEIGHT, WIDTH = 5, 32, 32


def _cpu(flags: str):
    return parse_cpuinfo(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n")


AVX2_ONLY = _cpu("fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 bmi1 bmi2")
AVX512_BF16 = _cpu("fpu sse2 avx fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16")
AVX512_VNNI = _cpu("fpu sse2 avx fma avx2 avx512f avx512bw avx512vl avx512_vnni")
XEON_AMX = _cpu("fpu sse2 avx fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8")


@pytest.fixture(scope="module")
def ov_repo(request, tiny_checkpoint, tmp_path_factory):
    """The served tests' cached cpu/fp32 export, copied, with its VAE pair re-exported for OpenVINO:
    the core is reused, the VAE graphs are the repository's fp32 ones, validated again in OpenVINO."""
    from serverfix import copy_export, exported_repo

    repo = tmp_path_factory.mktemp("vae_ov") / "repo"
    copy_export(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, WINDOW, HEIGHT, WIDTH), repo)
    report = export_repository(tiny_checkpoint, repo, "cpu", "fp32", frames=WINDOW, height=HEIGHT, width=WIDTH,
                               vae_runtime="openvino")
    return repo, report


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    from thfm_serve.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint, text_encoder=False)


# --- the choice -----------------------------------------------------------------------------------

def test_the_machine_choice_follows_the_vae_precision_and_the_class():
    """bf16 has only OpenVINO, int8 only onnxruntime; fp32 goes to OpenVINO on the classes where it was
    measured faster (avx2-fma, avx512-vnni-bf16, amx) and stays in onnxruntime on the others."""
    assert XEON_AMX.machine_class == "amx"
    assert cpu_vae_runtime(AVX2_ONLY, "fp32")[0] == "openvino"
    assert cpu_vae_runtime(AVX512_BF16, "fp32")[0] == "openvino"
    assert cpu_vae_runtime(XEON_AMX, "fp32")[0] == "openvino"
    assert cpu_vae_runtime(AVX512_VNNI, "fp32")[0] == "onnxruntime"
    for cpu in (AVX2_ONLY, AVX512_BF16, XEON_AMX, AVX512_VNNI):
        assert cpu_vae_runtime(cpu, "bf16")[0] == "openvino"
        assert cpu_vae_runtime(cpu, "int8")[0] == "onnxruntime"
    assert "avx2-fma" in cpu_vae_runtime(AVX2_ONLY, "fp32")[1]


def test_without_the_flag_the_cli_asks_for_the_machine_choice_and_the_api_for_the_precisions(ck):
    assert ExportOptions("ck", "r").validate().export_kwargs()["vae_runtime"] == AUTO_RUNTIME
    assert ExportOptions("ck", "r", vae_runtime="onnxruntime").validate().export_kwargs()["vae_runtime"] == "onnxruntime"
    with pytest.raises(ThfmError, match="unknown runtime 'tensorrt'"):
        ExportOptions("ck", "r", vae_runtime="tensorrt").validate()
    specs = build_specs(ck.config, WINDOW, HEIGHT, WIDTH, vae_runtime="openvino")
    assert [runs_in_openvino(specs[n]) for n in (VAE_ENCODER, VAE_DECODER, CORE)] == [True, True, False]
    assert specs[VAE_DECODER].to_dict()["runtime"] == "openvino"  # not the fp32 default: written down
    default = build_specs(ck.config, WINDOW, HEIGHT, WIDTH, vae_precision="bf16")
    assert all(runs_in_openvino(default[n]) for n in (VAE_ENCODER, VAE_DECODER))


@pytest.mark.parametrize("target, precision, runtime, message", [
    (Target.CPU, Precision.BF16, Runtime.ONNXRUNTIME, "--vae-precision bf16 runs in OpenVINO"),
    (Target.CPU, Precision.INT8, Runtime.OPENVINO, "--vae-precision int8 runs in onnxruntime"),
    (Target.GPU, Precision.FP32, Runtime.OPENVINO, "--vae-runtime openvino is for --target cpu"),
])
def test_combinations_that_cannot_be_served_are_refused(target, precision, runtime, message):
    with pytest.raises(ThfmError, match=message):
        check_vae_runtime(target, precision, runtime)


def test_refused_before_anything_is_written(tiny_checkpoint, tmp_path):
    with pytest.raises(ThfmError, match="--vae-precision int8 runs in onnxruntime"):
        export_repository(tiny_checkpoint, tmp_path / "r", "cpu", "fp32", vae_precision="int8", vae_runtime="openvino")
    assert not (tmp_path / "r").exists()


# --- the export -----------------------------------------------------------------------------------

def test_the_openvino_vae_is_the_repositorys_fp32_graph_revalidated_and_keyed_on_its_runtime(ov_repo, ck):
    repo, report = ov_repo
    assert report["vae_runtime"] == "openvino" and report["vae_runtime_chosen_by"] == "--vae-runtime"
    assert report["models"][CORE]["status"] == "reused"
    for name in (VAE_ENCODER, VAE_DECODER):
        entry = report["models"][name]
        assert entry["status"] == "exported", name  # the onnxruntime VAE's manifest no longer matches
        assert entry["fp32_graph"].startswith("the repository's fp32"), name  # not traced again
        assert entry["runner"] == "openvino-cpu (fp32 graph, f32 inference precision)", name
        assert entry["runtime"]["inference_precision"] == "f32", name
        manifest = json.loads((repo / name / "1" / "manifest.json").read_text())
        assert manifest["spec"]["runtime"] == "openvino" and manifest["key"]["runtime"]["runtime"] == "openvino-cpu"
    # Keyed on the runtime: the OpenVINO VAE is found for an OpenVINO spec only.
    args = (report["checkpoint_sha256"], Precision.FP32, [], None, Target.CPU)
    for runtime, found in (("openvino", True), (None, False)):
        specs = build_specs(ck.config, WINDOW, HEIGHT, WIDTH, vae_runtime=runtime)
        assert (build._exported_part(repo, specs, VAE_DECODER, *args) is not None) == found, runtime


def test_the_openvino_vae_is_served_in_f32_within_the_fp32_tolerances_of_pytorch(ov_repo, ck):
    from vaefix import served_and_pytorch

    from thfm_serve import serving

    repo, _ = ov_repo
    models = {n: serving.OnnxModel.load(repo / n, "1", n) for n in (VAE_ENCODER, VAE_DECODER)}
    for m in models.values():
        assert isinstance(m.session, OpenVinoSession) and m.session.inference_precision == "f32"
    for got, ref in served_and_pytorch(ck, models, (WINDOW, HEIGHT, WIDTH), seed=301):
        for name, m in models.items():
            ok, max_abs, _ = m.spec.tolerances[m.spec.output_names[0]].check(got[name], ref[name])
            assert ok, (name, max_abs)
            assert np.abs(got[name] - ref[name]).max() < 1e-3, name


@pytest.mark.server
def test_thfm_serves_the_openvino_vae_repository(ov_repo, tmp_path):
    from serverfix import assert_served_as_in_process

    assert_served_as_in_process(ov_repo[0], tmp_path, ["depth", "segmentation", "keypoints3d"], (WINDOW, HEIGHT, WIDTH))


def test_an_int8_core_measures_its_drift_through_the_openvino_vae(ov_repo, tiny_checkpoint, tmp_path):
    """The core's task drift decodes through the repository's exported VAE as served: with the VAE in
    OpenVINO, an int8 core exported for the same runtime finds it (not the PyTorch VAE) and reports it."""
    repo = tmp_path / "repo"
    shutil.copytree(ov_repo[0], repo)
    report = export_repository(tiny_checkpoint, repo, "cpu", "int8", frames=WINDOW, height=HEIGHT, width=WIDTH,
                               models=[CORE], vae_runtime="openvino")
    core = report["models"][CORE]
    assert core["status"] == "exported"
    assert core["drift_vae"].startswith("openvino-cpu, fp32") and "rows decoded: 8," in core["drift_vae"]
    assert set(core["drift"]) == {"depth", "normals", "segmentation", "densepose", "keypoints2d", "keypoints3d"}
