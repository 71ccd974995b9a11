"""The Triton model repository without a server: generated configs against Triton's ModelConfig
schema, the repository writer, the model.py skeletons, and the serving functions the models call
(checked against the in-process pipeline).

The serving functions are driven here by PyTorch stand-ins for the exported graphs (the VAE ones
refuse any frame count but the window, as the exported graphs do); the real ONNX graphs behind a
real tritonserver are tests/test_serving_server.py's job.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from thfm_serve import serving
from thfm_serve.contract import protocol
from thfm_serve.cli import main as cli_main
from thfm_serve.config import DENSE_TASKS, PRESETS, SPARSE_TASKS, TASKS, ThfmConfig
from thfm_serve.errors import CheckpointError, ShapeError, TaskError, ThfmError, VideoError
from thfm_serve.contract.specs import SubmodelSpec, TensorSpec, Tolerance, build_specs, tolerance_for
from thfm_serve.contract.params import model_parameters, read_params
from thfm_serve.contract.tasks import OUTPUT_KEYS
from thfm_serve.repository import (
    ALL_MODELS, SOURCES, check_repository, default_grid, model_configs, write_repository,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ThfmConfig(**PRESETS["tiny"].thfm)  # window 9, 64x64, 24 joints, text 16x32


def parse(text: str) -> model_config_pb2.ModelConfig:
    """Strict parse: an unknown field or a bad enum value raises ParseError."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def specs():
    return build_specs(TINY)


def tiny_embeddings(cfg: ThfmConfig = TINY) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {t: rng.standard_normal((cfg.text_len, cfg.text_dim)).astype(np.float32) for t in cfg.tasks}


# --- configs against Triton's schema ----------------------------------------------------------

@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_every_config_parses_strictly_as_a_triton_model_config(specs, target):
    configs = model_configs(specs, target, "fp32", TINY, default_grid(specs), serving.Limits())
    assert set(configs) == set(ALL_MODELS)
    for name, text in configs.items():
        cfg = parse(text)
        assert cfg.name == name
        assert bool(cfg.backend) != bool(cfg.platform), f"{name}: exactly one of backend/platform"


def test_the_strict_parse_rejects_an_unknown_field(specs):
    text = model_configs(specs, "gpu", "fp32", TINY, default_grid(specs), serving.Limits())["core"]
    with pytest.raises(text_format.ParseError):
        parse(text + "\nmax_batch_sizes: 4\n")


def test_each_config_header_names_its_own_precision():
    """An int8 VAE beside an int8 core and beside an fp32 core: the VAE configs say int8 either way."""
    for core in ("int8", "fp32"):
        specs = build_specs(TINY, precision=core, vae_precision="int8")
        text = model_configs(specs, "cpu", core, TINY, default_grid(specs), serving.Limits())
        assert f"precision {core})" in text["core"].splitlines()[0]
        for name in (protocol.VAE_ENCODER, protocol.VAE_DECODER):
            assert "precision int8)" in text[name].splitlines()[0]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_submodel_configs_follow_the_export_specs(specs, target):
    configs = {n: parse(t) for n, t in model_configs(specs, target, "fp32", TINY, default_grid(specs),
                                                       serving.Limits()).items()}
    dtype = {"float32": model_config_pb2.TYPE_FP32}
    for name in (protocol.VAE_ENCODER, protocol.CORE, protocol.VAE_DECODER):
        spec, cfg = specs[name], configs[name]
        assert cfg.max_batch_size == spec.max_batch == 6
        assert [t.name for t in cfg.input] == spec.input_names
        assert [t.name for t in cfg.output] == spec.output_names
        for t in list(cfg.input) + list(cfg.output):
            assert list(t.dims) == spec.triton_dims(t.name, drop_batch=True), f"{name}.{t.name}"
            assert t.data_type == dtype[spec.tensor(t.name).dtype]
        kind = model_config_pb2.ModelInstanceGroup.KIND_CPU if target == "cpu" else model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert [g.kind for g in cfg.instance_group] == [kind]
    # The VAE graphs take one frame count: the window, static in their configs.
    assert list(configs[protocol.VAE_ENCODER].input[0].dims) == [3, 9, -1, -1]
    # Dynamic batching where it pays: the core (one row per task) and the decoder.
    assert configs[protocol.CORE].HasField("dynamic_batching")
    assert configs[protocol.VAE_DECODER].HasField("dynamic_batching")
    assert not configs[protocol.VAE_ENCODER].HasField("dynamic_batching")
    if target == "gpu":
        assert configs[protocol.CORE].platform == "tensorrt_plan"
        assert configs[protocol.CORE].default_model_filename == "model.plan"
        for vae in (protocol.VAE_ENCODER, protocol.VAE_DECODER):
            assert configs[vae].platform == "onnxruntime_onnx"
    else:
        assert all(configs[n].backend == "python" for n in (protocol.VAE_ENCODER, protocol.CORE, protocol.VAE_DECODER))
    for name in (protocol.PREPROCESS, protocol.POSTPROCESS_DENSE, protocol.POSTPROCESS_SPARSE, protocol.ENTRY_MODEL):
        assert configs[name].backend == "python"
        assert [g.kind for g in configs[name].instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]


