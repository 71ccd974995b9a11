"""TensorRT engine stage up to the TensorRT boundary: version checks, timing-cache handling, plan
validation against the saved PyTorch outputs and the attention-fusion report, all with a stand-in
for the tensorrt module (TensorRT cannot be installed here). The stand-in engine reads its input
buffers by address and writes outputs computed from them, so the addressing, shapes and the
comparison are exercised for real; what TensorRT itself computes is not."""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path

import numpy as np
import pytest

from thfm_serve.errors import ExportError
from thfm_serve.export import engine
from thfm_serve.contract.specs import SubmodelSpec, TensorSpec, Tolerance
from thfm_serve.export.validate import save_polygraphy


def _toy_spec() -> SubmodelSpec:
    return SubmodelSpec(
        name="toy", inputs=[TensorSpec("x", "float32", ("batch", 4))], outputs=[TensorSpec("y", "float32", ("batch", 4))],
        profiles={"batch": (1, 2, 6), "latent_frames": (1, 1, 1), "hp": (1, 1, 1), "wp": (1, 1, 1)},
        tolerances={"y": Tolerance(1e-3, 1e-3)},
    )


def _fake_trt(error: float = 0.0, layers: list[dict] | None = None, version: str = "10.8.0.43",
              refuse_cache: bool = False):
    """tensorrt 10's runtime surface: the plan computes y = 2 * x (+ error) from its input buffer."""
    calls = []
    layers = layers if layers is not None else [{"Name": "{ForeignNode[/blocks.0/attn1...]}", "LayerType": "Myelin",
                                                 "TacticName": "sm90_xmma_fmha_v2"}]

    class DataType:
        FLOAT = "float"

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, tuple(shape)))
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return self.shapes["x"]  # y has x's shape

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            calls.append(("execute_async_v3", stream))
            shape = self.shapes["x"]
            n = int(np.prod(shape))
            x = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["x"])).reshape(shape)
            y = (2.0 * x + error).astype(np.float32)
            ctypes.memmove(self.addresses["y"], y.ctypes.data, y.nbytes)
            return True

    class Inspector:
        def get_engine_information(self, fmt):
            return json.dumps({"Layers": layers})

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return ["x", "y"][i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == "x" else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return DataType.FLOAT

        def create_execution_context(self):
            return Context()

        def create_engine_inspector(self):
            return Inspector()

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls.append(("deserialize", bytes(data)))
            return Engine() if data else None

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    class Config:
        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return object()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache",))
            return not refuse_cache

    trt = types.SimpleNamespace(
        __version__=version, Runtime=Runtime, Logger=Logger, TensorIOMode=TensorIOMode, DataType=DataType,
        nptype=lambda dt: np.float32, LayerInformationFormat=types.SimpleNamespace(JSON="json"))
    return trt, calls, Config


def _saved(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    poly = tmp_path / "polygraphy"
    save_polygraphy(poly, {"x": x}, {"y": 2 * x}, {"y": 2 * x}, "onnxruntime-cpu")
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"plan-bytes")
    return plan, poly, x


def test_plan_validation_runs_the_saved_inputs_and_passes(tmp_path):
    plan, poly, x = _saved(tmp_path)
    trt, calls, _ = _fake_trt()
    out = engine.validate_plan(trt, plan, _toy_spec(), poly, device="cpu")
    assert ("set_input_shape", "x", (3, 4)) in calls and ("deserialize", b"plan-bytes") in calls
    assert out["outputs"]["y"]["ok"] and out["outputs"]["y"]["max_abs"] == 0.0
    assert out["inputs"] == {"x": [3, 4]}
    assert out["attention"]["fused"] and out["attention"]["fused_kernel_layers"] == 1
    layers = json.loads((tmp_path / engine.LAYERS_NAME).read_text())
    assert layers[0]["TacticName"] == "sm90_xmma_fmha_v2"


def test_plan_validation_is_fatal_beyond_tolerance(tmp_path):
    plan, poly, _ = _saved(tmp_path)
    trt, _, _ = _fake_trt(error=0.05)
    with pytest.raises(ExportError, match=r"plan does not match PyTorch.*y: max abs 0\.05"):
        engine.validate_plan(trt, plan, _toy_spec(), poly, device="cpu")


def test_unfused_attention_is_reported(tmp_path, caplog):
    plan, poly, _ = _saved(tmp_path)
    layers = [{"Name": "/blocks.0/attn1/MatMul", "LayerType": "MatrixMultiply"},
              {"Name": "/blocks.0/attn1/Softmax", "LayerType": "SoftMax"}]
    trt, _, _ = _fake_trt(layers=layers)
    out = engine.validate_plan(trt, plan, _toy_spec(), poly, device="cpu")
    assert not out["attention"]["fused"] and out["attention"]["unfused_softmax"] == 1
    assert "attention is NOT fused" in caplog.text


def test_plan_validation_needs_the_saved_inputs(tmp_path):
    trt, _, _ = _fake_trt()
    with pytest.raises(ExportError, match="inputs.json"):
        engine.validate_plan(trt, tmp_path / "model.plan", _toy_spec(), tmp_path / "polygraphy", device="cpu")


@pytest.mark.parametrize("version,ok", [("10.8.0.43", True), ("11.4.0.106", True), ("8.6.1", False), ("9.3.0", False)])
def test_tensorrt_below_10_is_refused(version, ok):
    trt = types.SimpleNamespace(__version__=version)
    if ok:
        assert engine.check_tensorrt_version(trt) == version
    else:
        with pytest.raises(ExportError, match=f"TensorRT {version} is too old.*>= 10"):
            engine.check_tensorrt_version(trt)


def test_engine_versions_must_agree_on_major_minor_patch():
    assert engine.same_engine_version("10.8.0.43", "10.8.0")
    assert not engine.same_engine_version("10.8.0.43", "10.9.0.34")


def test_a_refused_timing_cache_is_replaced_and_a_failing_one_is_an_error(tmp_path, caplog):
    trt, calls, Config = _fake_trt()
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another gpu")

    class RefuseOld(Config):
        def set_timing_cache(self, c, ignore_mismatch):
            calls.append(("set_timing_cache",))
            return len([k for k in calls if k[0] == "set_timing_cache"]) > 1  # only the fresh one

    engine._set_timing_cache(RefuseOld(), cache, "core")
    assert [c for c in calls if c[0] == "create_timing_cache"] == [("create_timing_cache", b"from another gpu"),
                                                                    ("create_timing_cache", b"")]
    assert "refused the timing cache" in caplog.text
    _, _, Failing = _fake_trt(refuse_cache=True)
    with pytest.raises(ExportError, match="could not set a timing cache"):
        engine._set_timing_cache(Failing(), cache, "core")


def test_plan_is_written_whole_from_a_buffer(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"old")
    engine._write_atomic(plan, bytearray(b"new plan"))  # any buffer-protocol object, as IHostMemory is
    assert plan.read_bytes() == b"new plan" and not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(TypeError):  # a write that fails half-way leaves the old plan and no temporary file
        engine._write_atomic(plan, object())
    assert plan.read_bytes() == b"new plan" and not list(tmp_path.glob(".*.tmp"))


def test_gpu_quantisation_without_modelopt_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    from thfm_serve.export.tensorrt_ptq import quantize_for_tensorrt

    real_import = builtins.__import__

    def no_modelopt(name, *args, **kwargs):
        if name.startswith("modelopt"):
            raise ImportError("No module named 'modelopt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_modelopt)
    sample = {"latent": np.zeros((1, 16, 1, 2, 2), np.float32), "text": np.zeros((1, 4, 8), np.float32)}
    with pytest.raises(ExportError, match=r"ModelOpt, which is not installed: pip install 'thfm-serve\[gpu\]'"):
        quantize_for_tensorrt(tmp_path / "model.onnx", tmp_path / "q.onnx", [sample], "int8", ())
    with pytest.raises(ExportError, match="mode 'int4'"):
        quantize_for_tensorrt(tmp_path / "model.onnx", tmp_path / "q.onnx", [sample], "int4", ())


@pytest.mark.parametrize("error,ok", [(0.0, True), (0.05, False)])
def test_build_validates_the_plan_and_drops_one_that_fails(tmp_path, monkeypatch, error, ok):
    """build_engine -> validate_plan on the polygraphy files next to the ONNX: the manifest carries
    the numbers, and a plan that fails validation is deleted (Triton must not serve it)."""
    from test_export_specs import _fake_trt as _builder_trt
    from test_export_specs import _Recorder

    monkeypatch.setattr(engine, "gpu_sm", lambda: "sm_90")
    monkeypatch.setattr(engine, "gpu_name", lambda: "NVIDIA H100")
    _saved(tmp_path)  # polygraphy/ next to the ONNX, as the ONNX validation leaves it
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"graph")
    runtime, _, _ = _fake_trt(error=error)
    trt = _builder_trt(_Recorder())
    for name in ("Runtime", "TensorIOMode", "DataType", "nptype", "LayerInformationFormat"):
        setattr(trt, name, getattr(runtime, name))
    trt.__version__ = "10.8.0.43"
    if ok:
        manifest = engine.build_engine(onnx_path, _toy_spec(), tmp_path, trt=trt, device="cpu")
        assert manifest["validation"]["outputs"]["y"]["ok"] and manifest["validation"]["attention"]["fused"]
        assert (tmp_path / "model.plan").exists() and (tmp_path / engine.LAYERS_NAME).exists()
    else:
        with pytest.raises(ExportError, match="plan does not match PyTorch"):
            engine.build_engine(onnx_path, _toy_spec(), tmp_path, trt=trt, device="cpu")
        assert not (tmp_path / "model.plan").exists()
