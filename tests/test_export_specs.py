"""Fast export unit tests: specs (shapes, profiles, Triton/TensorRT/perf_analyzer views), the VAE window
helpers against the in-process VAE, calibration clips, manifests, and the TensorRT build calls (with a
recording stand-in for the tensorrt module: it checks our calls, it builds nothing)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from thfm_serve.config import ThfmConfig
from thfm_serve.errors import ExportError, ShapeError, ThfmError
from thfm_serve.export import build_specs
from thfm_serve.contract.specs import Axis, Precision, SubmodelSpec, Target, parse_axis, parse_precision, parse_target


@pytest.fixture(scope="module")
def cfg() -> ThfmConfig:
    # The tiny preset's clip: 9 frames at 64x64, 16-token x 32-dim prompts.
    return ThfmConfig(frames=9, height=64, width=64, head_hidden=32, text_len=16, text_dim=32).validate()


def test_axis_symbols_round_trip():
    for sym, axis in [("batch", Axis("batch")), ("2*hp", Axis("hp", 2)), ("16*wp", Axis("wp", 16)),
                      ("4*latent_frames-3", Axis("latent_frames", 4, -3))]:
        assert parse_axis(sym) == axis
        assert axis.symbol == sym
    assert Axis("latent_frames", 4, -3).size({"latent_frames": 3}) == 9  # 4(T'-1)+1 frames
    with pytest.raises(ValueError):
        parse_axis("3*frames")


def test_build_specs_names_shapes_and_profiles(cfg):
    specs = build_specs(cfg, frames=5, height=32, width=48)
    assert list(specs) == ["core", "vae_encoder", "vae_decoder"]
    core = specs["core"]
    assert core.input_names == ["latent", "text"]
    assert core.output_names == ["pred_latent", "kp2d", "kp3d"]
    assert core.tensor("latent").shape == ("batch", 16, "latent_frames", "2*hp", "2*wp")
    assert core.tensor("kp2d").shape == ("batch", "4*latent_frames-3", 24, 2)
    # min = 1 frame / 16 px / batch 1; opt = the export shape; max = the config's clip and 6 rows.
    assert core.profiles == {"batch": (1, 1, 6), "latent_frames": (1, 2, 3), "hp": (1, 2, 4), "wp": (1, 3, 4)}
    assert core.shapes("opt") == {"latent": (1, 16, 2, 4, 6), "text": (1, 16, 32), "pred_latent": (1, 16, 2, 4, 6),
                                  "kp2d": (1, 5, 24, 2), "kp3d": (1, 5, 24, 3)}
    assert core.shape("latent", "max") == (6, 16, 3, 8, 8)
    assert set(core.tolerances) == set(core.output_names)
    assert all(t.dtype == "float32" for t in core.inputs + core.outputs)


def test_vae_specs_have_static_window(cfg):
    specs = build_specs(cfg, frames=5, height=32, width=48)
    enc, dec = specs["vae_encoder"], specs["vae_decoder"]
    for spec in (enc, dec):
        assert spec.static_dims == ("latent_frames",)
        assert spec.profiles["latent_frames"] == (2, 2, 2)
        assert spec.dynamic_dims == ["batch", "hp", "wp"]
        assert spec.precision == "fp32"  # the VAE stays fp32 at every precision
        assert any("static" in n for n in spec.notes)
    assert enc.triton_dims("video") == [-1, 3, 5, -1, -1]
    assert dec.triton_dims("maps") == [-1, 3, 5, -1, -1]
    assert enc.onnx_dim_params()["video"] == {0: "batch", 3: "16*hp", 4: "16*wp"}
    assert build_specs(cfg, 5, 32, 48, precision="int8")["vae_decoder"].precision == "fp32"


def test_derived_views(cfg):
    core = build_specs(cfg, frames=5, height=32, width=48)["core"]
    assert core.triton_dims("latent") == [-1, 16, -1, -1, -1]
    assert core.triton_dims("latent", drop_batch=True) == [16, -1, -1, -1]
    assert core.triton_dims("text") == [-1, 16, 32]
    assert core.perf_shapes() == ["latent:1,16,2,4,6", "text:1,16,32"]
    assert core.perf_shapes("max", drop_batch=True) == ["latent:16,3,8,8", "text:16,32"]
    assert core.trt_profile() == {
        "latent": ((1, 16, 1, 2, 2), (1, 16, 2, 4, 6), (6, 16, 3, 8, 8)),
        "text": ((1, 16, 32), (1, 16, 32), (6, 16, 32)),
    }
    dyn = core.torch_dynamic_shapes()
    assert set(dyn) == {"latent", "text"} and set(dyn["latent"]) == {0, 2, 3, 4} and set(dyn["text"]) == {0}
    a = core.dummy_inputs("opt", seed=3)
    b = core.dummy_inputs("opt", seed=3)
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)
    video = build_specs(cfg, 5, 32, 48)["vae_encoder"].dummy_inputs("min")["video"]
    assert video.shape == (1, 3, 5, 16, 16) and video.min() >= -1 and video.max() <= 1


def test_spec_round_trips_through_json(cfg):
    for spec in build_specs(cfg, 5, 32, 48, precision="fp16").values():
        again = SubmodelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again.to_dict() == spec.to_dict()
        assert again.trt_profile() == spec.trt_profile()


def test_shape_checks(cfg):
    core = build_specs(cfg, 5, 32, 48)["core"]
    ok = core.dummy_inputs({"batch": 2, "latent_frames": 3, "hp": 4, "wp": 1})
    assert core.check_inputs(ok) == {"batch": 2, "latent_frames": 3, "hp": 4, "wp": 1}
    with pytest.raises(ShapeError, match="outside the export profile"):
        core.check_inputs(core.dummy_inputs({"batch": 7, "latent_frames": 1, "hp": 1, "wp": 1}))
    with pytest.raises(ShapeError, match="outside the export profile"):
        core.check_dims({"hp": 5})
    with pytest.raises(ShapeError, match="disagree"):
        core.check_inputs({"latent": np.zeros((2, 16, 1, 2, 2)), "text": np.zeros((3, 16, 32))})
    with pytest.raises(ShapeError, match="4n\\+1"):
        build_specs(cfg, frames=6)
    with pytest.raises(ShapeError, match="multiple of 16"):
        build_specs(cfg, height=40)
    with pytest.raises(ShapeError, match="outside the profile"):
        build_specs(cfg, frames=9, max_frames=5)
    # An explicit max above the config's clip widens the profile.
    assert build_specs(cfg, max_frames=17, max_height=128)["core"].profiles["latent_frames"] == (1, 3, 5)


def test_parse_precision_and_target():
    assert parse_precision("int8") is Precision.INT8
    assert parse_target("gpu") is Target.GPU
    assert parse_precision("fp8") is Precision.FP8
    with pytest.raises(ThfmError, match="unknown precision 'fp4'"):
        parse_precision("fp4")
    with pytest.raises(ThfmError, match="unknown target"):
        parse_target("tpu")


def test_vae_window_matches_in_process_vae(tiny_checkpoint):
    """Pad-to-window then crop equals the VAE run on the short clip (the Wan VAE is causal in time)."""
    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.contract.vae_window import decode_in_window, encode_in_window, pad_time

    ck = load_checkpoint(tiny_checkpoint, text_encoder=False)
    enc, dec = ck.vae_encoder(), ck.vae_decoder()
    torch.manual_seed(0)
    with torch.no_grad():
        for frames in (1, 5):
            video = torch.rand(2, 3, frames, 32, 48) * 2 - 1
            torch.testing.assert_close(encode_in_window(enc, video, 9), enc(video), atol=1e-5, rtol=1e-5)
            latent = torch.randn(2, 16, (frames - 1) // 4 + 1, 4, 6)
            torch.testing.assert_close(decode_in_window(dec, latent, 9), dec(latent), atol=1e-5, rtol=1e-5)
    padded = pad_time(np.arange(2.0).reshape(1, 1, 2, 1, 1), 4)
    assert padded[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    with pytest.raises(ShapeError):
        pad_time(np.zeros((1, 1, 5, 1, 1)), 3)


def test_procedural_calibration_clips_are_deterministic():
    from thfm_serve.export.calibration import calibration_set, procedural_clips

    a = procedural_clips(2, 5, 32, 48, seed=0)
    b = procedural_clips(2, 5, 32, 48, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (5, 32, 48, 3) and a[0].dtype == np.uint8
    assert not np.array_equal(a[0][0], a[0][4])  # the figure moves
    assert a[0].std() > 10  # textured, not flat
    with pytest.raises(ThfmError, match="not found"):
        calibration_set(["/nonexistent/clip.mp4"], 5, 32, 48)


def test_calibration_grid_halves_large_grids_on_the_model_grid():
    """The core's CPU int8 calibration runs at half the export grid's side, rounded down to the x16
    grid, where that half keeps at least 128x128 pixels; smaller grids are calibrated as exported."""
    from thfm_serve.export.calibration import calibration_grid

    assert calibration_grid(256, 256) == (128, 128)
    assert calibration_grid(480, 832) == (240, 416)
    assert calibration_grid(304, 272) == (144, 128)  # 152 is not on the x16 grid
    assert calibration_grid(192, 192) == (192, 192)  # 96x96 would lose the person
    assert calibration_grid(256, 224) == (256, 224)  # 128x112 is under 128x128 pixels
    assert calibration_grid(64, 96) == (64, 96)


def test_manifest_staleness(tmp_path):
    from thfm_serve.export import manifest as mf

    (tmp_path / "model.onnx").write_bytes(b"graph")
    key = {"checkpoint_sha256": "abc", "precision": "fp32", "spec": {"profiles": (1, 2)}}
    manifest = {"key": mf.normalise(key), "files": mf.file_hashes([tmp_path / "model.onnx"])}
    assert mf.stale_reason(manifest, key, tmp_path) is None
    assert "precision" in mf.stale_reason(manifest, {**key, "precision": "fp16"}, tmp_path)
    assert mf.stale_reason(None, key, tmp_path) == "no manifest"
    (tmp_path / "model.onnx").write_bytes(b"other")
    assert "changed" in mf.stale_reason(manifest, key, tmp_path)


# --- TensorRT: the calls our builder makes, checked with a recording stand-in ------------------

class _Recorder:
    def __init__(self):
        self.calls = []


def _fake_trt(rec: _Recorder):
    """The slice of the tensorrt 10 API build_engine uses; records every call."""

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            rec.calls.append(("Logger", severity))

    class Flag:
        STRONGLY_TYPED = 5

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            rec.calls.append(("set_shape", name, tuple(mn), tuple(opt), tuple(mx)))

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            rec.calls.append(("workspace", size))

        def create_timing_cache(self, data):
            rec.calls.append(("create_timing_cache", data))
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            rec.calls.append(("set_timing_cache", ignore_mismatch))
            return True

        def add_optimization_profile(self, profile):
            rec.calls.append(("add_optimization_profile",))

        def get_timing_cache(self):
            return Cache()

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            rec.calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec.calls.append(("build",))
            return b"fake-plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec.calls.append(("parse_from_file", path))
            return True

    return types.SimpleNamespace(__version__="10.99.0", Logger=Logger, Builder=Builder, OnnxParser=OnnxParser,
                                 NetworkDefinitionCreationFlag=Flag, MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))


def test_engine_build_calls_follow_the_spec(cfg, tmp_path, monkeypatch):
    from thfm_serve.export import engine

    monkeypatch.setattr(engine, "gpu_sm", lambda: "sm_90")
    monkeypatch.setattr(engine, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    spec = build_specs(cfg, 5, 32, 48, precision="fp16")["core"]
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"not really onnx")
    rec = _Recorder()
    manifest = engine.build_engine(onnx_path, spec, tmp_path, trt=_fake_trt(rec), validate=False)
    shapes = [c[1:] for c in rec.calls if c[0] == "set_shape"]
    # min and max from the spec; opt at the export shape with one row per task (all six).
    want = []
    for name, (mn, opt, mx) in spec.trt_profile().items():
        want.append((name, mn, (6, *opt[1:]), mx))
    assert shapes == want
    assert ("create_network", 1 << 5) in rec.calls  # STRONGLY_TYPED, nothing else (TensorRT 10)
    assert ("parse_from_file", str(onnx_path)) in rec.calls
    assert ("create_timing_cache", b"") in rec.calls
    assert manifest["key"]["precision"] == "fp16" and manifest["key"]["gpu_sm"] == "sm_90"
    assert manifest["key"]["tensorrt_version"] == "10.99.0"
    assert manifest["key"]["profiles"]["latent"] == [[1, 16, 1, 2, 2], [6, 16, 2, 4, 6], [6, 16, 3, 8, 8]]
    assert manifest["key"]["gpu_name"] == "NVIDIA H100 80GB HBM3"
    assert (tmp_path / "model.plan").read_bytes() == b"fake-plan"
    # The timing cache is named by TensorRT version, SM and GPU model.
    assert manifest["timing_cache"] == "timing-trt10.99.0-sm_90-nvidia-h100-80gb-hbm3.cache"
    assert (tmp_path / manifest["timing_cache"]).read_bytes() == b"timing-cache"
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary files, renamed into place

    # Same inputs: reused, no second build. The timing cache is read back on a rebuild.
    rec2 = _Recorder()
    assert engine.build_engine(onnx_path, spec, tmp_path, previous=manifest, trt=_fake_trt(rec2), validate=False) == manifest
    assert ("build",) not in rec2.calls
    # A changed ONNX (or TensorRT, SM, precision, profile) invalidates the plan.
    onnx_path.write_bytes(b"a different graph")
    rec3 = _Recorder()
    engine.build_engine(onnx_path, spec, tmp_path, previous=manifest, trt=_fake_trt(rec3), validate=False)
    assert ("build",) in rec3.calls and ("create_timing_cache", b"timing-cache") in rec3.calls


def test_engine_without_tensorrt_says_so(cfg, tmp_path, monkeypatch):
    import builtins

    from thfm_serve.export import engine

    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    spec = build_specs(cfg, 5, 32, 48)["core"]
    with pytest.raises(ExportError, match="TensorRT is not installed"):
        engine.build_engine(Path(tmp_path / "model.onnx"), spec, tmp_path)


# --- export checks are fatal --------------------------------------------------------------------

def _toy_spec() -> SubmodelSpec:
    from thfm_serve.contract.specs import TensorSpec, Tolerance

    return SubmodelSpec(
        name="toy", inputs=[TensorSpec("x", "float32", ("batch", 4))], outputs=[TensorSpec("y", "float32", ("batch", 4))],
        profiles={"batch": (1, 2, 4), "latent_frames": (1, 1, 1), "hp": (1, 1, 1), "wp": (1, 1, 1)},
        tolerances={"y": Tolerance(1e-4, 1e-4)},
    )


def test_export_fails_loudly_on_float64(tmp_path):
    """Wan's rotary tables are float64 in diffusers; any double left in a graph must stop the export."""
    from thfm_serve.export.onnx_export import export_onnx

    class Doubles(torch.nn.Module):
        def forward(self, x):
            return (x.double() * 1.5).float()

    with pytest.raises(ExportError, match="float64"):
        export_onnx(Doubles(), _toy_spec(), tmp_path / "toy.onnx")