def test_entry_config_carries_the_protocol_parameters(specs):
    limits = serving.Limits(max_frames=100, max_pixels=640 * 480, max_request_bytes=1 << 20, max_response_bytes=3 << 20)
    cfg = parse(model_configs(specs, "cpu", "fp32", TINY, default_grid(specs), limits)[protocol.ENTRY_MODEL])
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    # The overlap is the windowing policy's default for a 9-frame window (an eighth of it, at least 1).
    assert params == {protocol.PARAM_WINDOW_FRAMES: "9", protocol.PARAM_HEIGHT: "64", protocol.PARAM_WIDTH: "64",
                      protocol.PARAM_OVERLAP: "1", protocol.PARAM_MAX_FRAMES: "100", protocol.PARAM_MAX_PIXELS: str(640 * 480),
                      protocol.PARAM_MAX_REQUEST_BYTES: str(1 << 20), protocol.PARAM_MAX_RESPONSE_BYTES: str(3 << 20),
                      protocol.PARAM_VAE_MAX_BATCH: "6", protocol.PARAM_WINDOW_PIPELINE: "0"}
    gpu = parse(model_configs(specs, "gpu", "bf16", TINY, default_grid(specs), limits)[protocol.ENTRY_MODEL])
    assert gpu.parameters[protocol.PARAM_WINDOW_PIPELINE].string_value == "1"  # on by default on a GPU
    cpu_on = parse(model_configs(specs, "cpu", "fp32", TINY, default_grid(specs), limits,
                                 window_pipeline=True)[protocol.ENTRY_MODEL])
    assert read_params(model_parameters(json.loads(_as_json(cpu_on)))).window_pipeline
    assert [t.name for t in cfg.input] == [protocol.INPUT_VIDEO, protocol.INPUT_FRAMES, protocol.INPUT_TASKS,
                                           protocol.INPUT_OUTPUT_SIZE]
    assert [t.optional for t in cfg.input] == [True, True, False, True]
    assert [t.name for t in cfg.output] == [protocol.OUTPUT_FOR_TASK[t] for t in TASKS] + [protocol.OUTPUT_JOINT_NAMES]
    # Defaults are safe (bounded) and what serving reads back.
    default = parse(model_configs(specs, "cpu", "fp32", TINY, default_grid(specs), serving.Limits())[protocol.ENTRY_MODEL])
    read = serving.limits_from_params(serving.model_parameters(json.loads(_as_json(default))))
    assert read == serving.Limits() and 0 < read.max_frames and 0 < read.max_pixels and 0 < read.max_request_bytes


def _as_json(cfg: model_config_pb2.ModelConfig) -> str:
    """The config as tritonclient's get_model_config(as_json=True) gives it: proto field names
    (string_value), which is what model_parameters reads; protobuf's default camelCase would leave
    every parameter unread."""
    from google.protobuf import json_format

    return json_format.MessageToJson(cfg, preserving_proto_field_name=True)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_ensembles_are_wired_consistently(specs, target):
    """Every step input is an ensemble input or an earlier step's output, every ensemble output is
    produced, step tensors exist in the step model's config with the same dtype."""
    configs = {n: parse(t) for n, t in model_configs(specs, target, "fp32", TINY, default_grid(specs),
                                                       serving.Limits()).items()}
    for name, paths in ((protocol.DENSE_ENSEMBLE, DENSE_TASKS), (protocol.SPARSE_ENSEMBLE, SPARSE_TASKS)):
        ens = configs[name]
        assert ens.platform == "ensemble"
        available = {t.name: t.data_type for t in ens.input}
        for step in ens.ensemble_scheduling.step:
            model = configs[step.model_name]
            inputs = {t.name: t.data_type for t in model.input}
            outputs = {t.name: t.data_type for t in model.output}
            for model_tensor, ens_tensor in step.input_map.items():
                assert ens_tensor in available, f"{name}: {step.model_name} reads {ens_tensor} before it exists"
                assert inputs[model_tensor] == available[ens_tensor]
            for model_tensor, ens_tensor in step.output_map.items():
                available[ens_tensor] = outputs[model_tensor]
        assert {t.name for t in ens.output} <= set(available)
        assert [t.name for t in ens.output][: len(paths)] == [protocol.OUTPUT_FOR_TASK[t] for t in paths]
        # One core step per task: the core's dynamic batcher merges them.
        assert sum(s.model_name == protocol.CORE for s in ens.ensemble_scheduling.step) == len(paths)


# --- the writer ---------------------------------------------------------------------------------

def _fake_graphs(repo: Path, target: str) -> None:
    for name in ("vae_encoder", "core", "vae_decoder"):
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        (repo / name / "1" / "model.onnx").write_bytes(b"")
    if target == "gpu":
        (repo / "core" / "1" / "model.plan").write_bytes(b"")


