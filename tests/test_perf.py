"""Tests for `thfm perf` (thfm_serve/perf.py), the benchmark's CPU engines (perf/engines.py) and the
benchmark's pure parts (perf/bench_core.py).

Unit tests build perf_analyzer command lines and input data without running anything. The `server`
tests start the real tritonserver with two small python models written at test time: a "thfm" entry
model that decodes the generated mp4 (so the data file is checked end to end) and a "core" model that
checks its inputs have the spec's shapes; perf_analyzer 2.51 then measures both. No assertion
depends on timing: only that a sweep produced numbers and files.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
from perfscripts import load_perf_script

from thfm_serve.config import ThfmConfig
from thfm_serve.errors import ThfmError
from thfm_serve.contract.specs import build_specs
from thfm_serve.perf import (
    PerfAnalyzer,
    PerfOptions,
    ServedInput,
    build_command,
    clip_input_data,
    encode_clip,
    find_perf_analyzer,
    merge_csv,
    parse_concurrency,
    plan,
    read_csv,
    resolve_geometry,
    run_perf,
    serialize_bytes_tensor,
    served_geometry,
    served_inputs,
    summarize_row,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ThfmConfig(frames=9, height=64, width=64, text_len=16, text_dim=32, head_hidden=32)

# A perf_analyzer 2.51 -f CSV (header and one row, as written by a real run).
CSV_TEXT = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "2,5582.25,1,114,83,10,85,57,0,351,443,479,579\n"
)


def fake_pa(tmp_path: Path) -> PerfAnalyzer:
    return PerfAnalyzer(tmp_path / "perf_analyzer" / "bin" / "perf_analyzer", tmp_path / "perf_analyzer" / "lib")


def entry_config(frames: int = 9, height: int = 64, width: int = 64) -> dict:
    """What get_model_config(as_json=True)["config"] returns for the entry model."""
    return {
        "name": "thfm", "max_batch_size": 0,
        "input": [
            {"name": "video", "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
            {"name": "frames", "data_type": "TYPE_UINT8", "dims": ["-1", "-1", "-1", "3"], "optional": True},
            {"name": "tasks", "data_type": "TYPE_STRING", "dims": ["-1"]},
        ],
        "parameters": {"window_frames": {"string_value": str(frames)}, "height": {"string_value": str(height)},
                       "width": {"string_value": str(width)}},
    }


def spec_config(name: str, max_batch_size: int, cfg: ThfmConfig = TINY) -> dict:
    """A core/VAE model config with the dims the repository derives from the spec."""
    spec = build_specs(cfg)[name]
    drop = max_batch_size > 0
    return {"name": name, "max_batch_size": max_batch_size,
            "input": [{"name": t.name, "data_type": "TYPE_FP32", "dims": [str(d) for d in spec.triton_dims(t.name, drop)]}
                      for t in spec.inputs]}


# --- options and command line ------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [("1", (1,)), ("1,2,4", (1, 2, 4)), (" 4, 2,4 ", (4, 2)), ("1:4", (1, 2, 3, 4)),
                                        ("1:8:3", (1, 4, 7))])
def test_parse_concurrency(text, want):
    assert parse_concurrency(text) == want


@pytest.mark.parametrize("text", ["", "0", "a", "1,-2", "4:1", "1:4:0", "1:2:3:4"])
def test_parse_concurrency_rejects(text):
    with pytest.raises(ThfmError, match="concurrency"):
        parse_concurrency(text)


@pytest.mark.parametrize("kw, match", [({"url": "localhost"}, "HOST:PORT"), ({"url": "h:x"}, "HOST:PORT"),
                                       ({"concurrency": (0,)}, "positive"), ({"measurement_ms": 10}, "measurement"),
                                       ({"request_count": 0}, "request-count"), ({"frames": 8}, "4n\\+1"),
                                       ({"tasks": ("depth", "nope")}, "unknown task")])
def test_options_validate(kw, match):
    with pytest.raises(ThfmError, match=match):
        PerfOptions(**{"url": "127.0.0.1:8001", **kw}).validate()


def test_find_perf_analyzer(tmp_path):
    with pytest.raises(ThfmError, match="run scripts/setup.sh"):
        find_perf_analyzer(tmp_path)
    pa = fake_pa(tmp_path)
    pa.binary.parent.mkdir(parents=True)
    pa.binary.write_text("#!/bin/sh\n")
    pa.binary.chmod(pa.binary.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(ThfmError, match="libb64.so.0d"):
        find_perf_analyzer(tmp_path)
    pa.libdir.mkdir()
    for lib in ("libb64.so.0d", "libcudart.so.12"):
        (pa.libdir / lib).write_text("")
    assert find_perf_analyzer(tmp_path) == pa


def test_perf_analyzer_env(tmp_path):
    pa = fake_pa(tmp_path)
    env = pa.env({"LD_LIBRARY_PATH": "/x", "no_proxy": "a.example"}, host="127.0.0.1")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [str(pa.libdir), "/x"]
    assert env["no_proxy"] == "a.example,127.0.0.1" and env["NO_PROXY"] == "127.0.0.1"


def test_build_command_time_windows(tmp_path):
    pa = fake_pa(tmp_path)
    opts = PerfOptions(url="127.0.0.1:8001", model="core", measurement_ms=2500, stability_percentage=15, max_trials=6)
    argv = build_command(pa, opts, 4, ["--shape", "latent:16,3,8,8"], tmp_path / "c4.csv", batch_arg=2)
    assert argv[0] == str(pa.binary)
    flags = dict(zip(argv[1::2], argv[2::2]))
    assert flags["-m"] == "core" and flags["-u"] == "127.0.0.1:8001" and flags["-i"] == "grpc"
    assert flags["--concurrency-range"] == "4:4" and flags["-f"] == str(tmp_path / "c4.csv") and flags["-b"] == "2"
    assert flags["--measurement-mode"] == "time_windows" and flags["-p"] == "2500"
    assert flags["-s"] == "15" and flags["-r"] == "6" and flags["--shape"] == "latent:16,3,8,8"
    assert "--request-count" not in argv


def test_build_command_request_count(tmp_path):
    opts = PerfOptions(url="h:1", request_count=3)
    argv = build_command(fake_pa(tmp_path), opts, 8, [], tmp_path / "x.csv")
    # At least one request per concurrent slot.
    assert argv[argv.index("--request-count") + 1] == "8"
    assert "-p" not in argv and "-b" not in argv and "--measurement-mode" not in argv


# --- inputs ---------------------------------------------------------------------------------------------

def test_serialize_bytes_tensor():
    assert serialize_bytes_tensor([b"abc", b""]) == b"\x03\x00\x00\x00abc\x00\x00\x00\x00"


def test_make_clip_and_encode():
    from thfm_serve.clipgen import walking_clip

    clip = walking_clip(5, 32, 48)
    assert clip.shape == (5, 32, 48, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, walking_clip(5, 32, 48))  # deterministic
    assert not np.array_equal(clip[0], clip[1])  # it moves
    data = encode_clip(clip)
    assert data[4:8] == b"ftyp"  # an mp4
    from thfm_serve.video import decode_video_bytes

    assert decode_video_bytes(data).frames.shape == (5, 32, 48, 3)


def test_clip_input_data():
    inputs = served_inputs(entry_config())
    assert [i.datatype for i in inputs] == ["BYTES", "UINT8", "BYTES"] and inputs[1].optional
    data = clip_input_data(inputs, b"\x00\x01mp4", ["depth", "keypoints2d"])
    step = data["data"][0]
    assert set(step) == {"video", "tasks"}  # the optional raw-frames input is left out
    raw = base64.b64decode(step["video"]["b64"])
    assert struct.unpack("<I", raw[:4])[0] == 5 and raw[4:] == b"\x00\x01mp4"
    assert step["video"]["shape"] == [1]
    assert step["tasks"] == {"content": ["depth", "keypoints2d"], "shape": [2]}


def test_clip_input_data_rejects_unknown_inputs():
    inputs = served_inputs(entry_config()) + [ServedInput("extra", "FP32", (-1,), optional=False)]
    with pytest.raises(ThfmError, match="extra"):
        clip_input_data(inputs, b"x", ["depth"])
    with pytest.raises(ThfmError, match="entry contract"):
        clip_input_data([ServedInput("video", "BYTES", (1,))], b"x", ["depth"])


def test_geometry_from_entry_parameters():
    assert served_geometry(entry_config(13, 96, 128)) == {"frames": 13, "height": 96, "width": 128}
    opts = PerfOptions(url="h:1", height=160)
    assert resolve_geometry(opts, entry_config(13, 96, 128)) == (13, 160, 128)
    with pytest.raises(ThfmError, match="--frames/--height/--width"):
        resolve_geometry(PerfOptions(url="h:1"), None)


@pytest.mark.parametrize("max_batch_size", [0, 6])
def test_plan_core_uses_spec_shapes(tmp_path, max_batch_size):
    opts = PerfOptions(url="h:1", model="core", out=tmp_path, batch=2).validate()
    p = plan(opts, spec_config("core", max_batch_size), entry_config(9, 64, 64))
    spec = build_specs(TINY, 9, 64, 64, batch=2)["core"]
    # Derived from the spec, not written here: latent [2,16,3,8,8], text [2,16,32].
    want = spec.perf_shapes("opt", drop_batch=max_batch_size > 0)
    assert p.input_args == [x for s in want for x in ("--shape", s)]
    assert want[0] == ("latent:16,3,8,8" if max_batch_size else "latent:2,16,3,8,8")
    assert p.batch_arg == (2 if max_batch_size else None)
    assert p.frames_per_request == 18 and p.data_file is None


def test_plan_vae_and_entry(tmp_path):
    opts = PerfOptions(url="h:1", model="vae_decoder", out=tmp_path).validate()
    p = plan(opts, spec_config("vae_decoder", 6), entry_config(9, 64, 64))
    assert p.input_args == ["--shape", "latent:16,3,8,8"]
    opts = PerfOptions(url="h:1", model="thfm", out=tmp_path, tasks=("keypoints3d",)).validate()
    p = plan(opts, entry_config(5, 32, 32), None)
    assert p.input_args == ["--input-data", str(tmp_path / "input_data.json")]
    step = json.loads(p.data_file.read_text())["data"][0]
    assert step["tasks"]["content"] == ["keypoints3d"]
    assert base64.b64decode(step["video"]["b64"])[8:12] == b"ftyp"  # after the 4-byte length prefix
    assert p.geometry == {"frames": 5, "height": 32, "width": 32} and p.frames_per_request == 5


def test_plan_rejects_mismatched_or_unknown_models(tmp_path):
    config = spec_config("core", 6)
    config["input"][0]["dims"] = ["8", "-1", "-1", "-1"]  # 8 latent channels: not the spec's 16
    with pytest.raises(ThfmError, match="do not fit the spec"):
        plan(PerfOptions(url="h:1", model="core", out=tmp_path).validate(), config, entry_config())
    other = {"name": "other", "max_batch_size": 0, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1"]}]}
    with pytest.raises(ThfmError, match="no export spec"):
        plan(PerfOptions(url="h:1", model="other", out=tmp_path).validate(), other, None)


# --- results --------------------------------------------------------------------------------------------

def test_summarize_and_merge_csv(tmp_path):
    (tmp_path / "a.csv").write_text(CSV_TEXT)
    (tmp_path / "b.csv").write_text(CSV_TEXT.replace("\n2,5582.25,", "\n4,6000,"))
    merge_csv([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "perf.csv")
    rows = read_csv(tmp_path / "perf.csv")
    assert [r["Concurrency"] for r in rows] == ["2", "4"]
    s = summarize_row(rows[0], frames_per_request=9)
    assert s["concurrency"] == 2 and s["throughput_infer_per_s"] == pytest.approx(5582.25)
    assert s["p50_latency_ms"] == pytest.approx(0.351) and s["p99_latency_ms"] == pytest.approx(0.579)
    assert s["avg_latency_ms"] == pytest.approx((1 + 114 + 83 + 10 + 85 + 57 + 0) / 1000)
    assert s["frames_per_s"] == pytest.approx(5582.25 * 9)
    with pytest.raises(ThfmError, match="p50 latency"):
        summarize_row({"Concurrency": "1", "Inferences/Second": "2"})


def test_cli_registers_perf():
    from thfm_serve.cli import build_parser

    args = build_parser().parse_args(["perf", "--url", "127.0.0.1:8001", "--concurrency", "1,2,4", "--measurement-ms", "800"])
    assert args.command == "perf" and args.concurrency == "1,2,4" and args.measurement_ms == 800
    assert args.model == "thfm" and args.func.__module__ == "thfm_serve.commands.perf"


# --- engines ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines():
    """perf/engines.py, the benchmark's engines (benchmark-only code: not part of the package)."""
    return load_perf_script("engines", "perf_engines")


