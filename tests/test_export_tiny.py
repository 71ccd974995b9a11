"""`thfm export` end to end on the tiny checkpoint, on CPU: every precision, validation at shapes the
export never used, manifests and reuse, int8 Q/DQ and drift, and the CLI's error cases.

One module fixture runs the exports in sequence into one repository (the fp32 VAE graphs come from
the served tests' cached export at the same grid, tests/serverfix.py, and are reused by every
precision, which also exercises reuse) and keeps a copy of each core.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from thfm_serve.cli import main
from thfm_serve.contract.protocol import VAE_DECODER, VAE_ENCODER
from thfm_serve.contract.specs import Precision
from thfm_serve.errors import ExportError
from thfm_serve.export import build_specs, export_repository
from thfm_serve.export.calibration import CORE_CLIPS
from thfm_serve.export.onnx_export import doubles_in_proto

from serverfix import HEIGHT, WIDTH, WINDOW

# The served tests' export grid (5 frames at 32x32; the checkpoint's clip is 9 x 64 x 64).
SHAPE = dict(frames=WINDOW, height=HEIGHT, width=WIDTH)
# A shape none of the exports used (opt: batch 1, 2 latent frames, 2x2 patches; trace: batch 2), and
# not square, so a height/width mix-up anywhere in the graph shows.
UNSEEN = {"batch": 2, "latent_frames": 3, "hp": 4, "wp": 1}


@pytest.fixture(scope="module")
def exports(request, tiny_checkpoint, tmp_path_factory):
    from serverfix import copy_export, exported_repo

    # The fp32 VAE graphs come from the session's served export (the first run below finds them
    # matching); the core is exported here at every precision.
    repo = copy_export(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, **SHAPE),
                       tmp_path_factory.mktemp("export") / "model_repository", models=[VAE_ENCODER, VAE_DECODER])
    cores = tmp_path_factory.mktemp("cores")
    reports = {}

    def run(tag, target, precision, **kw):
        reports[tag] = export_repository(tiny_checkpoint, repo, target, precision, **SHAPE, write_configs=False, **kw)
        shutil.copytree(repo / "core" / "1", cores / tag)

    run("fp32", "cpu", "fp32")
    run("fp32_again", "cpu", "fp32")
    run("int8", "cpu", "int8")  # default calibration clips; quantises the fp32 core the repository holds
    # The same with grids down to 16x16 pixels counted as keeping the person (calibration_grid): the
    # 32x32 grid halves, as 256x256 does at the default, and the calibration and drift move there.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("thfm_serve.export.calibration.CALIBRATION_MIN_PIXELS", 16 * 16)
        run("int8_half", "cpu", "int8")
    run("fp16", "cpu", "fp16")
    run("int8_gpu", "gpu", "int8", calibration_clips=1, build_engine=False)  # no fp32 core left: traces it
    # bf16 has no onnxruntime CPU kernels: it is a gpu precision; --no-engine stops before TensorRT.
    run("bf16", "gpu", "bf16", build_engine=False)
    return {"repo": repo, "cores": cores, "reports": reports, "checkpoint": tiny_checkpoint}


def _reference_core(checkpoint):
    from thfm_serve.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, text_encoder=False).core()


def _run_onnx(path: Path, feed: dict, precision: str) -> dict:
    if precision == "bf16":
        from onnx.reference import ReferenceEvaluator

        ev = ReferenceEvaluator(onnx.load(str(path)))
        names = [o.name for o in ev.proto_.graph.output]
        return dict(zip(names, ev.run(None, feed)))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))


def test_repository_layout_and_manifests(exports):
    repo = exports["repo"]
    for name in ("core", "vae_encoder", "vae_decoder"):
        vdir = repo / name / "1"
        assert (vdir / "model.onnx").is_file()
        assert not (vdir / "model.onnx.data").exists()  # under 2 GB: one file
        manifest = json.loads((vdir / "manifest.json").read_text())
        assert manifest["key"]["checkpoint_sha256"] == exports["reports"]["fp32"]["checkpoint_sha256"]
        assert manifest["spec"]["name"] == name
        assert (vdir / "polygraphy" / "inputs.json").is_file()
    emb = np.load(repo / "core" / "1" / "task_embeddings.npz")
    assert sorted(emb.files) == sorted(json.loads((repo / "core" / "1" / "thfm_config.json").read_text())["tasks"])
    assert emb["depth"].shape == (16, 32)
    report = json.loads((repo / "export_report.json").read_text())
    assert report["precision"] == "bf16" and report["engine"]["status"].startswith("skipped")
    assert not list(repo.glob(".export-*"))  # staging removed


@pytest.mark.parametrize("tag", ["fp32", "fp16", "int8", "bf16"])
def test_core_runs_at_an_unseen_shape_within_tolerance(exports, tag):
    spec = build_specs(_config(exports), **SHAPE, precision=tag)["core"]
    report = exports["reports"][tag]["models"]["core"]
    assert report["status"] == "exported"
    labels = [v["label"] for v in report["validation"]]
    assert labels[:2] == ["export", "unseen"] and all(all(o["ok"] for o in v["outputs"].values()) for v in report["validation"])

    feed = spec.dummy_inputs(UNSEEN, seed=42)
    got = _run_onnx(exports["cores"] / tag / "model.onnx", feed, tag)
    with torch.no_grad():
        ref = _reference_core(exports["checkpoint"])(*(torch.from_numpy(feed[n]) for n in spec.input_names))
    for name, r in zip(spec.output_names, ref):
        assert got[name].shape == spec.shape(name, UNSEEN)
        ok, max_abs, _ = spec.tolerances[name].check(got[name], r.numpy())
        assert ok, f"{tag} {name}: max abs diff {max_abs}"


def test_vae_graphs_run_at_unseen_batch_and_size(exports):
    from thfm_serve.checkpoint import load_checkpoint

    ck = load_checkpoint(exports["checkpoint"], text_encoder=False)
    specs = build_specs(ck.config, **SHAPE)
    for name, module in (("vae_encoder", ck.vae_encoder()), ("vae_decoder", ck.vae_decoder())):
        spec = specs[name]
        dims = {"batch": 2, "latent_frames": 2, "hp": 1, "wp": 4}  # frames are the static window
        feed = spec.dummy_inputs(dims, seed=5)
        got = _run_onnx(exports["repo"] / name / "1" / "model.onnx", feed, "fp32")
        with torch.no_grad():
            ref = module(torch.from_numpy(feed[spec.input_names[0]])).numpy()
        out = spec.output_names[0]
        assert spec.tolerances[out].check(got[out], ref)[0]
        entry = exports["reports"]["fp32"]["models"][name]
        assert entry["window_check"]["ok"] and entry["window_check"]["short_frames"] == 1


def test_graphs_are_clean(exports):
    for tag in ("fp32", "fp16", "int8", "bf16"):
        model = onnx.load(str(exports["cores"] / tag / "model.onnx"))
        assert doubles_in_proto(model) == []
        dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["batch", 16, "latent_frames", "2*hp", "2*wp"]
    fp16 = onnx.load(str(exports["cores"] / "fp16" / "model.onnx"))
    types = {t.data_type for t in fp16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT in types  # fp32 islands kept


def test_second_export_reuses_matching_artifacts(exports):
    again = exports["reports"]["fp32_again"]
    assert {m["status"] for m in again["models"].values()} == {"reused"}
    later = exports["reports"]["fp16"]["models"]
    assert later["core"]["status"] == "exported"  # precision changed: stale
    assert later["vae_encoder"]["status"] == "reused"  # the VAE stays fp32: still valid


def test_quantised_exports_start_from_the_repositorys_current_fp32_graph(exports):
    """int8 on cpu came after the fp32 export: it quantised that graph. int8 for gpu came after fp16,
    whose core replaced the fp32 one: it traced the module. Both validated (the tests above and below)."""
    reports = exports["reports"]
    assert reports["int8"]["models"]["core"]["fp32_graph"] == "the repository's fp32 core (manifest current)"
    assert reports["int8_gpu"]["models"]["core"]["fp32_graph"] == "traced"
    assert "fp32_graph" not in reports["fp16"]["models"]["core"]  # fp16 is not quantised from fp32


def test_int8_core_is_qdq_with_drift_reported(exports):
    core = exports["reports"]["int8"]["models"]["core"]
    q = core["quantization"]
    assert q["quantized_matmuls"] > 0 and q["quantized_matmuls"] < q["matmuls"]  # some excluded
    assert q["calibration_source"].startswith("procedural")
    # No --calibration-clips: the core's default (each sample is one clip with a row per task).
    assert q["calibration_clips"] == CORE_CLIPS and q["calibration_samples"] == CORE_CLIPS
    # Where the export's time went, phase by phase (export/RESULTS.md reads them).
    assert {"calibration_inputs_s", "calibrate_s", "quantize_s"} <= set(q) and "fp32_graph_s" in core
    # Half of 32x32 is under 128x128 pixels (calibration_grid): calibrated at the export grid itself.
    assert q["calibration_grid"] == f"{WINDOW}x{HEIGHT}x{WIDTH}"
    model = onnx.load(str(exports["cores"] / "int8" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    drift = core["drift"]
    assert set(drift) == {"depth", "normals", "segmentation", "densepose", "keypoints2d", "keypoints3d"}
    # The export-shape validation ran the drift clip's first task row (batch 1): neither core ran it again.
    assert core["drift_rows_from_validation"] == {"reference": 1, "candidate": 1}
    assert {"abs_rel"} <= set(drift["depth"]) and "mean_angle_deg" in drift["normals"]
    assert "alpha_mse" in drift["segmentation"] and "mean_px" in drift["keypoints2d"] and "mean_mm" in drift["keypoints3d"]
    # Decoded through the repository's exported VAE (reused from the fp32 run), dense rows only:
    # 4 dense tasks for each of the two cores.
    assert core["drift_vae"].startswith("onnxruntime") and "rows decoded: 8," in core["drift_vae"]
    assert exports["reports"]["int8"]["machine"]["class"] and "precision_chosen_by" in exports["reports"]["int8"]
    # The CPU target's report carries this machine's measured matmul peak per precision.
    peak = exports["reports"]["int8"]["machine"]["matmul_peak"]
    assert all(peak["peak"][p] > 0 for p in ("fp32", "bf16", "int8")) and peak["threads"] >= 1


def test_cpu_int8_core_drift_runs_at_its_calibration_grid(exports):
    full, half = (exports["reports"][t]["models"]["core"] for t in ("int8", "int8_half"))
    assert full["drift_grid"] == full["quantization"]["calibration_grid"] == f"{WINDOW}x{HEIGHT}x{WIDTH}"
    assert half["quantization"]["calibration_grid"] == half["drift_grid"] == f"{WINDOW}x{HEIGHT // 2}x{WIDTH // 2}"
    assert half["drift_region"] == f"dense tasks over every pixel ({WIDTH // 2}x{HEIGHT // 2})"
    # The value check still runs at the export shape, so no drift row is one of its rows.
    assert half["validation"][0]["dims"] == full["validation"][0]["dims"]
    assert half["validation"][0]["input_shapes"] == full["validation"][0]["input_shapes"]
    assert half["drift_rows_from_validation"] == {"reference": 0, "candidate": 0}
    assert set(half["drift"]) == set(full["drift"])
    # Another clip and grid: the same core's drift, not the same numbers.
    assert half["drift"]["depth"] != full["drift"]["depth"]
    # The GPU recipe quantises attention products: calibrated, and its drift measured, on the export grid.
    from thfm_serve.export.build import core_grid
    from thfm_serve.contract.specs import Target

    assert core_grid(Target.GPU, 256, 256) == (256, 256) and core_grid(Target.CPU, 256, 256) == (128, 128)


def _qdq_roles(path: Path) -> dict:
    """Activation zero-point dtypes/values, which quantised MatMuls multiply two activations, and the
    stored (quantised) weight matrices."""
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]

    def from_activation(name):  # DequantizeLinear of a QuantizeLinear output, not of a stored weight
        dq = producer.get(name)
        return dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] not in inits

    products = [n.name for n in model.graph.node if n.op_type == "MatMul" and all(from_activation(i) for i in n.input)]
    weights = [inits[n.input[0]] for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 2]
    return {"zero_points": zero_points, "activation_products": products, "weights": weights}


def test_int8_recipe_follows_the_target(exports):
    """cpu: uint8 asymmetric activations (onnxruntime's x86 u8 x s8 kernels), linears only;
    gpu: ModelOpt's int8 symmetric Q/DQ (zero points 0, as TensorRT takes them) on the linears'
    inputs only, the rest of the graph bf16 (tests below check the placement)."""
    cpu = _qdq_roles(exports["cores"] / "int8" / "model.onnx")
    gpu = _qdq_roles(exports["cores"] / "int8_gpu" / "model.onnx")
    assert cpu["zero_points"] and all(z.dtype == np.uint8 for z in cpu["zero_points"])
    assert any(z.item() != 0 for z in cpu["zero_points"])  # asymmetric: calibrated, not fixed at 0/128
    assert cpu["activation_products"] == []
    assert gpu["zero_points"] and all(z.dtype == np.int8 and not z.any() for z in gpu["zero_points"])
    # (ModelOpt fake-quantises weights as Q(w) -> DQ, which _qdq_roles takes for activations; the
    # placement tests below tell them apart.)
    reports = exports["reports"]
    # The CPU recipe is this machine's: 7-bit weights where it has no u8 x s8 dot-product instruction.
    from thfm_serve.export.quantize import recipe_for
    from thfm_serve.machine import read_cpu

    recipe = recipe_for("cpu")
    assert reports["int8"]["models"]["core"]["quantization"]["recipe"] == recipe.name
    assert recipe.reduce_range == (not read_cpu().int8_dot)
    weights = cpu["weights"]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) == (64 if recipe.reduce_range else 127)
    assert reports["int8_gpu"]["models"]["core"]["quantization"]["recipe"] == "modelopt-int8"


def _assert_tensorrt_placement(model: onnx.ModelProto, low: str) -> dict:
    """No Q/DQ on MatMul outputs or around Softmax, attention products unquantised, the linears'
    inputs quantised, and every compute op outside the Q/DQ in the 16-bit type `low`."""
    from thfm_serve.export.tensorrt_ptq import qdq_placement

    p = qdq_placement(model)
    assert p["quantized_outputs"] == [] and p["softmax_qdq"] == [] and p["activation_products"] == []
    # Every block's q, k, v, o of two attentions and two FFN linears (tiny: 2 blocks), nothing excluded.
    assert p["weight_matmuls"] == p["quantized_matmuls"] == 2 * (4 + 4 + 2)
    assert p["matmuls"] - p["quantized_matmuls"] >= 2 * 2 + 2  # QK^T, PV per block, and the excluded linears
    for op in ("MatMul", "Softmax", "Add", "LayerNormalization", "Conv"):
        assert set(p["compute_dtypes"][op]) == {low}, (op, p["compute_dtypes"][op])
    return p


def test_gpu_int8_placement_lets_tensorrt_fuse_and_keeps_accuracy(exports):
    core = exports["reports"]["int8_gpu"]["models"]["core"]
    _assert_tensorrt_placement(onnx.load(str(exports["cores"] / "int8_gpu" / "model.onnx")), "bfloat16")
    assert core["quantization"]["high_precision_dtype"] == "bf16"
    # The export validation (fatal) ran the bf16 Q/DQ graph itself against PyTorch fp32 at three shapes.
    assert core["runner"] == "onnx-reference-evaluator"
    assert len(core["validation"]) == 3 and all(o["ok"] for v in core["validation"] for o in v["outputs"].values())


def test_modelopt_leaves_this_process_s_onnxruntime_alone(exports):
    """ModelOpt patches onnxruntime.quantization when it quantises; it runs in a child process, so
    the CPU recipe in this process (which already ran the GPU export) keeps onnxruntime's own code."""
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    assert MinMaxCalibrater.collect_data.__module__ == "onnxruntime.quantization.calibrate"
    assert MinMaxCalibrater.compute_data.__module__ == "onnxruntime.quantization.calibrate"


def test_gpu_fp8_through_the_same_tool(exports, tmp_path):
    """--precision fp8: ModelOpt's E4M3 Q/DQ with the same placement, within the export tolerances
    (the graph run by onnx's reference evaluator, as onnxruntime's CPU provider has no bf16 kernels)."""
    from onnx.reference import ReferenceEvaluator

    from thfm_serve.export.quantize import DEFAULT_EXCLUDE
    from thfm_serve.contract.specs import tolerance_for
    from thfm_serve.export.tensorrt_ptq import quantize_for_tensorrt

    rng = np.random.default_rng(5)
    text = np.load(exports["cores"] / "fp32" / "task_embeddings.npz")
    text = np.stack([text[k] for k in text.files]).astype(np.float32)
    latent = rng.standard_normal((len(text), 16, 2, 4, 6)).astype(np.float32)
    out = tmp_path / "fp8.onnx"
    info = quantize_for_tensorrt(exports["cores"] / "fp32" / "model.onnx", out, [{"latent": latent, "text": text}],
                                 "fp8", DEFAULT_EXCLUDE)
    model = onnx.load(str(out))
    assert info["recipe"] == "modelopt-fp8"
    assert any(i.data_type == onnx.TensorProto.FLOAT8E4M3FN for i in model.graph.initializer)
    _assert_tensorrt_placement(model, "bfloat16")
    feed = {"latent": latent[:2], "text": text[:2]}
    got = dict(zip([o.name for o in model.graph.output], ReferenceEvaluator(model).run(None, feed)))
    ref = _run_onnx(exports["cores"] / "fp32" / "model.onnx", feed, "fp32")
    for name, kind in (("pred_latent", "latent"), ("kp2d", "keypoints"), ("kp3d", "keypoints")):
        ok, max_abs, _ = tolerance_for("fp8", kind).check(np.asarray(got[name], np.float32), ref[name])
        assert ok, (name, max_abs)


def test_fp16_keeps_the_residual_stream_in_fp32(exports):
    """The fp16 graph: every residual Add at block level is fp32, the linears inside run in fp16."""
    from thfm_serve.export.quantize import node_scopes

    model = onnx.shape_inference.infer_shapes(onnx.load(str(exports["cores"] / "fp16" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    block_adds, block_casts, linears = [], [], []
    for n in model.graph.node:
        scopes = node_scopes(n)
        module = scopes[-2] if len(scopes) > 1 else ""  # the last scope is the op itself
        parts = module.split(".")
        if len(parts) == 4 and parts[:3] == ["core", "transformer", "blocks"]:  # the block's own ops
            if n.op_type == "Add":
                block_adds.append(types.get(n.output[0]))
            if n.op_type == "Cast":
                block_casts.append(next(a.i for a in n.attribute if a.name == "to"))
        if n.op_type == "MatMul" and ".blocks." in module and (".ffn" in module or ".to_" in module):
            linears.append(types.get(n.output[0]))
    # Residual adds (self-attention, cross-attention, feed-forward) and the modulation: all fp32, and
    # nothing in a block casts the hidden states down to fp16 (the sub-layers do that themselves).
    assert len(block_adds) >= 2 * 3  # tiny: 2 blocks
    assert set(block_adds) == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 not in block_casts
    assert linears and set(linears) == {onnx.TensorProto.FLOAT16}


def test_low_precision_reports(exports):
    fp16 = exports["reports"]["fp16"]["models"]["core"]
    assert fp16["runner"] == "onnxruntime-cpu" and "drift" in fp16
    assert "vs_torch_fp16" in fp16["validation"][0]
    bf16 = exports["reports"]["bf16"]["models"]["core"]
    # bf16 ONNX cannot run in onnxruntime CPU; the graph itself ran in onnx's reference evaluator.
    assert bf16["runner"] == "onnx-reference-evaluator" and bf16["drift_runner"] == "onnx-reference-evaluator"


def test_gpu_target_without_tensorrt_fails_after_the_onnx_stage(exports, tmp_path, caplog):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    repo = tmp_path / "repo"
    shutil.copytree(exports["repo"], repo)  # core (bf16) and VAEs are current: only the engine is left
    with caplog.at_level(logging.ERROR):
        code = main(["export", "--checkpoint", str(exports["checkpoint"]), "--repo", str(repo), "--target", "gpu",
                     "--precision", "bf16", *_grid_args(), "--no-configs"])
    assert code == 2
    assert "TensorRT is not installed" in caplog.text
    report = json.loads((repo / "export_report.json").read_text())
    assert report["engine"]["status"] == "failed" and not (repo / "core" / "1" / "model.plan").exists()
    assert report["models"]["core"]["status"] == "reused"
    with pytest.raises(ExportError, match="TensorRT"):
        export_repository(exports["checkpoint"], repo, "gpu", "bf16", **SHAPE, write_configs=False)
    # The Triton configs do not depend on the plan: they are written although the engine stage stopped,
    # and the repository then lacks only the plan. No --precision on gpu means bf16.
    assert not (repo / "core" / "config.pbtxt").exists()
    with pytest.raises(ExportError, match="TensorRT"):
        export_repository(exports["checkpoint"], repo, "gpu", None, **SHAPE)
    assert (repo / "core" / "config.pbtxt").is_file() and (repo / "thfm" / "config.pbtxt").is_file()
    report = json.loads((repo / "export_report.json").read_text())
    assert report["precision"] == "bf16" and report["models"]["core"]["status"] == "reused"
    manifest = json.loads((repo / "thfm_repository.json").read_text())
    assert manifest["target"] == "gpu" and manifest["precision"] == "bf16"


def _config(exports):
    from thfm_serve.config import ThfmConfig

    return ThfmConfig.load(exports["checkpoint"] / "thfm" / "config.json")


# --- CLI errors: one line, exit 2, no traceback --------------------------------------------------

def _cli(args, caplog):
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = main(["export", *args])
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    return code, errors


@pytest.mark.parametrize("args,message", [
    (["--precision", "fp4"], "unknown precision 'fp4'"),
    (["--precision", "fp8"], "fp8 cannot run on --target cpu"),
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--precision", "bf16"], "cannot run on --target cpu"),
    (["--frames", "6"], "not of the form 4n+1"),
    (["--height", "40"], "not a multiple of 16"),
    (["--frames", "9", "--max-frames", "5"], "outside the profile"),
    (["--only", "text_encoder"], "unknown model"),
])
def test_cli_rejects_bad_options(tiny_checkpoint, tmp_path, caplog, args, message):
    code, errors = _cli(["--checkpoint", str(tiny_checkpoint), "--repo", str(tmp_path / "r"), *args], caplog)
    assert code == 2
    assert len(errors) == 1 and message in errors[0].getMessage()
    assert errors[0].exc_info is None  # no traceback
    assert not (tmp_path / "r" / "core").exists()  # nothing exported


def test_cli_rejects_bad_checkpoints(tiny_checkpoint, tmp_path, caplog):
    code, errors = _cli(["--checkpoint", str(tmp_path / "nope"), "--repo", str(tmp_path / "r")], caplog)
    assert code == 2 and "does not exist" in errors[0].getMessage()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0corrupt")
    code, errors = _cli(["--checkpoint", str(broken), "--repo", str(tmp_path / "r2"), *_shape_args()], caplog)
    assert code == 2 and "cannot load the Wan transformer" in errors[0].getMessage()

    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_checkpoint, mismatched)
    cfg = json.loads((mismatched / "thfm" / "config.json").read_text())
    cfg["text_dim"] = 64  # the transformer's text_dim is 32
    (mismatched / "thfm" / "config.json").write_text(json.dumps(cfg))
    code, errors = _cli(["--checkpoint", str(mismatched), "--repo", str(tmp_path / "r3"), *_shape_args()], caplog)
    assert code == 2 and "text_dim" in errors[0].getMessage()

    missing = tmp_path / "missing"
    shutil.copytree(tiny_checkpoint, missing)
    shutil.rmtree(missing / "vae")
    code, errors = _cli(["--checkpoint", str(missing), "--repo", str(tmp_path / "r4")], caplog)
    assert code == 2 and "missing vae" in errors[0].getMessage()


def test_cli_refuses_a_repository_named_triton(tiny_checkpoint, tmp_path, caplog):
    code, errors = _cli(["--checkpoint", str(tiny_checkpoint), "--repo", str(tmp_path / "triton")], caplog)
    assert code == 2 and "named 'triton'" in errors[0].getMessage()


def test_vae_pair_exported_first_then_the_core_writes_the_configs(request, tiny_checkpoint, tmp_path_factory):
    """The VAE pair alone into a new repository is a complete export (the Triton configs wait for the
    core, whose THFM config they need); the export that adds the core writes them."""
    from serverfix import copy_export, exported_repo

    repo = copy_export(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, **SHAPE),
                       tmp_path_factory.mktemp("vae_first") / "model_repository", models=[VAE_ENCODER, VAE_DECODER])
    first = export_repository(tiny_checkpoint, repo, "cpu", "fp32", **SHAPE, models=[VAE_ENCODER, VAE_DECODER])
    assert {m["status"] for m in first["models"].values()} == {"reused"}
    # (The VAE folders came with the served export's configs; nothing else was written.)
    assert first["configs"].startswith("not written: no exported core")
    assert {p.parent.name for p in repo.glob("*/config.pbtxt")} == {VAE_ENCODER, VAE_DECODER}
    assert json.loads((repo / "export_report.json").read_text())["configs"] == first["configs"]
    second = export_repository(tiny_checkpoint, repo, "cpu", "fp32", **SHAPE, models=["core"])
    assert "configs" not in second and second["models"]["core"]["status"] == "exported"
    written = {p.parent.name for p in repo.glob("*/config.pbtxt")}
    assert {"core", "thfm", "preprocess", VAE_ENCODER, VAE_DECODER} < written, written


def _grid_args():
    return ["--frames", str(SHAPE["frames"]), "--height", str(SHAPE["height"]), "--width", str(SHAPE["width"])]


def _shape_args():
    return [*_grid_args(), "--only", "core", "--no-configs"]


def test_hook_calibration_matches_onnxruntimes_calibrator(exports, tmp_path):
    """The CPU recipe's ranges come from torch forward hooks on the Linears; onnxruntime's own MinMax
    calibrator on the exported fp32 graph, fed the same samples, measures the same tensors."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

    from thfm_serve.export.precision import lowered_core
    from thfm_serve.export.quantize import DEFAULT_EXCLUDE, RECIPES, _Reader, hook_calibration_cache, matmuls_to_quantize

    fp32 = exports["cores"] / "fp32" / "model.onnx"
    model = onnx.load(str(fp32), load_external_data=False)
    nodes, _ = matmuls_to_quantize(model, RECIPES["cpu"], DEFAULT_EXCLUDE)
    rng = np.random.default_rng(3)
    text_len = model.graph.input[1].type.tensor_type.shape.dim[1].dim_value or 16
    text_dim = model.graph.input[1].type.tensor_type.shape.dim[2].dim_value
    samples = [{"latent": rng.standard_normal((2, 16, 2, 4, 6)).astype(np.float32),
                "text": rng.standard_normal((2, text_len, text_dim)).astype(np.float32)} for _ in range(2)]
    cache = tmp_path / "ranges.json"
    count = hook_calibration_cache(model, nodes, lowered_core(_reference_core(exports["checkpoint"]), Precision.FP32),
                                   samples, cache)
    ours = load_tensors_data(cache)
    assert count == len(ours.data) >= len(nodes) + 1  # inputs shared by q/k/v count once

    calibrator = create_calibrator(fp32, ["MatMul"], augmented_model_path=str(tmp_path / "augmented.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)
    calibrator.collect_data(_Reader(samples))
    theirs = calibrator.compute_data()
    for name, rv in ours.data.items():
        lo, hi = (float(v) for v in rv.range_value)
        t_lo, t_hi = (float(np.asarray(v).reshape(-1)[0]) for v in theirs[name].range_value)
        scale = max(abs(t_lo), abs(t_hi), 1e-6)
        assert abs(lo - t_lo) <= 1e-4 * scale and abs(hi - t_hi) <= 1e-4 * scale, (name, (lo, hi), (t_lo, t_hi))


def test_bf16_calibration_forwards_give_the_fp32_ranges(exports):
    """Where the CPU has bf16 matmuls the calibration forwards run in bf16 autocast: every Linear's
    range stays within 2 % of the fp32 forwards' (an int8 step is 0.4 % of a range), and they did run
    in bf16 (the ranges are not the fp32 ones bit for bit)."""
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.export.quantize import torch_linear_ranges

    module = lowered_core(_reference_core(exports["checkpoint"]), Precision.FP32)
    rng = np.random.default_rng(5)
    text = onnx.load(str(exports["cores"] / "fp32" / "model.onnx"), load_external_data=False).graph.input[1]
    text_len, text_dim = (d.dim_value for d in text.type.tensor_type.shape.dim[1:])
    text_len = text_len or 16  # as the hook test above: a dynamic text length reads 0
    samples = [{"latent": rng.standard_normal((2, 16, 2, 4, 6)).astype(np.float32),
                "text": rng.standard_normal((2, text_len, text_dim)).astype(np.float32)} for _ in range(2)]
    fp32, bf16 = torch_linear_ranges(module, samples), torch_linear_ranges(module, samples, "bf16")
    assert fp32.keys() == bf16.keys() and len(fp32) > 10
    differs = 0
    for name, a in fp32.items():
        b = bf16[name]
        for i in (0, 2):  # input range, output range
            scale = max(abs(a[i]), abs(a[i + 1]), 1e-6)
            assert abs(a[i] - b[i]) <= 0.02 * scale and abs(a[i + 1] - b[i + 1]) <= 0.02 * scale, (name, a, b)
        differs += a != b
    assert differs > len(fp32) // 2
    with pytest.raises(ExportError, match="calibration dtype 'fp16'"):
        torch_linear_ranges(module, samples, "fp16")


@pytest.mark.parametrize("flags,dtype", [("avx2 fma avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", "bf16"),
                                         ("avx2 fma avx512f avx512_vnni avx512_bf16", "bf16"),
                                         ("avx2 fma", "fp32"),  # bf16 emulated: slower than fp32
                                         ("sse4_2 avx", "fp32")])
def test_calibration_dtype_by_machine(flags, dtype):
    from thfm_serve.export.quantize import calibration_dtype_for
    from thfm_serve.machine import parse_cpuinfo

    assert calibration_dtype_for(parse_cpuinfo(f"processor\t: 0\nmodel name\t: cpu\nflags\t\t: fpu {flags}\n")) == dtype


def test_int8_calibration_method_per_recipe(exports):
    q = {tag: exports["reports"][tag]["models"]["core"]["quantization"] for tag in ("int8", "int8_gpu")}
    assert q["int8"]["calibration"].startswith("torch forward hooks")  # linears only: hooks see them all
    assert q["int8_gpu"]["calibration"] == "ModelOpt max calibrator (onnxruntime CPU)"
    # A calibrated graph is validated on inputs like its calibration data, every other one on random inputs.
    assert "through the VAE encoder" in exports["reports"]["int8"]["models"]["core"]["validation_inputs"]
    assert "validation_inputs" not in exports["reports"]["fp32"]["models"]["core"]


def test_quantized_external_data_is_readable(exports, tmp_path):
    """onnxruntime's quantizer writes external data as 0600; the export makes it readable for a server
    running as another user."""
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.export.quantize import quantize_core

    rng = np.random.default_rng(5)
    fp32 = exports["cores"] / "fp32" / "model.onnx"
    text_dim = onnx.load(str(fp32), load_external_data=False).graph.input[1].type.tensor_type.shape.dim[2].dim_value
    samples = [{"latent": rng.standard_normal((1, 16, 2, 4, 6)).astype(np.float32),
                "text": rng.standard_normal((1, 16, text_dim)).astype(np.float32)}]
    out = tmp_path / "q" / "model.onnx"
    quantize_core(fp32, out, samples, "cpu", external_data=True,
                  module=lowered_core(_reference_core(exports["checkpoint"]), Precision.FP32))
    data = out.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_mode & 0o444 == 0o444