def test_write_repository_writes_a_servable_layout(tmp_path, specs):
    repo = tmp_path / "repo"
    _fake_graphs(repo, "cpu")
    summary = write_repository(repo, specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings())
    assert summary["missing"] == []
    for name in ALL_MODELS:
        parse((repo / name / "config.pbtxt").read_text())
    for name in summary["python_models"]:
        assert (repo / name / "1" / "model.py").read_text() == (SOURCES / name / "model.py").read_text()
    assert set(summary["python_models"]) == set(ALL_MODELS) - {protocol.DENSE_ENSEMBLE, protocol.SPARSE_ENSEMBLE}
    manifest = check_repository(repo)
    assert manifest["target"] == "cpu" and manifest["grid"] == {"window": 9, "height": 64, "width": 64, "overlap": 1}
    assets = serving.load_assets(repo)
    assert assets.config == TINY
    assert {n: s.to_dict() for n, s in assets.specs.items()} == {n: s.to_dict() for n, s in specs.items()}
    assert set(assets.embeddings()) == set(TASKS)


def test_write_repository_as_the_exporter_calls_it(tmp_path, specs):
    """export/build.py's hook passes (repo, specs, target, precision, report=...) and has already put
    thfm_config.json and task_embeddings.npz into core/1/."""
    repo = tmp_path / "repo"
    _fake_graphs(repo, "gpu")
    (repo / "core" / "1" / "thfm_config.json").write_text(TINY.to_json())
    np.savez(repo / "core" / "1" / serving.TASK_EMBEDDINGS, **tiny_embeddings())
    summary = write_repository(repo, specs, "gpu", "bf16", report={"checkpoint": "/ck", "checkpoint_sha256": "ab"})
    assert summary["missing"] == []
    # gpu: the core is a TensorRT plan and the VAE runs in the onnxruntime backend: no model.py there.
    assert not (repo / "core" / "1" / "model.py").exists()
    assert (repo / "thfm" / "1" / "model.py").exists()
    assert check_repository(repo, "gpu")["precision"] == "bf16"
    with pytest.raises(CheckpointError, match="'gpu' repository, not 'cpu'"):
        check_repository(repo, "cpu")


def test_switching_target_removes_stale_python_models(tmp_path, specs):
    repo = tmp_path / "repo"
    _fake_graphs(repo, "gpu")
    write_repository(repo, specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings())
    assert (repo / "core" / "1" / "model.py").exists()
    write_repository(repo, specs, "gpu", "fp32", TINY)
    assert not (repo / "core" / "1" / "model.py").exists()
    assert parse((repo / "core" / "config.pbtxt").read_text()).platform == "tensorrt_plan"


def test_missing_artifacts_are_named(tmp_path, specs):
    repo = tmp_path / "repo"
    summary = write_repository(repo, specs, "gpu", "fp32", TINY, embeddings=tiny_embeddings())
    joined = " ".join(summary["missing"])
    assert "core/1/model.plan is missing" in joined and "vae_encoder/1/model.onnx" in joined
    with pytest.raises(CheckpointError, match="not a complete THFM repository.*model.plan"):
        check_repository(repo)


def test_writer_refuses_bad_input(tmp_path, specs):
    with pytest.raises(ThfmError, match="named 'triton'"):
        write_repository(tmp_path / "triton", specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings())
    with pytest.raises(ThfmError, match="unknown target"):
        write_repository(tmp_path / "r1", specs, "tpu", "fp32", TINY, embeddings=tiny_embeddings())
    with pytest.raises(CheckpointError, match="task_embeddings.npz"):
        write_repository(tmp_path / "r2", specs, "cpu", "fp32", TINY)  # no embeddings anywhere
    with pytest.raises(ThfmError, match="window 5 frames differs from the 9-frame window"):
        write_repository(tmp_path / "r3", specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings(),
                         grid=serving.Grid(5, 64, 64))
    with pytest.raises(ThfmError, match="13 frames .* is outside the export profile"):
        write_repository(tmp_path / "r3", specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings(),
                         grid=serving.Grid(13, 64, 64))
    with pytest.raises(ThfmError, match="width 80px .* is outside the export profile"):
        write_repository(tmp_path / "r3", specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings(),
                         grid=serving.Grid(9, 64, 80))
    assert not (tmp_path / "r3").exists()  # nothing written before the checks
    with pytest.raises(ThfmError, match="max_frames must be a positive integer"):
        write_repository(tmp_path / "r4", specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings(),
                         limits=serving.Limits(max_frames=0))
    with pytest.raises(CheckpointError, match="is not a THFM model repository"):
        check_repository(tmp_path)


def test_a_checkpoint_without_sparse_tasks_gets_no_sparse_path(tmp_path, specs):
    cfg = ThfmConfig(**{**PRESETS["tiny"].thfm, "tasks": {t: "p" for t in DENSE_TASKS}})
    configs = model_configs(specs, "cpu", "fp32", cfg, default_grid(specs), serving.Limits())
    assert protocol.SPARSE_ENSEMBLE not in configs and protocol.DENSE_ENSEMBLE in configs
    entry = parse(configs[protocol.ENTRY_MODEL])
    assert [t.name for t in entry.output] == list(DENSE_TASKS)