def test_torch_engines_match_the_core(tiny_checkpoint, engines):
    import torch

    from thfm_serve import serving
    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.contract.specs import tolerance_for

    ck = load_checkpoint(tiny_checkpoint, text_encoder=False)
    spec = build_specs(ck.config, 5, 32, 32, batch=2)["core"]
    feed = spec.dummy_inputs("opt", seed=3)
    with torch.no_grad():
        ref = [t.float().numpy() for t in ck.core()(*(torch.from_numpy(feed[n]) for n in spec.input_names))]
    fp32 = engines.load_core_engine("torch-fp32", tiny_checkpoint, threads=1)
    got = fp32(feed)
    for name, r in zip(spec.output_names, ref):
        np.testing.assert_allclose(got[name], r, rtol=1e-5, atol=1e-5)
    bf16 = engines.load_core_engine("torch-bf16", tiny_checkpoint, threads=1)
    got = bf16(feed)
    for name, r in zip(spec.output_names, ref):
        assert got[name].dtype == np.float32
        tol = tolerance_for("bf16", "latent" if name == "pred_latent" else "keypoints")
        ok, max_abs, _ = tol.check(got[name], r)
        assert ok, (name, max_abs)
    # The InferenceSession surface: serving.OnnxModel takes an engine where it takes a session.
    model = serving.OnnxModel(spec, bf16)
    out = model.run(feed)
    assert list(out) == spec.output_names and out["kp2d"].shape == (2, 5, ck.config.num_joints, 2)
    with pytest.raises(ThfmError, match="unknown core engine"):
        engines.load_core_engine("tensorrt", tiny_checkpoint)


