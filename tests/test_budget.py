"""The response budget (thfm_serve.budget): sizes, the limit, the output-size option.

Sizes are checked against the arrays the entry path really returns (serving.run_entry over the
tiny pipeline's torch graphs), not against a formula restated here.
"""

from __future__ import annotations

import numpy as np
import pytest

from thfm_serve import budget, serving
from thfm_serve.contract import protocol
from thfm_serve.config import DENSE_TASKS, TASKS, parse_tasks
from thfm_serve.errors import ShapeError, TaskError, ThfmError


def test_response_bytes_equal_the_entry_outputs(tiny_pipeline):
    from test_repository import TorchGraphs

    frames = np.random.default_rng(0).integers(0, 256, (6, 40, 56, 3), dtype=np.uint8)
    emb = {t: tiny_pipeline.ck.task_embedding(t).numpy() for t in TASKS}
    joints = len(tiny_pipeline.cfg.joint_names)
    grid = serving.Grid(9, 64, 64)
    for output_hw, tasks in (((40, 56), list(TASKS)), ((64, 64), ["normals", "keypoints2d"])):
        got = serving.run_entry(frames, tasks, grid, tiny_pipeline.cfg, emb, TorchGraphs(tiny_pipeline, 9), output_hw)
        outputs = serving.entry_outputs(got)
        floats = sum(v.nbytes for k, v in outputs.items() if k != protocol.OUTPUT_JOINT_NAMES)
        names = sum(len(n) + 4 for n in outputs.get(protocol.OUTPUT_JOINT_NAMES, []))
        size = budget.response_bytes(tasks, 6, *output_hw, joints)
        # Exact for the float outputs; the joint names are bounded from above.
        assert floats <= size and size - floats >= names
        assert size - floats == joints * 64
        for t in DENSE_TASKS:
            if t in outputs:
                assert outputs[t].shape[1:3] == output_hw


def test_output_size_model_equals_the_pipeline_at_the_grid(tiny_pipeline):
    from test_repository import TorchGraphs, _assert_same

    frames = np.random.default_rng(1).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    emb = {t: tiny_pipeline.ck.task_embedding(t).numpy() for t in TASKS}
    tasks = ["depth", "keypoints2d"]
    got = serving.run_entry(frames, tasks, serving.Grid(9, 64, 64), tiny_pipeline.cfg, emb,
                            TorchGraphs(tiny_pipeline, 9), (64, 64))
    ref = tiny_pipeline.run(frames, tasks, output_size="model")
    _assert_same(got, ref, tasks)
    assert got["depth"]["depth"].shape == (5, 64, 64)
    # Keypoints stay in input pixels: identical to the input-size run.
    at_input = tiny_pipeline.run(frames, tasks)
    np.testing.assert_array_equal(ref["keypoints2d"]["keypoints"], at_input["keypoints2d"]["keypoints"])


def test_the_issue_example_is_refused_with_the_size_and_the_ways_out():
    # 600 frames of 640x360 asking for normals: 1.66 GB of float32.
    with pytest.raises(ShapeError) as err:
        budget.check_response(["normals"], 600, (360, 640), 24, budget.DEFAULT_MAX_RESPONSE_BYTES,
                              grid_hw=(480, 832), window=81)
    msg = str(err.value)
    assert "the response would be 1658880000 bytes (1.54 GiB: 600 frames at 640x360; normals 1.54 GiB)" in msg
    assert "above the limit max_response_bytes=1073741824" in msg
    assert "at most 388 frames per request (the client cuts clips into windows of 81)" in msg
    assert "output_size" not in msg  # the model grid (480x832) is bigger than this input: no help
    assert "fewer tasks" not in msg  # one task asked for
    # Within the limit: the size is returned.
    assert budget.check_response(["depth"], 600, (360, 640), 24, 1 << 30) == 600 * 360 * 640 * 4


def test_check_response_suggests_the_model_grid_and_fewer_tasks():
    # 81 frames of 1080p: depth 0.63 GiB + normals 1.88 GiB; at 480x832 both are 0.48 GiB.
    with pytest.raises(ShapeError, match=r"output_size='model' \(832x480: 493.6 MiB\), or fewer tasks per request"):
        budget.check_response(["depth", "normals", "keypoints3d"], 81, (1080, 1920), 24, 1 << 30, grid_hw=(480, 832))