# --- model.py skeletons -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in (protocol.DENSE_ENSEMBLE, protocol.SPARSE_ENSEMBLE)])
def test_model_py_is_a_thin_skeleton(name):
    src = SOURCES / name / "model.py"
    text = src.read_text()
    tree = ast.parse(text)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert [c.name for c in classes] == ["TritonPythonModel"]
    methods = {f.name for f in classes[0].body if isinstance(f, ast.FunctionDef)}
    assert {"initialize", "execute"} <= methods
    assert len(text.splitlines()) <= 40, "logic belongs in thfm_serve/serving/"
    assert "print(" not in text
    assert "from thfm_serve import serving" in text


def test_no_folder_named_triton_anywhere():
    # torch._dynamo imports any `triton` on sys.path as the OpenAI Triton compiler and crashes.
    found = []
    for dirpath, dirnames, _ in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        found += [os.path.join(dirpath, d) for d in dirnames if d == "triton"]
    assert found == []


# --- request inputs and limits ------------------------------------------------------------------

def test_read_clip_takes_exactly_one_of_video_and_frames():
    frames = np.zeros((2, 16, 16, 3), np.uint8)
    video = np.array([b"x"], dtype=np.object_)
    with pytest.raises(ShapeError, match="exactly one of 'video'.*got both"):
        serving.read_clip(video, frames, serving.Limits())
    with pytest.raises(ShapeError, match="got neither"):
        serving.read_clip(None, None, serving.Limits())
    assert serving.read_clip(None, frames, serving.Limits()) is frames


def test_read_clip_enforces_the_limits():
    limits = serving.Limits(max_frames=4, max_pixels=32 * 32, max_request_bytes=10_000)
    with pytest.raises(ShapeError, match="5 frames, above the limit max_frames=4"):
        serving.read_clip(None, np.zeros((5, 8, 8, 3), np.uint8), limits)
    with pytest.raises(ShapeError, match="max_pixels=1024"):
        serving.read_clip(None, np.zeros((1, 32, 33, 3), np.uint8), limits)
    with pytest.raises(ShapeError, match="above the limit max_request_bytes=10000"):
        serving.read_clip(None, np.zeros((4, 30, 30, 3), np.uint8), limits)
    with pytest.raises(ShapeError, match="uint8"):
        serving.read_clip(None, np.zeros((1, 8, 8, 3), np.float32), limits)
    with pytest.raises(ShapeError, match="above the limit max_request_bytes"):
        serving.read_clip(np.array([b"\0" * 10_001], dtype=np.object_), None, limits)


def test_read_clip_decodes_video_and_rejects_garbage(tmp_path):
    from thfm_serve.clipgen import make_clip

    path = tmp_path / "clip.mp4"
    make_clip(path, frames=6, height=32, width=48)
    data = np.array([path.read_bytes()], dtype=np.object_)
    frames = serving.read_clip(data, None, serving.Limits())
    assert frames.shape == (6, 32, 48, 3) and frames.dtype == np.uint8
    with pytest.raises(ShapeError, match="max_frames=5"):
        serving.read_clip(data, None, serving.Limits(max_frames=5))
    with pytest.raises(ShapeError, match="max_pixels=1000"):
        serving.read_clip(data, None, serving.Limits(max_pixels=1000))
    with pytest.raises(VideoError, match="cannot be opened as a video"):
        serving.read_clip(np.array([b"not a video at all" * 20], dtype=np.object_), None, serving.Limits())
    with pytest.raises(ShapeError, match="is empty"):
        serving.read_clip(np.array([b""], dtype=np.object_), None, serving.Limits())


def test_read_tasks():
    names = np.array([b"keypoints2d", b"depth", b"depth"], dtype=np.object_)
    assert serving.read_tasks(names, TASKS) == ["keypoints2d", "depth"]
    with pytest.raises(TaskError, match="unknown task 'flow'"):
        serving.read_tasks(np.array([b"flow"], dtype=np.object_), TASKS)
    with pytest.raises(TaskError, match="no task given"):
        serving.read_tasks(np.array([], dtype=np.object_), TASKS)
    with pytest.raises(TaskError, match="missing input 'tasks'"):
        serving.read_tasks(None, TASKS)
    with pytest.raises(TaskError, match="not provided by this checkpoint"):
        serving.read_tasks(np.array([b"depth"], dtype=np.object_), ["normals"])


def test_settings_from_config_parameters():
    config = {"parameters": {k: {"string_value": v} for k, v in
                             {**serving.Grid(9, 64, 48).to_params(), protocol.PARAM_MAX_FRAMES: "12"}.items()}}
    params = serving.model_parameters(config)
    assert serving.grid_from_params(params) == serving.Grid(9, 64, 48)
    assert serving.limits_from_params(params) == serving.Limits(max_frames=12)
    with pytest.raises(ShapeError, match="4n\\+1"):
        serving.grid_from_params({**params, protocol.PARAM_WINDOW_FRAMES: "8"})
    with pytest.raises(ThfmError, match="not an integer"):
        serving.limits_from_params({protocol.PARAM_MAX_PIXELS: "lots"})