def test_vae_engine_and_ort_engine(tiny_checkpoint, tmp_path, engines):
    import onnx
    from onnx import TensorProto, helper

    enc = engines.load_vae_engine("torch-fp32", tiny_checkpoint, "vae_encoder", threads=1)
    video = np.random.default_rng(0).uniform(-1, 1, (1, 3, 5, 32, 32)).astype(np.float32)
    assert enc({"video": video})["latent"].shape == (1, 16, 2, 4, 4)
    with pytest.raises(ThfmError, match="fp32"):
        engines.load_vae_engine("torch-bf16", tiny_checkpoint, "vae_decoder")

    # A two-output graph stands in for an exported model: the session options and the name plumbing.
    x = helper.make_tensor_value_info("latent", TensorProto.FLOAT, ["b", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 4]) for n in ("maps", "neg")]
    graph = helper.make_graph([helper.make_node("Identity", ["latent"], ["maps"]), helper.make_node("Neg", ["latent"], ["neg"])],
                              "g", [x], outs)
    path = tmp_path / "vae_decoder" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    eng = engines.load_vae_engine("onnxruntime", path, "vae_decoder", threads=1)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = eng({"latent": a})
    np.testing.assert_array_equal(got["maps"], a)
    np.testing.assert_array_equal(eng.run(["neg"], {"latent": a})[0], -a)
    assert [i.name for i in eng.get_inputs()] == ["latent"] and eng.model == "vae_decoder"
    with pytest.raises(ThfmError, match="missing"):
        engines.load_core_engine("onnxruntime", tmp_path / "nope.onnx")


