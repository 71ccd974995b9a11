"""`thfm export --vae-precision bf16`: the Wan VAE's fp32 graph run by OpenVINO's CPU plugin in bf16.

One module-scoped export of the tiny checkpoint (fp32 core, bf16 VAE) at a small grid, on CPUs with
bf16 instructions (elsewhere the export refuses, which the option tests below check on any CPU).
Then: the served sessions are OpenVINO's in bf16 and stay within the bf16 budget of the fp32 PyTorch
VAE; the report's drift and the manifests; the manifest key; the repository served by a real
tritonserver. The session's f32 fallback is checked against onnxruntime on any CPU.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from thfm_serve.config import DENSE_TASKS, TASKS
from thfm_serve.contract import protocol
from thfm_serve.contract.protocol import CORE, VAE_DECODER, VAE_ENCODER
from thfm_serve.contract.specs import VAE_DRIFT_BOUNDS, Precision, Target, build_specs
from thfm_serve.errors import ThfmError
from thfm_serve.export import build, export_repository
from thfm_serve.export.precision import check_target_vae_precision
from thfm_serve.machine import parse_cpuinfo, read_cpu
from thfm_serve.serving.sessions import OpenVinoSession, create_session, runs_in_openvino

logger = logging.getLogger(__name__)

WINDOW, HEIGHT, WIDTH = 5, 32, 32
NATIVE_BF16 = read_cpu().bf16
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no bf16 instructions: the export refuses bf16")

AVX2_ONLY = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse sse2 "
             "ssse3 sse4_1 sse4_2 avx fma avx2 bmi1 bmi2\n")


@pytest.fixture(scope="module")
def fp32_repo(request, tiny_checkpoint, tmp_path_factory):
    from serverfix import copy_export, exported_repo

    repo = tmp_path_factory.mktemp("vae_bf16_src") / "repo"
    return copy_export(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, WINDOW, HEIGHT, WIDTH), repo)


@pytest.fixture(scope="module")
def bf16_repo(fp32_repo, tiny_checkpoint, tmp_path_factory):
    """The served tests' cached cpu/fp32 export, copied, with its VAE re-exported as bf16: the fp32
    core is reused (its manifest still matches), the VAE manifests do not."""
    if not NATIVE_BF16:
        pytest.skip("this CPU has no bf16 instructions: the export refuses bf16")
    repo = tmp_path_factory.mktemp("vae_bf16") / "repo"
    shutil.copytree(fp32_repo, repo)
    report = export_repository(tiny_checkpoint, repo, "cpu", "fp32", frames=WINDOW, height=HEIGHT, width=WIDTH,
                               vae_precision="bf16")
    assert report["models"][CORE]["status"] == "reused"
    assert {report["models"][n]["status"] for n in (VAE_ENCODER, VAE_DECODER)} == {"exported"}
    # The graph is the repository's fp32 one, not traced again and not rewritten.
    assert all(report["models"][n]["fp32_graph"].startswith("the repository's fp32") for n in (VAE_ENCODER, VAE_DECODER))
    return repo, report


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    from thfm_serve.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint, text_encoder=False)


# --- what runs it -----------------------------------------------------------------------------------

def test_only_a_bf16_vae_runs_in_openvino(ck):
    specs = {p: build_specs(ck.config, WINDOW, HEIGHT, WIDTH, precision=p, vae_precision=v)
             for p, v in (("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8"))}
    assert [runs_in_openvino(specs["bf16"][n]) for n in (VAE_ENCODER, VAE_DECODER, CORE)] == [True, True, False]
    assert not any(runs_in_openvino(specs[p][n]) for p in ("fp32", "int8") for n in (VAE_ENCODER, VAE_DECODER, CORE))


def test_openvino_falls_back_to_f32_without_bf16_instructions_and_matches_onnxruntime(fp32_repo, caplog):
    """On a CPU without bf16 a bf16 VAE repository still serves: OpenVINO runs the graph in f32, which
    agrees with onnxruntime's fp32 run to float rounding, and a warning says why it is not bf16."""
    path = fp32_repo / VAE_DECODER / "1" / "model.onnx"
    x = np.random.default_rng(0).standard_normal((2, 16, 2, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        ov = OpenVinoSession(path, threads=1, precision="bf16", cpu=parse_cpuinfo(AVX2_ONLY))
    assert ov.inference_precision == "f32" and "without bf16 instructions" in caplog.text
    assert [i.name for i in ov.get_inputs()] == [protocol.DECODER_IN]
    assert [o.name for o in ov.get_outputs()] == [protocol.DECODER_OUT]
    ref = create_session(path, threads=1).run(None, {protocol.DECODER_IN: x})[0]
    got = ov.run([protocol.DECODER_OUT], {protocol.DECODER_IN: x})[0]
    assert got.shape == ref.shape == (2, 3, WINDOW, HEIGHT, WIDTH)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # The output is a copy: the next call does not overwrite it.
    again = ov.run(None, {protocol.DECODER_IN: -x})[0]
    assert not np.allclose(again, got) and np.allclose(got, ov.run(None, {protocol.DECODER_IN: x})[0], atol=1e-6)


@needs_bf16
def test_bf16_session_compiles_each_shape_fixed_and_stays_in_budget_across_the_frame(fp32_repo):
    """Compiled with dynamic height and width, OpenVINO's bf16 decoder was wrong along the frame's
    right edge (max abs 0.4-0.8 on [0, 1] maps at 192 pixels wide, tiny checkpoint); compiled for the
    input's own shape it stays within the bf16 budget everywhere. The session compiles per row shape,
    keeps at most max_shapes (4 for a VAE), and answers a shape it has seen without compiling again."""
    from thfm_serve.contract.specs import tolerance_for

    path = fp32_repo / VAE_DECODER / "1" / "model.onnx"
    ov = OpenVinoSession(path, threads=2, precision="bf16")
    ort = create_session(path, threads=2)
    budget = tolerance_for("bf16", "maps")
    rng = np.random.default_rng(1)
    shapes = [(1, 16, 2, 4, 24), (2, 16, 2, 8, 24), (1, 16, 2, 4, 40), (1, 16, 2, 24, 4), (1, 16, 2, 6, 6)]
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        ref = ort.run(None, {protocol.DECODER_IN: x})[0]
        got = ov.run(None, {protocol.DECODER_IN: x})[0]
        ok, max_abs, _ = budget.check(got, ref)
        assert ok, (shape, max_abs)
        # Every column, the last ones included: no edge of the frame is worse than the bf16 budget.
        assert np.abs(got - ref).max(axis=(0, 1, 2, 3)).max() <= budget.atol + budget.rtol, shape
    assert len(ov._requests) == ov.max_shapes == 4 < len(shapes)
    seen = list(ov._requests)[-1]
    before = dict(ov._requests)
    ov.run(None, {protocol.DECODER_IN: np.zeros(seen[0][1], np.float32)})
    assert ov._requests[seen] is before[seen]  # reused, not compiled again


def _causal_conv(path, channels: int, frames: int) -> None:
    """One Conv3d as the Wan VAE's causal convolutions are exported: kernel 3, padded 2 frames before
    and none after, 1 pixel on each side (a bias-free kernel of seeded random weights)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(0).standard_normal((16, channels, 3, 3, 3)) * 0.2).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3, 3], pads=[2, 1, 1, 0, 1, 1])
    graph = helper.make_graph([node], "causal_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    [1, channels, frames, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.parametrize("channels", [3, 5, 16])
def test_one_frame_causal_convolutions_are_padded_explicitly_and_stay_exact(tmp_path, channels):
    """The rewrite that works around OpenVINO's AMX bf16 one-frame convolution (explicit_time_padding)
    touches the one-frame convolutions only and changes no value: in f32, the rewritten graph agrees
    with onnxruntime on any CPU."""
    import openvino as ov

    from thfm_serve.serving.sessions import explicit_time_padding

    for frames, rewritten in ((1, 1), (3, 0)):
        path = tmp_path / f"conv_{frames}.onnx"
        _causal_conv(path, channels, frames)
        x = np.random.default_rng(1).uniform(-1, 1, (1, channels, frames, 16, 16)).astype(np.float32)
        ref = create_session(path, threads=1).run(None, {"x": x})[0]
        core = ov.Core()
        model = core.read_model(str(path))
        assert explicit_time_padding(model) == rewritten
        ops = [op.get_type_name() for op in model.get_ordered_ops()]
        assert ("Concat" in ops) == bool(rewritten)
        request = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
        got = list(request.infer({0: x}).values())[0]
        assert got.shape == ref.shape == (1, 16, frames, 16, 16)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


@needs_bf16
@pytest.mark.parametrize("channels", [3, 5, 7, 12])
def test_bf16_one_frame_causal_convolution_is_right_and_repeatable(tmp_path, channels):
    """The Wan encoder's conv_in (3 channels) over its first chunk's one frame: OpenVINO's AMX bf16
    kernel for it returned relative error 1 (NaN with 96 output channels), different on each run; the
    session's bf16 result is within bf16 rounding of onnxruntime's fp32 one, the same on every run."""
    path = tmp_path / "conv.onnx"
    _causal_conv(path, channels, 1)
    x = np.random.default_rng(1).uniform(-1, 1, (1, channels, 1, 16, 16)).astype(np.float32)
    ref = create_session(path, threads=1).run(None, {"x": x})[0]
    ov = OpenVinoSession(path, threads=2, precision="bf16")
    runs = [ov.run(None, {"x": x})[0] for _ in range(3)]
    assert all(np.array_equal(r, runs[0]) for r in runs)
    assert np.abs(runs[0] - ref).max() <= 0.02 * np.abs(ref).max()


# --- the bf16 VAE against the fp32 VAE --------------------------------------------------------------

@needs_bf16
def test_bf16_vae_is_served_by_openvino_in_bf16_close_to_the_fp32_vae(bf16_repo, ck):
    """The served sessions (OnnxModel.load, what the python models run) are OpenVINO's in bf16: they
    differ from the fp32 PyTorch VAE (bf16 arithmetic, not an fp32 run), by at most the bf16 budget
    of the spec element-wise, and on average by under 1% of the maps' [0, 1] range (2.5 grey levels)
    and 5% of the latents' unit scale."""
    from vaefix import served_and_pytorch

    from thfm_serve import serving

    repo, _ = bf16_repo
    models = {n: serving.OnnxModel.load(repo / n, "1", n) for n in (VAE_ENCODER, VAE_DECODER)}
    for m in models.values():
        assert isinstance(m.session, OpenVinoSession) and m.session.inference_precision == "bf16"
        assert m.spec.precision == "bf16"
        # Compiled at load for the export shape, so the first request does not wait for it.
        opt = tuple((t.name, m.spec.shape(t.name, "opt")) for t in m.spec.inputs)
        assert list(m.session._requests) == [opt]
    for got, ref in served_and_pytorch(ck, models, (WINDOW, HEIGHT, WIDTH), seed=300):
        for name, mean_limit in ((VAE_ENCODER, 0.05), (VAE_DECODER, 0.01)):
            d = np.abs(got[name] - ref[name])
            logger.info("bf16 %s vs fp32 PyTorch: mean %.5f max %.5f", name, d.mean(), d.max())
            assert d.max() > 1e-4, name  # bf16 arithmetic, not an fp32 run
            assert d.mean() < mean_limit, name
            spec = models[name].spec
            ok, max_abs, _ = spec.tolerances[spec.output_names[0]].check(got[name], ref[name])
            assert ok, (name, max_abs)


@needs_bf16
def test_drift_runtime_and_precision_are_in_the_report_and_manifests(bf16_repo):
    repo, report = bf16_repo
    assert report["vae_precision"] == "bf16" and report["precision"] == "fp32"
    entry = report["models"][VAE_DECODER]
    assert entry["runner"] == "openvino-cpu (bf16 graph, bf16 inference precision)"
    assert entry["runtime"]["runtime"] == "openvino-cpu" and entry["runtime"]["inference_precision"] == "bf16"
    dense = [t for t in TASKS if t in DENSE_TASKS]
    assert set(entry["vae_drift"]) == set(dense)
    rows = {(r["task"], r["metric"]): r for r in entry["vae_drift_bounds"]}
    assert set(rows) == {(b.task, b.metric) for b in VAE_DRIFT_BOUNDS} and all(r["ok"] for r in rows.values())
    assert entry["vae_drift_candidate"] == "bf16 encoder and bf16 decoder (OpenVINO)"
    assert entry["vae_drift"]["normals"]["mean_deg"] > 0  # measured, not an fp32 run
    for name, precision in ((VAE_ENCODER, "bf16"), (VAE_DECODER, "bf16"), (CORE, "fp32")):
        manifest = json.loads((repo / name / "1" / "manifest.json").read_text())
        assert manifest["spec"]["precision"] == manifest["key"]["precision"] == precision, name
        assert ("runtime" in manifest["key"]) == (precision == "bf16"), name
        assert "calibration" not in manifest["key"], name  # nothing is calibrated
    served = json.loads((repo / "thfm_repository.json").read_text())
    assert {n: served["specs"][n]["precision"] for n in (VAE_ENCODER, VAE_DECODER, CORE)} == {
        VAE_ENCODER: "bf16", VAE_DECODER: "bf16", CORE: "fp32"}


@needs_bf16
def test_the_bf16_vae_is_not_reused_for_another_precision(bf16_repo, ck):
    repo, report = bf16_repo
    args = (report["checkpoint_sha256"], Precision.FP32, [], None, Target.CPU)
    for vae_precision, found in (("bf16", True), ("fp32", False), ("int8", False)):
        specs = build_specs(ck.config, WINDOW, HEIGHT, WIDTH, vae_precision=vae_precision)
        for name in (VAE_ENCODER, VAE_DECODER):
            assert (build._exported_part(repo, specs, name, *args) is not None) == found, (vae_precision, name)


# --- the option ---------------------------------------------------------------------------------------

def test_bf16_vae_is_refused_where_it_cannot_run_as_validated(tiny_checkpoint, tmp_path):
    with pytest.raises(ThfmError, match=r"--vae-precision bf16 needs a CPU with bf16 instructions .* avx2-fma"):
        check_target_vae_precision(Target.CPU, Precision.BF16, cpu=parse_cpuinfo(AVX2_ONLY))
    with pytest.raises(ThfmError, match="--vae-precision bf16 is for --target cpu only"):
        export_repository(tiny_checkpoint, tmp_path / "r", Target.GPU, "bf16", vae_precision="bf16")
    assert not (tmp_path / "r").exists()  # refused before anything was written


# --- served -----------------------------------------------------------------------------------------

@needs_bf16
@pytest.mark.server
def test_thfm_serves_the_bf16_vae_repository(bf16_repo, tmp_path):
    """tritonserver's python models load the bf16 VAE in OpenVINO and answer as the same repository's
    models do in process (the entry logic over serving's sessions)."""
    from serverfix import assert_served_as_in_process

    assert_served_as_in_process(bf16_repo[0], tmp_path, ["depth", "normals", "keypoints2d"], (WINDOW, HEIGHT, WIDTH))