# --- onnxruntime models: batching across requests --------------------------------------------------

def _add_sub_model(tmp_path: Path) -> serving.OnnxModel:
    """A two-input graph (s = x + y, d = x - y) with a batch axis, described by its own spec."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 4])
    d = helper.make_tensor_value_info("d", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["s"]), helper.make_node("Sub", ["x", "y"], ["d"])],
                              "add_sub", [x, y], [s, d])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "add_sub.onnx"
    onnx.save(model, str(path))
    tensor = lambda n: TensorSpec(n, "float32", ("batch", 4))  # noqa: E731
    spec = SubmodelSpec("add_sub", [tensor("x"), tensor("y")], [tensor("s"), tensor("d")],
                        profiles={"batch": (1, 1, 3)}, tolerances={"s": Tolerance(0, 0), "d": Tolerance(0, 0)})
    return serving.OnnxModel(spec, serving.create_session(path, threads=1))


class _Counting:
    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return self.session.run(names, feeds)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_onnx_model_joins_requests_into_batches_and_splits_results(tmp_path):
    model = _add_sub_model(tmp_path)
    model.session = counting = _Counting(model.session)
    rng = np.random.default_rng(0)
    reqs = [{"x": rng.standard_normal((b, 4)).astype(np.float32), "y": rng.standard_normal((b, 4)).astype(np.float32)}
            for b in (1, 2, 2, 1)]
    bad_dtype = {"x": np.zeros((1, 4), np.float64), "y": np.zeros((1, 4), np.float32)}
    bad_shape = {"x": np.zeros((1, 5), np.float32), "y": np.zeros((1, 5), np.float32)}
    results = model.run_many(reqs[:2] + [bad_dtype] + reqs[2:] + [bad_shape])
    assert isinstance(results[2], ShapeError) and "must be float32" in str(results[2])
    assert isinstance(results[5], ShapeError) and "shape" in str(results[5])
    for req, res in zip(reqs, results[:2] + results[3:5]):
        np.testing.assert_array_equal(res["s"], req["x"] + req["y"])
        np.testing.assert_array_equal(res["d"], req["x"] - req["y"])
    # 6 rows with a max batch of 3: requests stay whole, [1, 2] then [2, 1].
    assert [c["x"][0] for c in counting.calls] == [3, 3]


def test_onnx_model_checks_the_graph_against_its_spec(tmp_path):
    model = _add_sub_model(tmp_path)
    spec = SubmodelSpec("add_sub", model.spec.inputs[::-1], model.spec.outputs, model.spec.profiles, model.spec.tolerances)
    with pytest.raises(CheckpointError, match="manifest says"):
        serving.OnnxModel(spec, model.session)
    with pytest.raises(CheckpointError, match="export the model first"):
        serving.create_session(tmp_path / "absent.onnx")


# --- Triton glue, with a stand-in for triton_python_backend_utils -------------------------------------

class FakePbUtils:
    """The few pieces of triton_python_backend_utils that serving's glue touches."""

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            self.msg, self.code = message, code

        def message(self):
            return self.msg

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.output_tensors, self.error = output_tensors or [], error

    class Request:
        def __init__(self, tensors, requested=None):
            self.tensors, self.requested = tensors, requested

        def requested_output_names(self):
            return self.requested

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return FakePbUtils.Tensor(name, request.tensors[name]) if name in request.tensors else None


def test_execute_each_turns_errors_into_responses_and_keeps_going():
    pb = FakePbUtils

    def handle(request):
        inputs = serving.request_inputs(request, ["a"], pb)
        if inputs["a"] is None:
            raise ShapeError("missing a")
        if inputs["a"].size == 0:
            raise ZeroDivisionError("a bug")
        return {"b": inputs["a"] * 2}

    requests = [pb.Request({"a": np.ones(2)}), pb.Request({}), pb.Request({"a": np.ones(0)}), pb.Request({"a": np.ones(1)})]
    out = serving.execute_each(requests, "m", pb, handle)
    assert len(out) == 4
    assert out[0].error is None and out[0].output_tensors[0].name == "b"
    assert out[1].error.message() == "m: missing a" and out[1].error.code == pb.TritonError.INVALID_ARG
    assert out[2].error.message() == "m: internal error: ZeroDivisionError: a bug" and out[2].error.code is None
    np.testing.assert_array_equal(out[3].output_tensors[0].as_numpy(), [2.0])


def test_execute_onnx_answers_each_request_of_a_batch(tmp_path):
    pb = FakePbUtils
    model = _add_sub_model(tmp_path)
    x = np.ones((1, 4), np.float32)
    requests = [pb.Request({"x": x, "y": x}, ["s"]), pb.Request({"x": x[:, :3], "y": x[:, :3]}, ["s", "d"]),
                pb.Request({"x": x, "y": 2 * x}, ["s", "d"])]
    out = serving.execute_onnx(requests, model, pb)
    assert [t.name for t in out[0].output_tensors] == ["s"]  # only what was asked for
    assert "add_sub: " in out[1].error.message() and out[1].error.code == pb.TritonError.INVALID_ARG
    np.testing.assert_array_equal(out[2].output_tensors[1].as_numpy(), -x)