def test_validation_failure_carries_the_numbers():
    from thfm_serve.export.validate import torch_runner, validate_values

    spec = _toy_spec()
    ref = torch_runner(torch.nn.Identity(), spec)

    def off_by_a_bit(feed):
        return {"y": feed["x"] + 0.01}

    with pytest.raises(ExportError, match=r"y: max abs diff 0\.01 .* beyond atol 0\.0001"):
        validate_values(spec, off_by_a_bit, ref, {"batch": 2})
    # Within tolerance: passes, at the export shape and at batches the export did not use.
    results = validate_values(spec, lambda feed: {"y": feed["x"] + 1e-6}, ref, {"batch": 2})
    assert [r["label"] for r in results] == ["export", "unseen", "min"]
    assert [r["dims"]["batch"] for r in results] == [2, 3, 1]


def test_calibration_from_videos(tmp_path):
    """--calibration videos are decoded with thfm_serve.video and fitted to the export shape."""
    from thfm_serve.export.calibration import calibration_set, procedural_clips
    from thfm_serve.video import encode_video

    path = tmp_path / "walk.mp4"
    encode_video(procedural_clips(1, 12, 48, 64, seed=3)[0], str(path), fps=24.0)
    calib = calibration_set([path], frames=5, height=32, width=48)
    assert calib.source == "videos" and calib.fingerprint.startswith("videos:") and calib.files == [str(path)]
    assert len(calib.clips) == 2  # two windows spread over the 12 frames
    assert all(c.shape == (5, 32, 48, 3) and c.dtype == np.uint8 for c in calib.clips)
    assert calib.clips[0].std() > 10


