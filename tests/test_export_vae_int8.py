"""`thfm export --vae-precision int8`: the Wan VAE's convolutions as int8 Q/DQ for onnxruntime on CPU.

One module-scoped export of the tiny checkpoint (fp32 core, int8 VAE) at a small grid, then: the
Q/DQ structure check against hand-made and broken graphs, the int8 VAE against the fp32 PyTorch VAE
on held-out clips, the drift rows and bounds in the report, the precision in the manifests, the
option's errors, and the repository served by a real tritonserver.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from thfm_serve.config import DENSE_TASKS, TASKS
from thfm_serve.contract import protocol
from thfm_serve.contract.protocol import CORE, VAE_DECODER, VAE_ENCODER
from thfm_serve.contract.specs import VAE_DRIFT_BOUNDS, Target
from thfm_serve.errors import ExportError, ThfmError
from thfm_serve.export import build, export_repository
from thfm_serve.export.calibration import VAE_CLIPS, procedural_clips
from thfm_serve.export.quantize import check_conv_qdq, check_qlinear_conv, decoder_tail_convs
from thfm_serve.export.validate import check_vae_drift

logger = logging.getLogger(__name__)

WINDOW, HEIGHT, WIDTH = 5, 32, 32


@pytest.fixture(scope="module")
def int8_repo(request, tiny_checkpoint, tmp_path_factory):
    """The served tests' cached cpu/fp32 export (tests/serverfix.py), copied, with its VAE re-exported
    as int8: the fp32 core is reused (its manifest still matches), the VAE manifests do not."""
    import shutil

    from serverfix import exported_repo

    repo = tmp_path_factory.mktemp("vae_int8") / "repo"
    shutil.copytree(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, WINDOW, HEIGHT, WIDTH), repo)
    report = export_repository(tiny_checkpoint, repo, "cpu", "fp32", frames=WINDOW, height=HEIGHT, width=WIDTH,
                               vae_precision="int8")
    assert report["models"][CORE]["status"] == "reused"
    assert {report["models"][n]["status"] for n in (VAE_ENCODER, VAE_DECODER)} == {"exported"}
    # The copied repository's fp32 VAE graphs are current: quantised as they are, not traced again.
    assert all(report["models"][n]["fp32_graph"].startswith("the repository's fp32") for n in (VAE_ENCODER, VAE_DECODER))
    # No --calibration-clips: the VAE's own default, not the core's smaller one.
    assert {report["models"][n]["quantization"]["calibration_clips"] for n in (VAE_ENCODER, VAE_DECODER)} == {VAE_CLIPS}
    return repo, report


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    from thfm_serve.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint, text_encoder=False)


def _graph(path):
    return onnx.load(str(path))


# --- the Q/DQ structure check ---------------------------------------------------------------------

def _conv_model(quantised: bool, per_channel: bool = True) -> onnx.ModelProto:
    """One 3D Conv (4 -> 3 channels), float or in the Q/DQ form quantize_static writes."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4, 1, 3, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if not quantised:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
        inits = [numpy_helper.from_array(w, "w")]
    else:
        scale = np.abs(w).reshape(3, -1).max(1) / 127 if per_channel else np.array(np.abs(w).max() / 127)
        wq = np.round(w / scale.reshape((-1, 1, 1, 1, 1) if per_channel else ())).astype(np.int8)
        inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(scale.astype(np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(scale.shape, np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="qx"),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dqx"),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=0),
                 helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
                 helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="qc"),
                 helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"], name="dqc")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_qdq_check_fails_on_float_graphs_and_passes_on_the_exported_ones(int8_repo, tmp_path):
    repo, _ = int8_repo
    with pytest.raises(ExportError, match="1 of 1 Conv.*its input is not dequantised"):
        check_conv_qdq(_conv_model(quantised=False))
    with pytest.raises(ExportError, match="not quantised per output channel"):
        check_conv_qdq(_conv_model(quantised=True, per_channel=False))
    assert check_conv_qdq(_conv_model(quantised=True))["quantized_convs"] == 1

    for name in (VAE_ENCODER, VAE_DECODER):
        model = _graph(repo / name / "1" / "model.onnx")
        tail = decoder_tail_convs(model)
        assert (len(tail) > 0) == (name == VAE_DECODER)
        stats = check_conv_qdq(model, tail)
        assert stats["convs"] == stats["quantized_convs"] + len(tail) and stats["quantized_convs"] > 10
        assert stats["int8_initializers"] >= stats["quantized_convs"]
        # onnxruntime runs every quantised Conv as QLinearConv, the 3D ones included; the tail stays float.
        counts = check_qlinear_conv(repo / name / "1" / "model.onnx", stats["quantized_convs"], len(tail))
        assert counts["float_conv"] == len(tail) and counts["qlinear_conv_3d"] > 0
        assert counts["qlinear_conv_2d"] + counts["qlinear_conv_3d"] == stats["quantized_convs"]
        # Without its float tail the decoder is not the all-int8 graph the plain check expects.
        if tail:
            with pytest.raises(ExportError, match=f"{len(tail)} of {stats['convs']} Conv.*its input is not dequantised"):
                check_conv_qdq(model)

    # One Conv of the exported decoder rewired to read the float activation: named, fatal.
    model = _graph(repo / VAE_DECODER / "1" / "model.onnx")
    producer = {o: n for n in model.graph.node for o in n.output}
    conv = [n for n in model.graph.node if n.op_type == "Conv"][5]
    conv.input[0] = producer[producer[conv.input[0]].input[0]].input[0]  # DQ(Q(x)) -> x
    with pytest.raises(ExportError, match=f"1 of \\d+ Conv.*{conv.name}"):
        check_conv_qdq(model, decoder_tail_convs(model))
    # An unquantised graph never reaches QLinearConv either.
    onnx.save(_conv_model(quantised=False), str(tmp_path / "float.onnx"))
    with pytest.raises(ExportError, match="fused 0 of 1"):
        check_qlinear_conv(tmp_path / "float.onnx", 1)


def test_the_float_tail_is_the_decoders_last_up_block_and_conv_out(int8_repo, ck):
    """The Convs kept float are those of diffusers' AutoencoderKLWan decoder's last up block and its
    conv_out (read from the PyTorch module, not from the graph), each unrolled latent step's copy."""
    repo, _ = int8_repo
    decoder = ck.vae_decoder().vae.decoder
    last = len(decoder.up_blocks) - 1
    expected = {f"vae.decoder.up_blocks.{last}.{n}.weight" for n, m in decoder.up_blocks[last].named_modules()
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))} | {"vae.decoder.conv_out.weight"}
    model = _graph(repo / VAE_DECODER / "1" / "model.onnx")
    nodes = {n.name: n for n in model.graph.node}
    tail = decoder_tail_convs(model)
    assert {nodes[t].input[1] for t in tail} == expected and len(tail) >= len(expected)
    inits = {t.name: t for t in model.graph.initializer}
    assert all(inits[nodes[t].input[1]].data_type == TensorProto.FLOAT for t in tail)
    # A Conv named as a tail Conv that is not in the graph is a loud error, not a silent no-op.
    with pytest.raises(ExportError, match="not in the graph"):
        check_conv_qdq(model, [*tail, "no_such_conv"])