# --- the entry path and the ensemble path against the in-process pipeline ---------------------------

class TorchGraphs:
    """The repository's three graphs as PyTorch modules behind a serving.ModelCall, refusing, like
    the exported VAE graphs, any frame count but the window; records every call's batch."""

    def __init__(self, pipeline, window: int):
        self.pipe, self.window, self.calls = pipeline, window, []
        self.lt = (window - 1) // 4 + 1

    @torch.no_grad()
    def __call__(self, name, inputs, outputs):
        self.calls.append((name, {k: tuple(v.shape) for k, v in inputs.items()}))
        t = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}
        if name == protocol.VAE_ENCODER:
            assert t["video"].shape[2] == self.window, "the VAE graphs take the window only"
            out = {"latent": self.pipe.encoder(t["video"])}
        elif name == protocol.VAE_DECODER:
            assert t["latent"].shape[2] == self.lt, "the VAE graphs take the window only"
            out = {"maps": self.pipe.decoder(t["latent"])}
        else:
            pred, kp2d, kp3d = self.pipe.core(t["latent"], t["text"])
            out = {"pred_latent": pred, "kp2d": kp2d, "kp3d": kp3d}
        return {k: out[k].float().numpy() for k in outputs}


def assert_close(task: str, got: np.ndarray, ref: np.ndarray) -> None:
    """Within the fp32 export tolerance of the task's kind. Not bit-exact: a different batch
    composition changes float summation order, and renormalising normals amplifies that to ~5e-5."""
    tol = tolerance_for("fp32", "maps" if task in DENSE_TASKS else "keypoints")
    assert got.shape == ref.shape, task
    ok, max_abs, max_rel = tol.check(got, ref)
    assert ok, f"{task}: max abs diff {max_abs:.3g}, max rel diff {max_rel:.3g} beyond {tol}"


def _assert_same(got: dict, ref: dict, tasks):
    assert list(got) == list(tasks)
    for t in tasks:
        key = OUTPUT_KEYS[t]
        assert set(got[t]) == set(ref[t])
        assert_close(t, got[t][key], ref[t][key])
        if t in SPARSE_TASKS:
            assert list(got[t]["joint_names"]) == list(ref[t]["joint_names"])


@pytest.mark.parametrize("num_frames", [3, 9, 14])  # shorter than a window, one window, two windows
def test_run_entry_equals_the_pipeline(tiny_pipeline, num_frames):
    rng = np.random.default_rng(num_frames)
    frames = rng.integers(0, 256, (num_frames, 40, 56, 3), dtype=np.uint8)
    tasks = ["depth", "keypoints3d", "normals", "keypoints2d", "segmentation"]
    graphs = TorchGraphs(tiny_pipeline, 9)
    emb = {t: tiny_pipeline.ck.task_embedding(t).numpy() for t in TASKS}
    got = serving.run_entry(frames, tasks, serving.Grid(9, 64, 64), tiny_pipeline.cfg, emb, graphs)
    _assert_same(got, tiny_pipeline.run(frames, tasks), tasks)
    # Per window: one encode, one core call with one row per task, one decode of the dense rows.
    windows = 1 if num_frames <= 9 else 2
    assert [c[0] for c in graphs.calls] == ["vae_encoder", "core", "vae_decoder"] * windows
    core_calls = [c[1] for c in graphs.calls if c[0] == "core"]
    assert all(c["latent"][0] == c["text"][0] == len(tasks) for c in core_calls)
    assert all(c[1]["latent"][0] == 3 for c in graphs.calls if c[0] == "vae_decoder")
    outputs = serving.entry_outputs(got)
    assert set(outputs) == set(tasks) | {protocol.OUTPUT_JOINT_NAMES}
    assert outputs[protocol.OUTPUT_JOINT_NAMES].dtype == np.object_
    assert outputs[protocol.OUTPUT_JOINT_NAMES][0] == b"pelvis"