# --- the benchmark's pure parts ----------------------------------------------------------------------------

def _bench():
    return load_perf_script("bench_core")


def test_bench_flops_match_the_flop_counter(tiny_checkpoint):
    """The analytic count agrees with torch's FlopCounterMode on the same shapes (meta device)."""
    bench = _bench()
    job = {"checkpoint": str(tiny_checkpoint), "frames": 9, "height": 64, "width": 64, "batch": 2}
    counted = bench.flop_counter_worker(job)
    tcfg = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    ana = bench.core_flops(tcfg, 16, 9, 64, 64, batch=2)
    peer = bench.core_flops(tcfg, 16, 9, 64, 64, batch=2, with_tokens=False)
    assert ana["tokens"] == 3 * 4 * 4 + 9 and peer["tokens"] == 48
    # The counter also sees the time embedding and keypoint heads (not counted analytically: < 5% here,
    # far less at Wan sizes).
    assert counted["core"] == pytest.approx(ana["total"], rel=0.05)
    assert counted["peer"] == pytest.approx(peer["total"], rel=0.05)


def test_bench_1_3b_flops_are_dominated_by_the_blocks():
    bench = _bench()
    from thfm_serve.config import PRESETS

    tcfg = PRESETS["wan2.1-1.3b"].transformer
    f = bench.core_flops(tcfg, 512, 17, 256, 256)
    assert f["video_tokens"] == 5 * 16 * 16 and f["tokens"] == 1280 + 17
    blocks = sum(f[k] for k in ("self_attn_proj", "self_attn_qk_av", "cross_attn_proj", "cross_attn_qk_av", "ffn"))
    assert blocks / f["total"] > 0.99
    assert 3.5e12 < f["total"] < 4.5e12  # ~127 GFLOP per block x 30 blocks