def test_export_graph_equals_torch_optimize_path(tiny_checkpoint, tmp_path, monkeypatch):
    """export_onnx runs onnxscript's optimizer passes itself, without the one rewrite rule that is
    quadratic in the graph's size (onnx_export.rewrite_rules). On the tiny core that rule never fires,
    so the graph must equal, node for node and weight for weight, what torch.onnx.export(optimize=True)
    writes: the reference is torch's own optimizer path."""
    import onnx

    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.export import onnx_export
    from thfm_serve.export.precision import lowered_core

    ck = load_checkpoint(tiny_checkpoint, text_encoder=False)
    spec = build_specs(ck.config, precision=Precision.FP32)["core"]
    module = lowered_core(ck.core(), Precision.FP32)
    ours = onnx_export.export_onnx(module, spec, tmp_path / "ours" / "model.onnx")

    real_export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: real_export(*a, **{**k, "optimize": True}))
    monkeypatch.setattr(onnx_export, "optimize_graph", lambda model: None)
    theirs = onnx_export.export_onnx(module, spec, tmp_path / "torch" / "model.onnx")

    def graph(path):
        m = onnx.load(str(path))
        nodes = [(n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute]) for n in m.graph.node]
        return nodes, {i.name: i.SerializeToString() for i in m.graph.initializer}, m.graph.input, m.graph.output

    a, b = graph(ours), graph(theirs)
    assert len(a[0]) > 100 and a[0] == b[0]
    assert a[1] == b[1] and a[2] == b[2] and a[3] == b[3]
    assert not any(r.name == "SlicesSplit" for r in onnx_export.rewrite_rules())