def test_ensemble_path_equals_the_pipeline(tiny_pipeline):
    """preprocess -> encoder -> core per task -> decoder per task -> postprocess, as the ensembles wire
    it, on a clip of whole windows (13 frames: windows 0-8 and 4-12), where it equals the pipeline."""
    num_frames, dense_tasks = 13, ["depth", "normals"]  # two dense tasks keep the VAE decodes few
    rng = np.random.default_rng(num_frames)
    frames = rng.integers(0, 256, (num_frames, 40, 56, 3), dtype=np.uint8)
    graphs = TorchGraphs(tiny_pipeline, 9)
    emb = {t: tiny_pipeline.ck.task_embedding(t).numpy() for t in TASKS}
    wanted = [serving.CLIP, serving.GEOMETRY] + [serving.TEXT_PREFIX + t for t in TASKS]
    pre = serving.preprocess(frames, serving.Grid(9, 64, 64), emb, max_windows=6, wanted=wanted)
    assert pre[serving.CLIP].shape == (2, 3, 9, 64, 64)  # batch axis = windows
    assert pre[serving.TEXT_PREFIX + "depth"].shape == (2, 16, 32)
    np.testing.assert_array_equal(pre[serving.GEOMETRY], [num_frames, 40, 56])
    latent = graphs(protocol.VAE_ENCODER, {"video": pre[serving.CLIP]}, ["latent"])["latent"]
    tasks = dense_tasks + list(SPARSE_TASKS)
    core = {t: graphs(protocol.CORE, {"latent": latent, "text": pre[serving.TEXT_PREFIX + t]}, ["pred_latent", "kp2d", "kp3d"])
            for t in tasks}
    maps = {t: graphs(protocol.VAE_DECODER, {"latent": core[t]["pred_latent"]}, ["maps"])["maps"] for t in dense_tasks}
    dense = serving.postprocess_dense(pre[serving.GEOMETRY], maps, 9, tiny_pipeline.cfg.depth_code)
    sparse = serving.postprocess_sparse(pre[serving.GEOMETRY], {"keypoints2d": core["keypoints2d"]["kp2d"],
                                                               "keypoints3d": core["keypoints3d"]["kp3d"]},
                                        9, tiny_pipeline.cfg.joint_names)
    assert list(dense) == dense_tasks
    ref = tiny_pipeline.run(frames, tasks)
    for t in tasks:
        assert_close(t, dense[t] if t in DENSE_TASKS else sparse[t], ref[t][OUTPUT_KEYS[t]])
    assert [n.decode() for n in sparse[protocol.OUTPUT_JOINT_NAMES]] == list(tiny_pipeline.cfg.joint_names)


def test_preprocess_and_postprocess_refuse_bad_input():
    emb = {"depth": np.zeros((16, 32), np.float32)}
    frames = np.zeros((40, 8, 8, 3), np.uint8)  # 40 frames at window 9 -> 5 windows
    with pytest.raises(ShapeError, match="need 5 windows of 9; the ensembles take at most 4.*'thfm'"):
        serving.preprocess(frames, serving.Grid(9, 16, 16), emb, max_windows=4, wanted=[serving.CLIP])
    out = serving.preprocess(frames[:3], serving.Grid(9, 16, 16), emb, max_windows=4, wanted=[serving.GEOMETRY])
    assert list(out) == [serving.GEOMETRY]  # only what the ensemble wires up is computed
    maps = np.zeros((1, 3, 9, 16, 16), np.float32)
    with pytest.raises(ShapeError, match="2 windows expected for 13 frames, got 1"):
        serving.postprocess_dense(np.array([13, 16, 16]), {"depth": maps}, 9, 0.5)
    with pytest.raises(ShapeError, match="geometry"):
        serving.postprocess_dense(np.array([13, 16]), {"depth": maps}, 9, 0.5)
    with pytest.raises(ShapeError, match="must be \\[windows, 3"):
        serving.postprocess_dense(np.array([9, 16, 16]), {"depth": maps[:, 0]}, 9, 0.5)


# --- `thfm serve` refuses what it cannot serve ----------------------------------------------------

def test_serve_refuses_a_directory_that_is_not_a_thfm_repository(tmp_path, caplog):
    (tmp_path / "some_model").mkdir()
    assert cli_main(["serve", "--repo", str(tmp_path)]) == 2
    assert "is not a THFM model repository" in caplog.text
    assert cli_main(["serve", "--repo", str(tmp_path / "absent")]) == 2
    assert "is not a directory" in caplog.text


def test_serve_refuses_a_gpu_repository(tmp_path, specs, caplog):
    repo = tmp_path / "repo"
    _fake_graphs(repo, "gpu")
    write_repository(repo, specs, "gpu", "fp32", TINY, embeddings=tiny_embeddings())
    assert cli_main(["serve", "--repo", str(repo)]) == 2
    assert "NVIDIA's Triton container" in caplog.text


# --- limits: requests in flight, set_limits, and what a bad request may cost ---------------------

def test_front_models_bound_their_queue(specs):
    """Requests in flight: the entry model and preprocess (the ensembles' first step) get a bounded
    queue (dynamic batcher with max_batch_size 0: no batching, only the queue policy)."""
    limits = serving.Limits(max_in_flight=3)
    configs = {n: parse(t) for n, t in model_configs(specs, "cpu", "fp32", TINY, default_grid(specs), limits).items()}
    for name in (protocol.ENTRY_MODEL, protocol.PREPROCESS):
        cfg = configs[name]
        assert cfg.max_batch_size == 0
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 3, name
    default = parse(model_configs(specs, "gpu", "fp32", TINY, default_grid(specs), serving.Limits())[protocol.ENTRY_MODEL])
    assert default.dynamic_batching.default_queue_policy.max_queue_size == serving.DEFAULT_MAX_IN_FLIGHT
    with pytest.raises(ThfmError, match="max_in_flight must be a positive integer"):
        serving.Limits(max_in_flight=0).validate()  # Triton reads a queue size of 0 as unbounded