# --- live: real tritonserver + perf_analyzer --------------------------------------------------------------

ENTRY_PBTXT = """\
name: "thfm"
backend: "python"
max_batch_size: 0
input [
  { name: "video" data_type: TYPE_STRING dims: [ 1 ] optional: true },
  { name: "frames" data_type: TYPE_UINT8 dims: [ -1, -1, -1, 3 ] optional: true },
  { name: "tasks" data_type: TYPE_STRING dims: [ -1 ] }
]
output [ { name: "depth" data_type: TYPE_FP32 dims: [ -1, -1, -1 ] } ]
parameters { key: "window_frames" value: { string_value: "5" } }
parameters { key: "height" value: { string_value: "32" } }
parameters { key: "width" value: { string_value: "32" } }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# Decodes the video perf_analyzer sends (the generated mp4) and checks the task list: a data file that
# is not a real video, or not the clip geometry, fails the request and so the sweep.
ENTRY_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils
from thfm_serve.video import decode_video_bytes


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            try:
                video = pb_utils.get_input_tensor_by_name(request, "video").as_numpy()
                tasks = [t.decode() for t in pb_utils.get_input_tensor_by_name(request, "tasks").as_numpy()]
                frames = decode_video_bytes(bytes(video[0])).frames
                if frames.shape != (5, 32, 32, 3) or tasks != ["depth", "keypoints2d"]:
                    raise ValueError(f"unexpected clip {frames.shape} / tasks {tasks}")
                depth = frames.mean(axis=-1).astype(np.float32)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("depth", depth)]))
            except Exception as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return out
"""

CORE_PY = """\
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.want = json.loads(args["model_config"])["parameters"]["want"]["string_value"]

    def execute(self, requests):
        out = []
        for request in requests:
            latent = pb_utils.get_input_tensor_by_name(request, "latent").as_numpy()
            text = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
            got = f"{list(latent.shape)} {list(text.shape)}"
            if got != self.want:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"shapes {got}, want {self.want}")))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("pred_latent", -latent)]))
        return out
"""