def test_read_output_size():
    assert budget.read_output_size(None) == "input"
    assert budget.read_output_size(np.array([b"model"], dtype=np.object_)) == "model"
    assert budget.read_output_size(np.array([b"input"], dtype=np.object_)) == "input"
    with pytest.raises(ShapeError, match=r"'output_size' is 'huge'; choose 'input' or 'model'"):
        budget.read_output_size(np.array([b"huge"], dtype=np.object_))
    with pytest.raises(ShapeError, match="must be one BYTES element"):
        budget.read_output_size(np.array([b"model", b"model"], dtype=np.object_))
    assert budget.output_resolution("model", (1080, 1920), (480, 832)) == (480, 832)
    assert budget.output_resolution("input", (1080, 1920), (480, 832)) == (1080, 1920)


def test_limit_cannot_pass_the_grpc_ceiling():
    assert serving.Limits().max_response_bytes == 1 << 30
    serving.Limits(max_response_bytes=budget.MAX_RESPONSE_CEILING).validate()
    with pytest.raises(ThfmError, match="above what one gRPC message can carry"):
        serving.Limits(max_response_bytes=2**31 - 1).validate()
    with pytest.raises(ThfmError, match="must be a positive integer"):
        serving.Limits(max_response_bytes=0).validate()
    params = serving.Limits(max_response_bytes=12345).to_params()
    assert params[protocol.PARAM_MAX_RESPONSE_BYTES] == "12345"
    assert serving.limits_from_params(params).max_response_bytes == 12345
    # A repository written before the limit existed gets the default.
    del params[protocol.PARAM_MAX_RESPONSE_BYTES]
    assert serving.limits_from_params(params).max_response_bytes == budget.DEFAULT_MAX_RESPONSE_BYTES


def test_all_may_be_repeated_or_mixed():
    assert parse_tasks(["all", "all"]) == list(TASKS)
    assert parse_tasks(["depth", "all"]) == list(TASKS)
    assert parse_tasks("all,all") == list(TASKS)
    with pytest.raises(TaskError, match="unknown task 'flow'"):
        parse_tasks(["all", "flow"])


def test_a_declared_frame_count_is_refused_from_the_headers(tmp_path, monkeypatch):
    """mp4 declares its frame count: the answer is sized before a frame is decoded. mkv does not: the
    check waits for the decode (still before any model work)."""
    from thfm_serve import video as video_mod
    from thfm_serve.video import encode_video

    limits = serving.Limits(max_frames=100, max_pixels=96 * 96, max_response_bytes=4 << 20)
    frames = np.zeros((40, 96, 96, 3), np.uint8)
    encode_video(frames, tmp_path / "clip.mp4")
    encode_video(frames, tmp_path / "clip.mkv")
    mp4 = np.array([(tmp_path / "clip.mp4").read_bytes()], dtype=np.object_)
    mkv = np.array([(tmp_path / "clip.mkv").read_bytes()], dtype=np.object_)

    def no_decoding(*a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(video_mod, "_decode", no_decoding)
    with pytest.raises(ShapeError, match=r"the response would be 4423680 bytes .* above the limit max_response_bytes"):
        budget.check_declared_video(mp4, ["normals"], "input", (32, 32), 24, limits, 5)
    # At the model grid the same clip fits; depth fits at the input size.
    budget.check_declared_video(mp4, ["normals"], "model", (32, 32), 24, limits, 5)
    budget.check_declared_video(mp4, ["depth"], "input", (32, 32), 24, limits, 5)
    # No declared count, no data, or not a video: left to the decode.
    for value in (mkv, None, np.array([b"junk" * 10], dtype=np.object_)):
        budget.check_declared_video(value, ["normals"], "input", (32, 32), 24, limits, 5)


def test_predict_command_takes_output_size(tiny_checkpoint, tmp_path):
    from thfm_serve.cli import main
    from thfm_serve.video import encode_video

    encode_video(np.random.default_rng(2).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8), tmp_path / "c.mp4")
    for size, shape in (("model", (3, 64, 64)), ("input", (3, 40, 56))):
        out = tmp_path / size
        assert main(["predict", str(tmp_path / "c.mp4"), "--checkpoint", str(tiny_checkpoint), "--tasks", "depth",
                     "--out", str(out), "--output-size", size]) == 0
        with np.load(out / "depth.npz") as data:
            assert data["depth"].shape == shape