def test_set_limits_rewrites_only_the_limits_and_rewrites_keep_them(tmp_path, specs):
    from thfm_serve.repository import current_limits, set_limits

    repo = tmp_path / "repo"
    _fake_graphs(repo, "cpu")
    write_repository(repo, specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings(), threads=2)
    assert current_limits(repo) == serving.Limits()
    before = check_repository(repo)
    new = set_limits(repo, max_frames=100, max_in_flight=4)
    assert new == serving.Limits(max_frames=100, max_in_flight=4)
    after = check_repository(repo)
    assert after["limits"] == {**before["limits"], "max_frames": 100, "max_in_flight": 4}
    assert {k: after[k] for k in ("grid", "specs", "threads", "target")} == {k: before[k] for k in ("grid", "specs", "threads", "target")}
    entry = parse((repo / protocol.ENTRY_MODEL / "config.pbtxt").read_text())
    assert entry.parameters[protocol.PARAM_MAX_FRAMES].string_value == "100"
    assert entry.dynamic_batching.default_queue_policy.max_queue_size == 4
    assert parse((repo / protocol.CORE / "config.pbtxt").read_text()).parameters[serving.PARAM_THREADS].string_value == "2"
    # The exporter's hook rewrites the configs without limits: an operator's limits stay.
    write_repository(repo, specs, "cpu", "fp32")
    assert current_limits(repo) == new
    with pytest.raises(ThfmError, match="unknown limits"):
        set_limits(repo, max_fps=3)
    with pytest.raises(CheckpointError, match="not a THFM model repository"):
        set_limits(tmp_path)


def test_export_command_takes_the_request_limits(tmp_path, specs, monkeypatch):
    """`thfm export --max-request-frames/--max-request-pixels/--max-request-bytes/--max-in-flight`
    end up in the repository; a bad value fails before the export runs."""
    from thfm_serve.export import build
    from thfm_serve.repository import current_limits

    repo = tmp_path / "repo"
    _fake_graphs(repo, "cpu")
    calls = []

    def fake_export(checkpoint, repo_, *args, **kwargs):
        calls.append(repo_)
        write_repository(repo_, specs, "cpu", "fp32", TINY, embeddings=tiny_embeddings())
        return {"models": {}, "seconds": 0.0}

    monkeypatch.setattr(build, "export_repository", fake_export)
    argv = ["export", "--checkpoint", str(tmp_path), "--repo", str(repo)]
    assert cli_main(argv + ["--max-request-frames", "120", "--max-request-pixels", "640000",
                            "--max-request-bytes", "1000000", "--max-in-flight", "3",
                            "--max-response-bytes", "5000000"]) == 0
    assert current_limits(repo) == serving.Limits(max_frames=120, max_pixels=640000, max_request_bytes=1000000,
                                                  max_in_flight=3, max_response_bytes=5000000)
    assert cli_main(argv) == 0  # no flags: the repository keeps its limits
    assert current_limits(repo).max_frames == 120 and current_limits(repo).max_response_bytes == 5000000
    assert cli_main(argv + ["--max-in-flight", "0"]) == 2 and len(calls) == 2
    # Above gRPC's message ceiling: refused before the export runs.
    assert cli_main(argv + ["--max-response-bytes", str(2**31)]) == 2 and len(calls) == 2


def test_task_lists_are_bounded():
    with pytest.raises(TaskError, match="has 65 task names, above the limit of 64"):
        serving.read_tasks(np.array([b"depth"] * 65, dtype=np.object_), TASKS)
    assert serving.read_tasks(np.array([b"depth"] * 64, dtype=np.object_), TASKS) == ["depth"]
    with pytest.raises(TaskError, match="task name of 1000 bytes") as info:
        serving.read_tasks(np.array([b"y" * 1000], dtype=np.object_), TASKS)
    assert len(str(info.value)) < 300


def test_float_inputs_must_be_finite():
    serving.check_finite("core", "latent", np.zeros((2, 3), np.float32))
    serving.check_finite("core", "latent", np.full(3, 3e38, np.float32))  # huge but finite: the float64 sum holds
    serving.check_finite("core", "ids", np.array([1, 2]))  # not a float: nothing to check
    x = np.zeros((4, 4), np.float32)
    x[0, 0], x[1, 1], x[2, 2] = np.nan, np.inf, -np.inf
    with pytest.raises(ShapeError, match="core: input 'latent' has 1 NaN and 2 Inf values of 16"):
        serving.check_finite("core", "latent", x)


def test_requested_outputs_must_be_produced_by_the_tasks():
    every = [protocol.OUTPUT_FOR_TASK[t] for t in TASKS] + [protocol.OUTPUT_JOINT_NAMES]
    serving.check_requested_outputs(None, ["depth"], every)
    serving.check_requested_outputs(every, ["depth"], every)  # Triton's "all outputs": no choice made
    serving.check_requested_outputs(["keypoints2d", "joint_names"], ["keypoints2d"], every)
    with pytest.raises(TaskError, match=r"outputs \['normals'\] were requested"):
        serving.check_requested_outputs(["depth", "normals"], ["depth"], every)


def test_error_messages_are_capped():
    assert serving.clip_message("short") == "short"
    long = serving.clip_message("x" * 100_000)
    assert len(long) <= serving.MAX_ERROR_CHARS and long.endswith("(100000 chars)")