def core_pbtxt(want: str) -> str:
    spec = build_specs(ThfmConfig(frames=5, height=32, width=32, text_len=16, text_dim=32))["core"]
    dims = {t.name: spec.triton_dims(t.name, drop_batch=True) for t in spec.inputs + spec.outputs}
    return f"""\
name: "core"
backend: "python"
max_batch_size: 6
input [
  {{ name: "latent" data_type: TYPE_FP32 dims: {dims["latent"]} }},
  {{ name: "text" data_type: TYPE_FP32 dims: {dims["text"]} }}
]
output [ {{ name: "pred_latent" data_type: TYPE_FP32 dims: {dims["pred_latent"]} }} ]
parameters {{ key: "want" value: {{ string_value: "{want}" }} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""


@pytest.fixture(scope="module")
def perf_server(tmp_path_factory):
    from thfm_serve.server import ServerConfig, TritonServer, server_ports

    try:
        find_perf_analyzer()
    except ThfmError as e:
        pytest.skip(str(e))
    repo = tmp_path_factory.mktemp("perf_repo")
    for name, pbtxt, py in (("thfm", ENTRY_PBTXT, ENTRY_PY),
                            ("core", core_pbtxt("[2, 16, 2, 4, 4] [2, 16, 32]"), CORE_PY)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(pbtxt)
        (repo / name / "1" / "model.py").write_text(py)
    cfg = ServerConfig(repo=repo, **server_ports())
    with TritonServer(cfg, log_path=repo.parent / "server.log") as server:
        yield server


@pytest.mark.server
@pytest.mark.timeout(300, func_only=True)
def test_live_entry_sweep(perf_server, tmp_path):
    out = tmp_path / "entry"
    summary = run_perf(PerfOptions(url=perf_server.grpc_url, out=out, concurrency=(1, 2), request_count=6))
    assert [r["concurrency"] for r in summary["results"]] == [1, 2]
    assert all("error" not in r for r in summary["results"]), summary["results"]
    for r in summary["results"]:
        assert r["throughput_infer_per_s"] > 0 and 0 < r["p50_latency_ms"] <= r["p99_latency_ms"]
        assert r["frames_per_s"] == pytest.approx(5 * r["throughput_infer_per_s"])
    # Geometry came from the entry model's parameters; the CSV holds both levels.
    assert summary["geometry"] == {"frames": 5, "height": 32, "width": 32}
    assert [row["Concurrency"] for row in read_csv(out / "perf.csv")] == ["1", "2"]
    assert json.loads((out / "summary.json").read_text())["results"] == summary["results"]
    assert (out / "input_data.json").is_file()


@pytest.mark.server
@pytest.mark.timeout(300, func_only=True)
def test_live_core_shapes_from_spec(perf_server, tmp_path):
    """Shapes come from the export spec at the entry model's geometry; the toy core fails any other."""
    summary = run_perf(PerfOptions(url=perf_server.grpc_url, model="core", out=tmp_path, batch=2, request_count=4))
    r = summary["results"][0]
    assert "error" not in r, r
    assert summary["frames_per_request"] == 10 and r["throughput_infer_per_s"] > 0


@pytest.mark.server
@pytest.mark.timeout(300, func_only=True)
def test_live_failures_are_reported(perf_server, tmp_path):
    # Wrong tasks: the entry model answers with an error, perf_analyzer fails, and the message says so.
    with pytest.raises(ThfmError, match="every concurrency level"):
        run_perf(PerfOptions(url=perf_server.grpc_url, out=tmp_path, tasks=("depth",), request_count=2))
    with pytest.raises(ThfmError, match="not ready"):
        run_perf(PerfOptions(url=perf_server.grpc_url, model="nope", out=tmp_path, request_count=2))


@pytest.mark.server
@pytest.mark.timeout(300, func_only=True)
def test_live_cli(perf_server, tmp_path):
    from thfm_serve.cli import main

    rc = main(["-q", "perf", "--url", perf_server.grpc_url, "--out", str(tmp_path), "--request-count", "3"])
    assert rc == 0
    assert json.loads((tmp_path / "summary.json").read_text())["results"][0]["concurrency"] == 1