def _two_convs(tmp_path):
    """Conv -> SiLU -> Conv (4 -> 6 -> 3 channels) with a dynamic batch, saved as float ONNX."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4, 1, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((3, 6, 1, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="c1", pads=[0, 1, 1, 0, 1, 1]),
             helper.make_node("Sigmoid", ["a"], ["s"], name="sig"), helper.make_node("Mul", ["a", "s"], ["h"], name="silu"),
             helper.make_node("Conv", ["h", "w2"], ["y"], name="c2", pads=[0, 1, 1, 0, 1, 1])]
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                                opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def test_vae_calibration_runs_one_row_at_a_time_with_the_batchs_ranges(tmp_path):
    # Calibration samples of several rows (a decoder sample: a latent and the dense rows) are run one
    # row at a time; onnxruntime's own quantize_static on the whole batches is the reference for the
    # ranges, and so the scales and zero points, it writes.
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    from thfm_serve.export.quantize import _Reader, quantize_vae, single_rows, vae_recipe_for

    path = _two_convs(tmp_path)
    rng = np.random.default_rng(2)
    # Rows on different scales, so a range taken from any one row would differ from the batch's.
    samples = [{"x": (rng.standard_normal((b, 4, 3, 8, 8)) * rng.uniform(0.5, 3, (b, 1, 1, 1, 1))).astype(np.float32)}
               for b in (3, 1, 4)]
    rows = single_rows(samples)
    assert [r["x"].shape[0] for r in rows] == [1] * 8
    np.testing.assert_array_equal(np.concatenate([r["x"] for r in rows]), np.concatenate([s["x"] for s in samples]))

    stats = quantize_vae(path, tmp_path / "ours.onnx", samples)
    assert (stats["calibration_samples"], stats["calibration_rows"]) == (3, 8)
    quantize_static(str(path), str(tmp_path / "ref.onnx"), _Reader(samples), calibrate_method=CalibrationMethod.MinMax,
                    **vae_recipe_for().quantize_static_kwargs())

    def qparams(p):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(p)).graph.initializer
                if t.name.endswith(("_scale", "_zero_point"))}

    ours, ref = qparams(tmp_path / "ours.onnx"), qparams(tmp_path / "ref.onnx")
    assert set(ours) == set(ref) and len(ours) >= 6
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-6, err_msg=name)
    with pytest.raises(ExportError, match="disagree on the batch"):
        single_rows([{"x": samples[0]["x"], "y": samples[1]["x"]}])


# --- the int8 VAE against the fp32 VAE ------------------------------------------------------------

def test_int8_vae_is_close_to_the_fp32_vae_on_held_out_clips(int8_repo, ck):
    """Bounds from what the numbers mean, not from a run: maps are in [0, 1] and become 8-bit pictures
    and task values: a mean error of 1% of that range (2.5 grey levels) is invisible in the pictures;
    encoder latents are normalised to unit scale, and 5% of it is far below the spread between clips.
    Element-wise, each output stays within the int8 budget of its spec (export validation's bound)."""
    repo, report = int8_repo
    specs = {n: build.SubmodelSpec.from_dict(report["specs"][n]) for n in (VAE_ENCODER, VAE_DECODER)}
    from thfm_serve.export.validate import OnnxVae

    vae = OnnxVae(*((specs[n], repo / n / "1" / "model.onnx") for n in (VAE_ENCODER, VAE_DECODER)), WINDOW)
    feeds_enc = build.vae_feeds(ck, VAE_ENCODER, procedural_clips(2, WINDOW, HEIGHT, WIDTH, seed=300), WINDOW, HEIGHT, WIDTH)
    feeds_dec = build.vae_feeds(ck, VAE_DECODER, procedural_clips(2, WINDOW, HEIGHT, WIDTH, seed=300), WINDOW, HEIGHT, WIDTH)
    enc, dec = ck.vae_encoder(), ck.vae_decoder()
    for fe, fd in zip(feeds_enc, feeds_dec):
        x, z = fe[protocol.ENCODER_IN], fd[protocol.DECODER_IN]
        with torch.no_grad():
            ref_latent, ref_maps = enc(torch.from_numpy(x)).numpy(), dec(torch.from_numpy(z)).numpy()
        got_latent, got_maps = vae.encode(x), vae.decode(z)
        d_lat, d_map = np.abs(got_latent - ref_latent), np.abs(got_maps - ref_maps)
        logger.info("int8 VAE vs fp32: latent mean %.4f max %.4f; maps mean %.4f max %.4f", d_lat.mean(), d_lat.max(),
                    d_map.mean(), d_map.max())
        assert d_lat.max() > 0 and d_map.max() > 0  # int8 arithmetic, not a float graph
        assert d_lat.mean() < 0.05 and d_map.mean() < 0.01
        for spec, got, ref in ((specs[VAE_ENCODER], got_latent, ref_latent), (specs[VAE_DECODER], got_maps, ref_maps)):
            ok, max_abs, _ = spec.tolerances[spec.output_names[0]].check(got, ref)
            assert ok, (spec.name, max_abs)


# --- report and manifests -------------------------------------------------------------------------

def test_drift_rows_and_precision_are_in_the_report_and_manifests(int8_repo):
    repo, report = int8_repo
    assert report["vae_precision"] == "int8" and report["precision"] == "fp32"
    entry = report["models"][VAE_DECODER]
    dense = [t for t in TASKS if t in DENSE_TASKS]
    assert set(entry["vae_drift"]) == set(dense)
    rows = {(r["task"], r["metric"]): r for r in entry["vae_drift_bounds"]}
    assert set(rows) == {(b.task, b.metric) for b in VAE_DRIFT_BOUNDS}
    for b in VAE_DRIFT_BOUNDS:
        row = rows[(b.task, b.metric)]
        assert row["ok"] and row["value"] == entry["vae_drift"][b.task][b.metric] and row["limit"] == b.limit
    assert "int8 encoder and int8 decoder" in entry["vae_drift_candidate"]
    # The drift is measured, not zero: the int8 maps differ from the fp32 ones.
    assert entry["vae_drift"]["normals"]["mean_deg"] > 0 and entry["vae_drift"]["segmentation"]["mad"] > 0
    on_disk = json.loads((repo / "export_report.json").read_text())
    assert on_disk["models"][VAE_DECODER]["vae_drift"] == entry["vae_drift"]
    for name, precision in ((VAE_ENCODER, "int8"), (VAE_DECODER, "int8"), (CORE, "fp32")):
        manifest = json.loads((repo / name / "1" / "manifest.json").read_text())
        assert manifest["spec"]["precision"] == manifest["key"]["precision"] == precision, name
        assert ("calibration" in manifest["key"]) == (precision == "int8"), name
    served = json.loads((repo / "thfm_repository.json").read_text())
    assert {n: served["specs"][n]["precision"] for n in (VAE_ENCODER, VAE_DECODER, CORE)} == {
        VAE_ENCODER: "int8", VAE_DECODER: "int8", CORE: "fp32"}


def test_drift_beyond_a_bound_fails_the_export_with_the_numbers(int8_repo):
    _, report = int8_repo
    drift = json.loads(json.dumps(report["models"][VAE_DECODER]["vae_drift"]))
    assert all(r["ok"] for r in check_vae_drift(drift, VAE_DRIFT_BOUNDS))
    drift["normals"]["mean_deg"] = 40.0
    drift["segmentation"]["iou"] = 0.5
    with pytest.raises(ExportError, match=r"normals mean_deg = 40 \(bound: normals mean_deg <= .*segmentation iou = 0.5"):
        check_vae_drift(drift, VAE_DRIFT_BOUNDS)
    del drift["densepose"]["part_acc"]
    with pytest.raises(ExportError, match="densepose part_acc = None"):
        check_vae_drift({"densepose": drift["densepose"]}, VAE_DRIFT_BOUNDS)


def test_the_vae_precision_is_part_of_the_manifest_key(int8_repo, ck):
    """int8 VAE files are not reused for an fp32 export, nor fp32 ones for int8 (export_repository
    reuses a model only when _exported_part's key check passes)."""
    repo, report = int8_repo
    args = (report["checkpoint_sha256"], build.Precision.FP32, [], None, Target.CPU)
    for vae_precision, found in (("int8", True), ("fp32", False)):
        specs = build.build_specs(ck.config, WINDOW, HEIGHT, WIDTH, vae_precision=vae_precision)
        for name in (VAE_ENCODER, VAE_DECODER):
            assert (build._exported_part(repo, specs, name, *args) is not None) == found, (vae_precision, name)
    # Other calibration clips make other int8 graphs: stale too.
    specs = build.build_specs(ck.config, WINDOW, HEIGHT, WIDTH, vae_precision="int8")
    assert build._exported_part(repo, specs, VAE_DECODER, report["checkpoint_sha256"], build.Precision.FP32, [],
                                VAE_CLIPS + 1, Target.CPU) is None


# --- the option -------------------------------------------------------------------------------------

def test_bad_vae_precision_values_are_clear_errors(tiny_checkpoint, tmp_path, caplog):
    from thfm_serve.cli import build_parser, main
    from thfm_serve.options import ExportOptions

    with pytest.raises(ThfmError, match="unknown VAE precision 'int4'; choose from fp32, int8, bf16"):
        ExportOptions("ck", "r", vae_precision="int4").validate()
    with pytest.raises(ThfmError, match="VAE precision 'fp8' is not supported; choose from fp32, int8, bf16"):
        ExportOptions("ck", "r", vae_precision="fp8").validate()
    with pytest.raises(ThfmError, match="--vae-precision int8 is for --target cpu only"):
        export_repository(tiny_checkpoint, tmp_path / "r", Target.GPU, "bf16", vae_precision="int8")
    assert not (tmp_path / "r").exists()  # refused before anything was written
    opts = ExportOptions.from_args(build_parser().parse_args(
        ["export", "--checkpoint", "ck", "--repo", "r", "--vae-precision", "int8"]))
    assert opts.validate().export_kwargs()["vae_precision"] == "int8"
    assert ExportOptions("ck", "r").export_kwargs()["vae_precision"] is None  # the machine's (cpu_vae_recipe)
    with caplog.at_level(logging.ERROR):
        rc = main(["export", "--checkpoint", str(tiny_checkpoint), "--repo", str(tmp_path / "r2"),
                   "--vae-precision", "fp16"])
    assert rc == 2 and "VAE precision 'fp16' is not supported" in caplog.text


# --- served ---------------------------------------------------------------------------------------

@pytest.mark.server
def test_thfm_serves_the_int8_vae_repository(int8_repo, tmp_path):
    """tritonserver loads the int8 graphs with no serving change, and answers as the same repository's
    graphs do in process (the entry logic over the repository's onnxruntime models)."""
    from serverfix import assert_served_as_in_process

    assert_served_as_in_process(int8_repo[0], tmp_path, ["depth", "segmentation", "keypoints2d"], (WINDOW, HEIGHT, WIDTH))
