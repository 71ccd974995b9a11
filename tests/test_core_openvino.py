"""`thfm export --core-runtime openvino`: the int8 Q/DQ core compiled by OpenVINO's CPU plugin (its
linears int8, its float remainder bf16 where the CPU has bf16 instructions, f32 elsewhere).

One module-scoped export of the tiny checkpoint: the served tests' cached cpu/fp32 repository, copied,
with its core re-exported as int8 in OpenVINO (the fp32 VAE reused). Then: what the spec and the
manifests say; the session OpenVINO serves with against onnxruntime's run of the same graph and
against the fp32 PyTorch core; batches row by row; the refusals; and the repository served by a real
tritonserver. The machine's choice of runtime per CPU class: tests/test_machine.py.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from thfm_serve.contract.protocol import CORE, VAE_DECODER, VAE_ENCODER
from thfm_serve.contract.specs import Precision, Runtime, SubmodelSpec, Target, build_specs
from thfm_serve.errors import ShapeError, ThfmError
from thfm_serve.export import export_repository
from thfm_serve.export.calibration import task_texts
from thfm_serve.export.precision import check_core_runtime
from thfm_serve.machine import read_cpu
from thfm_serve.serving.sessions import OpenVinoSession, create_session, openvino_inference_precision, runs_in_openvino

logger = logging.getLogger(__name__)

WINDOW, HEIGHT, WIDTH = 5, 32, 32


@pytest.fixture(scope="module")
def ov_repo(request, tiny_checkpoint, tmp_path_factory):
    from serverfix import exported_repo

    repo = tmp_path_factory.mktemp("core_ov") / "repo"
    shutil.copytree(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, WINDOW, HEIGHT, WIDTH), repo)
    report = export_repository(tiny_checkpoint, repo, "cpu", "int8", frames=WINDOW, height=HEIGHT, width=WIDTH,
                               calibration_clips=1, core_runtime="openvino")
    assert report["models"][CORE]["status"] == "exported"
    assert {report["models"][n]["status"] for n in (VAE_ENCODER, VAE_DECODER)} == {"reused"}
    return repo, report


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    from thfm_serve.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint, text_encoder=False)


def _core_feeds(ck, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Core inputs as serving builds them: a latent of the window and task embeddings of the checkpoint."""
    rng = np.random.default_rng(seed)
    lt, hp, wp = (WINDOW - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8
    return {"latent": rng.standard_normal((batch, 16, lt, hp, wp)).astype(np.float32),
            "text": task_texts(ck, list(ck.tasks)[:batch])}


# --- the spec -------------------------------------------------------------------------------------------

def test_the_runtime_is_part_of_the_spec_and_written_only_where_it_is_not_the_default(ck):
    default = build_specs(ck.config, WINDOW, HEIGHT, WIDTH, precision="int8", vae_precision="bf16")
    ov = build_specs(ck.config, WINDOW, HEIGHT, WIDTH, precision="int8", vae_precision="bf16", core_runtime="openvino")
    assert [default[n].runtime for n in (CORE, VAE_ENCODER, VAE_DECODER)] == ["onnxruntime", "openvino", "openvino"]
    assert ov[CORE].runtime == "openvino" and runs_in_openvino(ov[CORE]) and not runs_in_openvino(default[CORE])
    # Written only where it says more than the precision: manifests' keys of earlier exports still match.
    assert "runtime" not in default[CORE].to_dict() and "runtime" not in default[VAE_DECODER].to_dict()
    assert ov[CORE].to_dict()["runtime"] == "openvino"
    for spec in (*default.values(), *ov.values()):
        back = SubmodelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert back.runtime == spec.runtime and back.to_dict() == spec.to_dict()
    with pytest.raises(ThfmError, match="unknown runtime 'tensorflow'; choose from onnxruntime, openvino"):
        build_specs(ck.config, WINDOW, HEIGHT, WIDTH, core_runtime="tensorflow")


def test_openvino_core_is_refused_where_it_cannot_run(tiny_checkpoint, tmp_path):
    with pytest.raises(ThfmError, match="--core-runtime openvino is for --target cpu"):
        check_core_runtime(Target.GPU, Precision.INT8, Runtime.OPENVINO)
    with pytest.raises(ThfmError, match="int8 or fp32 core .* got --precision fp16"):
        check_core_runtime(Target.CPU, Precision.FP16, Runtime.OPENVINO)
    check_core_runtime(Target.GPU, Precision.BF16, Runtime.ONNXRUNTIME)  # the default is never refused
    with pytest.raises(ThfmError, match="--core-runtime openvino is for --target cpu"):
        export_repository(tiny_checkpoint, tmp_path / "r", Target.GPU, "int8", core_runtime="openvino")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_cli_default_follows_the_machine_and_names_the_choice(monkeypatch):
    """`thfm export` without --core-runtime passes None (the machine's choice); the Python API's
    default stays onnxruntime, as its VAE stays fp32."""
    import inspect

    from thfm_serve.options import ExportOptions

    assert ExportOptions("ck", "r").export_kwargs()["core_runtime"] is None
    assert ExportOptions("ck", "r", core_runtime="openvino").validate().export_kwargs()["core_runtime"] == "openvino"
    with pytest.raises(ThfmError, match="unknown runtime"):
        ExportOptions("ck", "r", core_runtime="ov").validate()
    assert inspect.signature(export_repository).parameters["core_runtime"].default == Runtime.ONNXRUNTIME


# --- the exported core --------------------------------------------------------------------------------

def test_report_manifest_and_repository_say_openvino(ov_repo):
    repo, report = ov_repo
    assert report["core_runtime"] == "openvino" and report["core_runtime_chosen_by"] == "--core-runtime"
    entry = report["models"][CORE]
    hint = openvino_inference_precision("int8", read_cpu())
    assert entry["runner"] == entry["drift_runner"] == f"openvino-cpu (int8 graph, {hint} inference precision)"
    assert entry["runtime"]["runtime"] == "openvino-cpu" and entry["runtime"]["inference_precision"] == hint
    assert entry["quantization"]  # the same Q/DQ graph as for onnxruntime
    manifest = json.loads((repo / CORE / "1" / "manifest.json").read_text())
    assert manifest["spec"]["runtime"] == manifest["key"]["spec"]["runtime"] == "openvino"
    assert manifest["key"]["runtime"]["inference_precision"] == hint
    served = json.loads((repo / "thfm_repository.json").read_text())
    assert served["specs"][CORE]["runtime"] == "openvino" and "runtime" not in served["specs"][VAE_DECODER]


def test_the_onnxruntime_core_is_not_reused_for_openvino(ov_repo, tiny_checkpoint, tmp_path):
    """The graph is the same, but it was validated in another runtime: switching runtime exports again."""
    repo = tmp_path / "repo"
    shutil.copytree(ov_repo[0], repo)
    report = export_repository(tiny_checkpoint, repo, "cpu", "int8", frames=WINDOW, height=HEIGHT, width=WIDTH,
                               calibration_clips=1, models=[CORE])
    assert report["models"][CORE]["status"] == "exported" and report["core_runtime"] == "onnxruntime"
    assert report["models"][CORE]["runner"] == "onnxruntime-cpu"
    assert "runtime" not in json.loads((repo / CORE / "1" / "manifest.json").read_text())["spec"]


def test_openvino_core_agrees_with_onnxruntime_and_pytorch_and_batches_row_by_row(ov_repo, ck):
    """The served session (OnnxModel.load) is OpenVINO's; on the same int8 graph it agrees with
    onnxruntime within the spec's int8 tolerances, and both with the fp32 PyTorch core; a batch of
    three gives what three single rows give, from one compiled shape (the core keeps one)."""
    from thfm_serve import serving
    from thfm_serve.export.precision import lowered_core

    repo, _ = ov_repo
    model = serving.OnnxModel.load(repo / CORE, "1", CORE)
    assert isinstance(model.session, OpenVinoSession) and model.session.max_shapes == 1
    assert model.session.inference_precision == openvino_inference_precision("int8", read_cpu())
    feeds = _core_feeds(ck, 3)
    got = model.run(feeds)
    ort = create_session(repo / CORE / "1" / "model.onnx", threads=2)
    ref_int8 = dict(zip(model.spec.output_names, ort.run(model.spec.output_names, feeds)))
    with torch.no_grad():
        ref_fp32 = [t.numpy() for t in lowered_core(ck.core(), Precision.FP32)(
            *[torch.from_numpy(feeds[n]) for n in model.spec.input_names])]
    for i, name in enumerate(model.spec.output_names):
        tol = model.spec.tolerances[name]
        for ref in (ref_int8[name], ref_fp32[i]):
            ok, max_abs, _ = tol.check(got[name], ref)
            assert ok, (name, max_abs)
        logger.info("%s: openvino vs onnxruntime int8 max abs %.4g", name, np.abs(got[name] - ref_int8[name]).max())
    rows = [model.run({n: v[i : i + 1] for n, v in feeds.items()}) for i in range(3)]
    for name in model.spec.output_names:
        np.testing.assert_array_equal(got[name], np.concatenate([r[name] for r in rows]))
    assert len(model.session._requests) == 1
    with pytest.raises(ShapeError, match=r"disagree on the batch size: latent \(3, 16, .*text \(2, "):
        model.session.run(None, {"latent": feeds["latent"], "text": feeds["text"][:2]})
    # Another grid compiles again and drops the first (max_shapes 1).
    small = {n: v[:1] for n, v in _core_feeds(ck, 1).items()}
    small["latent"] = small["latent"][..., :2, :2]
    assert model.run(small)["pred_latent"].shape == (1, 16, 2, 2, 2)
    assert len(model.session._requests) == 1


@pytest.mark.server
def test_thfm_serves_the_openvino_core_repository(ov_repo, tmp_path):
    """tritonserver's core model runs the int8 graph in OpenVINO and the entry model answers as the
    same repository's models do in process."""
    from serverfix import assert_served_as_in_process

    assert_served_as_in_process(ov_repo[0], tmp_path, ["depth", "segmentation", "keypoints2d", "keypoints3d"],
                                (WINDOW, HEIGHT, WIDTH))