def test_int8_recipes_slice(tiny_checkpoint, tmp_path):
    """perf/int8_recipes.py on a one-block slice: every recipe quantises what it says, the CPU recipe's
    linears run as fused QLinearMatMul, and the report files carry the command."""
    mod = load_perf_script("int8_recipes")
    out = tmp_path / "out"
    rc = mod.main(["--checkpoint", str(tiny_checkpoint), "--layers", "1", "--frames", "9", "--height", "64", "--width", "64",
                   "--runs", "1", "--warmup", "0", "--out", str(out), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    (js,) = out.glob("int8_recipes_*.json")
    rows = json.loads(js.read_text())["rows"]
    assert set(rows) == {"fp32", "cpu", "cpu+attention", "gpu", "cpu+7bit", "cpu+u8u8"}
    assert rows["fp32"]["ops"].get("QLinearMatMul", 0) == 0
    assert rows["cpu"]["ops"].get("QLinearMatMul", 0) > 0
    # Attention products add two quantised MatMuls per attention (self and cross) of the one block.
    assert rows["cpu+attention"]["qdq"]["quantized_matmuls"] == rows["cpu"]["qdq"]["quantized_matmuls"] + 4
    assert rows["gpu"]["qdq"]["quantized_matmuls"] == rows["cpu+attention"]["qdq"]["quantized_matmuls"]
    for name in ("cpu", "cpu+attention", "gpu", "cpu+7bit", "cpu+u8u8"):
        assert all(np.isfinite(v) for v in rows[name]["max_abs_vs_fp32"].values())
    # The variants for CPUs without VNNI store what they say: weights in 7 bits, or unsigned.
    work = next((tmp_path / "work").iterdir())
    weights = {name: _quantized_weights(work / name / "model.onnx") for name in ("cpu", "cpu+7bit", "cpu+u8u8")}
    assert all(w.dtype == np.int8 for w in weights["cpu"]) and max(int(np.abs(w).max()) for w in weights["cpu"]) == 127
    assert all(w.dtype == np.int8 and -64 <= int(w.min()) and int(w.max()) <= 64 for w in weights["cpu+7bit"])
    assert all(w.dtype == np.uint8 for w in weights["cpu+u8u8"]) and weights["cpu+u8u8"]
    md = js.with_suffix(".md").read_text()
    assert "perf/int8_recipes.py" in md and "| cpu+attention |" in md


def _quantized_weights(path):
    """The stored (quantised) weights: DequantizeLinear inputs that are initializers of rank 2."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[0]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2]


@pytest.mark.slow
def test_vae_int8_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    """perf/vae_int8.py: both graphs timed in fp32 and int8 (the decoder also with every Conv int8),
    every quantised Conv run as QLinearConv, and the decoder batch a CPU repository would use at this grid (all four dense rows).
    Slow (four exports and a calibration: about a minute on 2 cores)."""
    mod = load_perf_script("vae_int8")
    out = tmp_path / "out"
    rc = mod.main(["--checkpoint", str(tiny_checkpoint), "--frames", "5", "--height", "32", "--width", "32",
                   "--runs", "1", "--warmup", "0", "--out", str(out), "--workdir", str(tmp_path / "work")])
    assert rc == 0
    (js,) = out.glob("vae_int8_*_5x32x32.json")
    report = json.loads(js.read_text())
    assert report["decoder_rows"] == 4
    rows = report["rows"]
    assert rows["vae_decoder"]["input_shape"][0] == 4 and rows["vae_encoder"]["input_shape"] == [1, 3, 5, 32, 32]
    for r in rows.values():
        assert r["int8_runs_as"]["qlinear_conv_3d"] > 0
        assert r["fp32_median_s"] > 0 and r["int8_median_s"] > 0 and np.isfinite(r["max_abs_vs_fp32"])
    # The recipe's decoder keeps its float tail; the every-Conv variant beside it has none.
    assert rows["vae_encoder"]["int8_runs_as"]["float_conv"] == 0 and "vae_encoder" not in report["every_conv"]
    assert rows["vae_decoder"]["int8_runs_as"]["float_conv"] > 0
    every = report["every_conv"]["vae_decoder"]
    assert every["int8_runs_as"]["float_conv"] == 0 and every["int8_median_s"] > 0
    assert (every["int8_runs_as"]["qlinear_conv_3d"] + every["int8_runs_as"]["qlinear_conv_2d"]
            == rows["vae_decoder"]["int8_runs_as"]["qlinear_conv_3d"] + rows["vae_decoder"]["int8_runs_as"]["qlinear_conv_2d"]
            + rows["vae_decoder"]["int8_runs_as"]["float_conv"])
    assert "perf/vae_int8.py" in js.with_suffix(".md").read_text()
    # --recipe-only: the exporter's recipe alone (no every-Conv decoder); --name: the files' stem.
    assert mod.main(["--checkpoint", str(tiny_checkpoint), "--frames", "5", "--height", "32", "--width", "32",
                     "--runs", "1", "--warmup", "0", "--out", str(out), "--workdir", str(tmp_path / "work2"),
                     "--recipe-only", "--name", "only"]) == 0
    only = json.loads((out / "only.json").read_text())
    assert only["every_conv"] == {} and set(only["rows"]) == {"vae_encoder", "vae_decoder"}
    assert not list((tmp_path / "work2").glob("*/vae_decoder/onnxruntime-x86-conv"))


def test_bench_mixed_roofline_and_report(tmp_path):
    """int8 engines get a second utilisation against int8 linears + fp32 attention; --report re-renders
    a saved run's JSON into the same files."""
    bench = _bench()
    tcfg = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30, "text_dim": 4096,
            "in_channels": 16, "out_channels": 16}
    flops = bench.core_flops(tcfg, 512, 17, 256, 256)
    peer_flops = bench.core_flops(tcfg, 512, 17, 256, 256, with_tokens=False)
    ok = {"status": "ok", "accuracy": {"ok": True, "outputs": {"pred_latent": {"max_abs": 0.01}}}, "peak_rss_mb": 1.0, "load_s": 1.0, "loadavg": [0, 0]}
    r = {"shape": {"frames": 17, "batch": 1, "height": 256, "width": 256, "latent": [1, 16, 5, 32, 32],
                   "video_tokens": 1280, "tokens": 1297},
         "flops": flops, "flops_peer": peer_flops,
         "peak": {"status": "ok", "size": 64, "threads": 2, "peak": {"fp32": 500.0, "bf16": 900.0, "int8": 1500.0},
                  "gflops": {"fp32": {"x": 500.0}, "bf16": {"y": 900.0}, "int8": {"z": 1500.0}}},
         "core": {"diffusers-fp32": {**ok, "median_s": 20.0}, "torch-fp32": {**ok, "median_s": 19.0},
                  "ort-int8": {**ok, "median_s": 4.0}},
         "vae": {}, "e2e": {}, "notes": [], "command": "cmd", "name": "x", "checkpoint_name": "ck", "threads": 2,
         "runs": 3, "warmup": 1, "tasks": ["depth"], "text_len": 512, "transformer_config": tcfg, "started": "now",
         "loadavg_start": 0.0, "machine": {"model": "cpu", "cores": 2, "isa": {"avx2": True, "fma": True, "avx512f": False},
                                           "mem_gb": 1}}
    bench.annotate(r)
    attn = flops["self_attn_qk_av"] + flops["cross_attn_qk_av"]
    small = flops["patch_embed"] + flops["text_embed"] + flops["proj_out"]
    ideal = (flops["total"] - attn - small) / 1500e9 + (attn + small) / 500e9
    got = r["core"]["ort-int8"]
    assert got["utilisation_mixed"] == pytest.approx(ideal / 4.0)
    assert got["utilisation"] == pytest.approx(flops["total"] / 4.0 / 1500e9)
    assert got["utilisation_mixed"] > got["utilisation"]
    assert "utilisation_mixed" not in r["core"]["torch-fp32"]
    names = [t[0] for t in bench.targets(r)]
    assert any("mixed int8/fp32 roofline" in n for n in names)

    js = tmp_path / "run.json"
    js.write_text(json.dumps(r))
    assert bench.main(["--report", str(js)]) == 0
    md = (tmp_path / "run.md").read_text()
    assert "% of mixed roofline" in md and "| ort-int8 | int8 | 4.00 s |" in md and (tmp_path / "run.png").is_file()
    # Every table says which machine class it is from (a run saved before the class was recorded
    # gets it from its ISA flags); the peak section lists the instruction sets.
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert len(headings) >= 5 and all(h.endswith("[avx2-fma]") for h in headings), headings
    assert "Machine class: avx2-fma." in md and "Instruction sets: avx2, fma." in md
    r["machine"]["class"] = "amx"
    assert all(h.endswith("[amx]") for h in bench.markdown(r, "x.png").splitlines() if h.startswith("## "))


def test_bench_records_the_machine(monkeypatch):
    bench = _bench()
    monkeypatch.syspath_prepend(str(ROOT / "perf"))  # the workers import perf/engines.py as the script does
    from thfm_serve.machine import read_cpu

    m = bench.cpu_info()
    assert m["class"] == read_cpu().machine_class and set(m["isa"]) >= {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8"}
    # The matmul peaks carry the instruction sets that produced them (small matmuls: seconds).
    peak = bench.peak_worker({"matmul_size": 128, "threads": 1, "matmul_runs": 2})
    assert peak["machine_class"] == m["class"] and peak["isa"] == m["isa"]
    assert all(v and v > 0 for v in peak["peak"].values())
