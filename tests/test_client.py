"""Client unit tests: windows and stitching, the scheduler, the wire format, the sync and asyncio
clients over a fake in-process transport, the pictures, and `thfm predict --url` errors.

Nothing here starts tritonserver (tests/test_client_server.py does); the whole file runs in about
half a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from thfm_serve.client import AsyncThfmClient, ServerInfo, ThfmClient
from thfm_serve.client import aio as client_aio
from thfm_serve.client import sync as client_sync
from thfm_serve.client import wire
from thfm_serve.client.scheduler import Assignment, WindowScheduler
from thfm_serve.client.transport import RequestError, classify, normalize_url
from thfm_serve.contract.windows import Stitcher, default_overlap, fade_weights, max_overlap, plan_windows
from thfm_serve.config import SMPL_JOINTS
from thfm_serve.errors import ServerError, ShapeError, TaskError, ThfmError
from thfm_serve.contract.tasks import OUTPUT_KEYS
from thfm_serve.server import free_port
from thfm_serve.video import decode_video_bytes, read_video
from thfm_serve.clipgen import make_clip

# --- windows --------------------------------------------------------------------------------------


def _coverage(plan, n):
    """Per input frame: the list of (window index, weight) that contribute to it."""
    cover = [[] for _ in range(n)]
    for win in plan:
        for t in range(win.use_start, win.use_stop):
            w = 1.0
            if win.fade_in and t < win.use_start + win.fade_in:
                w = float(fade_weights(win.fade_in)[t - win.use_start])
            if win.fade_out and t >= win.use_stop - win.fade_out:
                w = float(1 - fade_weights(win.fade_out)[t - (win.use_stop - win.fade_out)])
            cover[t].append((win.index, w))
    return cover


@pytest.mark.parametrize("window", [1, 5, 9, 17, 81])
@pytest.mark.parametrize("n", [1, 3, 9, 10, 17, 23, 40, 81, 82, 200, 247])
def test_plan_covers_every_frame_with_weights_summing_to_one(n, window):
    for overlap in sorted({0, 1, default_overlap(window), max_overlap(window)}):
        if overlap > max_overlap(window):
            continue
        plan = plan_windows(n, window, overlap)
        cover = _coverage(plan, n)
        for t, parts in enumerate(cover):
            assert 1 <= len(parts) <= 2, (n, window, overlap, t, parts)
            assert abs(sum(w for _, w in parts) - 1) < 1e-6
        for win in plan:
            assert win.start <= win.use_start < win.use_stop <= win.stop
            # Every request is a full model window once the clip is longer than one.
            assert win.frames == (window if n > window else n)
        assert [w.index for w in plan] == list(range(len(plan)))
        assert plan[0].start == 0 and plan[-1].stop == n


@pytest.mark.parametrize("n,window", [(1, 9), (4, 9), (9, 9), (10, 9), (23, 9), (27, 9), (81, 81), (200, 81)])
def test_overlap_zero_is_back_to_back_windows(n, window):
    """Overlap 0: windows one after another, the last aligned to the end and only its new frames used."""
    ours = plan_windows(n, window, 0)
    if n <= window:
        expected = [(0, n, 0, n)]
    else:
        starts = list(range(0, n - window, window))  # each ends before n
        expected = [(s, s + window, s, s + window) for s in starts] + [(n - window, n, starts[-1] + window, n)]
    assert [(w.start, w.stop, w.use_start, w.use_stop) for w in ours] == expected


def test_overlap_out_of_range_is_a_clear_error():
    with pytest.raises(ShapeError, match="overlap 5 is outside 0..4"):
        plan_windows(30, 9, 5)
    with pytest.raises(ShapeError, match="overlap"):
        plan_windows(30, 9, -1)


def test_stitching_is_a_linear_cross_fade():
    n, window, overlap = 12, 9, 3
    plan = plan_windows(n, window, overlap)
    assert [(w.start, w.stop) for w in plan] == [(0, 9), (3, 12)]
    s = Stitcher(plan, n)
    s.add(plan[0], np.zeros((9, 2), np.float32))
    s.add(plan[1], np.ones((9, 2), np.float32))
    out = s.result()[:, 0]
    # The zone before the end-aligned last window is the last 3 frames of window 0: frames 6, 7, 8.
    assert np.allclose(out, [0, 0, 0, 0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1])


def test_stitching_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(0)
    n, window = 47, 9
    plan = plan_windows(n, window, 4)
    parts = [rng.standard_normal((window, 5, 3)).astype(np.float32) for _ in plan]
    results = []
    for order in (range(len(plan)), reversed(range(len(plan))), rng.permutation(len(plan))):
        s = Stitcher(plan, n)
        for i in order:
            s.add(plan[i], parts[i])
        results.append(s.result())
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert results[0].tobytes() == results[1].tobytes() == results[2].tobytes()


def test_stitching_rejects_a_wrong_answer():
    plan = plan_windows(20, 9, 2)
    s = Stitcher(plan, 20)
    with pytest.raises(ShapeError, match="returned 8 frames"):
        s.add(plan[0], np.zeros((8, 4), np.float32))
    s.add(plan[0], np.zeros((9, 4), np.float32))
    with pytest.raises(ShapeError, match="per frame"):
        s.add(plan[1], np.zeros((9, 5), np.float32))


# --- scheduler ------------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_scheduler_spreads_windows_and_bounds_requests_in_flight():
    s = WindowScheduler(list(range(6)), ["a", "b"], max_in_flight=3)
    got = [s.next() for _ in range(4)]
    assert [g.url for g in got[:3]] == ["a", "b", "a"] and got[3] is None  # bound reached
    s.succeeded(got[1].key)
    nxt = s.next()
    assert isinstance(nxt, Assignment) and nxt.url == "b" and nxt.key == 3


def test_scheduler_retries_elsewhere_and_avoids_a_failed_server():
    clock = Clock()
    s = WindowScheduler([0, 1, 2], ["a", "b"], max_in_flight=2, retries=2, clock=clock)
    w0, w1 = s.next(), s.next()
    assert (w0.url, w1.url) == ("a", "b")
    assert s.failed(w1.key, "boom", retriable=True) is None
    retry = s.next()
    assert retry.key == w1.key and retry.url == "a" and retry.attempt == 2  # b is cooling down
    s.succeeded(w0.key)
    assert s.next().url == "a"  # still avoiding b
    clock.t += 60
    s.succeeded(retry.key)
    assert s.usage() == {"a": 2, "b": 0}


def test_scheduler_gives_up_after_the_retries():
    clock = Clock()
    s = WindowScheduler([0], ["a"], max_in_flight=1, retries=1, clock=clock)
    a = s.next()
    assert s.failed(a.key, "down", True) is None
    wait = s.next()
    assert isinstance(wait, float) and wait > 0  # the only server cools down: wait, do not burn retries
    clock.t += wait
    b = s.next()
    assert b.attempt == 2
    why = s.failed(b.key, "down again", True)
    assert "2 attempts" in why and "down again" in why


def test_scheduler_does_not_retry_a_bad_request():
    s = WindowScheduler([0, 1], ["a", "b"], max_in_flight=2)
    a = s.next()
    assert s.failed(a.key, "unknown task 'x'", retriable=False) == "unknown task 'x'"


# --- wire -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 33, 47, 3), (1, 2, 2, 3), (9, 64, 64, 3)])
def test_window_encoding_is_lossless(shape):
    frames = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    data = wire.encode_window(frames, 24.0)
    assert np.array_equal(decode_video_bytes(data).frames, frames)


def test_window_encoding_is_smaller_than_raw_for_real_looking_video(tmp_path):
    path = tmp_path / "c.mp4"
    make_clip(path, frames=17, height=96, width=128)
    frames = read_video(path).frames
    assert len(wire.encode_window(frames)) < frames.nbytes / 4


def test_message_limits_and_task_groups():
    assert wire.message_limit(0) == 4 << 20
    assert wire.message_limit(100 << 20) > 100 << 20
    assert wire.message_limit(5 << 30) == wire.GRPC_MAX_MESSAGE
    assert wire.group_tasks(["depth", "normals", "keypoints2d"], 9, 64, 64) == [("depth", "normals", "keypoints2d")]
    # 97 frames of 1080p: normals alone are 2.4 GB; depth + segmentation of 145 frames (2.4 GB) need two
    # requests per window, and the keypoints ride along with the second.
    with pytest.raises(ShapeError, match="normals result for one window"):
        wire.group_tasks(["normals"], 97, 1080, 1920)
    assert wire.group_tasks(["depth", "segmentation", "keypoints2d"], 81, 1080, 1920) == \
        [("depth", "segmentation", "keypoints2d")]
    assert wire.group_tasks(["depth", "segmentation", "keypoints2d"], 145, 1080, 1920) == \
        [("depth",), ("segmentation", "keypoints2d")]
    # The server's max_response_bytes splits further: 81 frames of 1080p depth are 0.63 GiB.
    assert wire.group_tasks(["depth", "segmentation", "keypoints2d"], 81, 1080, 1920, 1 << 30) == \
        [("depth",), ("segmentation", "keypoints2d")]
    with pytest.raises(ShapeError, match=r"above the server's max_response_bytes=536870912; ask for the outputs at "
                                         r"the model grid \(output_size='model', `--output-size model`\)"):
        wire.group_tasks(["depth"], 81, 1080, 1920, 512 << 20)


def test_model_config_parsing():
    cfg = {"config": {"name": "thfm", "parameters": {
        "window_frames": {"string_value": "9"}, "height": {"string_value": "64"}, "width": {"string_value": "64"},
        "max_frames": {"string_value": "0"}, "max_pixels": {"string_value": "1000000"},
        "max_response_bytes": {"string_value": "4096"},
    }, "output": [{"name": "depth"}, {"name": "keypoints2d"}, {"name": "joint_names"}]}}
    info = wire.parse_model_config("h:1", "thfm", cfg)
    assert (info.window_frames, info.height, info.width, info.max_frames, info.max_pixels) == (9, 64, 64, None, 1000000)
    assert info.max_response_bytes == 4096
    assert info.tasks == ("depth", "keypoints2d")
    del cfg["config"]["parameters"]["window_frames"]
    with pytest.raises(ServerError, match="window_frames"):
        wire.parse_model_config("h:1", "thfm", cfg)


def test_urls_and_error_classification():
    from tritonclient.utils import InferenceServerException

    assert normalize_url("grpc://localhost:8001") == "localhost:8001"
    assert normalize_url(" 10.0.0.1:9 ") == "10.0.0.1:9"
    for bad in ("localhost", "http://x:1", "x:99999", ""):
        with pytest.raises(ThfmError, match="HOST:PORT"):
            normalize_url(bad)
    e = classify("h:1", InferenceServerException("failed to connect to all addresses", "StatusCode.UNAVAILABLE"))
    assert e.retriable and "cannot reach Triton at h:1" in str(e)
    e = classify("h:1", InferenceServerException(
        "Failed to process the request(s) for model 'thfm_0_0', message: TaskError: unknown task 'x'",
        "StatusCode.INVALID_ARGUMENT"))
    assert not e.retriable and str(e).endswith("unknown task 'x'")
    assert classify("h:1", InferenceServerException("boom", "StatusCode.INTERNAL")).retriable
    # A full scheduler queue is a busy server, not an unreachable one; both are retried.
    e = classify("h:1", InferenceServerException("Exceeds maximum queue size", "StatusCode.UNAVAILABLE"))
    assert e.retriable and "busy" in str(e) and "cannot reach" not in str(e)
    # During a graceful shutdown (or a load) the model is known but has no ready version: retried;
    # a model the repository does not have at all is not.
    e = classify("h:1", InferenceServerException("Request for unknown model: 'thfm' has no available versions",
                                                 "StatusCode.NOT_FOUND"))
    assert e.retriable and "loading or unloading" in str(e)
    e = classify("h:1", InferenceServerException("Request for unknown model: 'thfm' is not found", "StatusCode.NOT_FOUND"))
    assert not e.retriable and "THFM model repository" in str(e)


# --- the clients over a fake transport ------------------------------------------------------------


def fake_outputs(frames: np.ndarray, tasks) -> dict[str, np.ndarray]:
    """A frame-local stand-in for the model: every output is a function of its own frame only."""
    f = frames.astype(np.float32) / 255
    out = {}
    for t in tasks:
        if t == "depth":
            out[t] = f.mean(-1) + 0.5
        elif t == "segmentation":
            out[t] = f[..., 1]
        elif t == "normals":
            n = f - 0.5 + 1e-3
            out[t] = n / np.linalg.norm(n, axis=-1, keepdims=True)
        elif t == "densepose":
            out[t] = f
        elif t == "keypoints2d":
            out[t] = np.repeat(f.mean((1, 2))[:, None, :2], len(SMPL_JOINTS), 1) * frames.shape[2]
        elif t == "keypoints3d":
            out[t] = np.repeat(f.mean((1, 2))[:, None, :], len(SMPL_JOINTS), 1) - 0.5
        else:
            raise RequestError(f"unknown task {t!r}", False, "INVALID_ARGUMENT")
    return {t: np.ascontiguousarray(a, dtype=np.float32) for t, a in out.items()}


class FakeEndpoint:
    """Stands in for transport.SyncEndpoint; decodes what it is sent, as the server would."""

    WINDOW = 9
    log: list = []
    dead: set = set()
    fail_once: set = set()

    def __init__(self, url, model="thfm"):
        self.url = normalize_url(url)
        self.limits = (0, 0)

    def ensure_limits(self, send, recv):
        self.limits = (max(self.limits[0], send), max(self.limits[1], recv))

    def _info(self):
        if self.url in self.dead:
            raise RequestError(f"cannot reach Triton at {self.url} (connection refused)", True, "UNAVAILABLE")
        return ServerInfo(self.url, "thfm", self.WINDOW, 64, 64, None, None, None)

    def _infer(self, payload):
        if self.url in self.dead:
            raise RequestError(f"cannot reach Triton at {self.url} (connection refused)", True, "UNAVAILABLE")
        if self.url in self.fail_once:
            self.fail_once.discard(self.url)
            raise RequestError(f"{self.url}: request failed: stub crashed", True, "INTERNAL")
        assert payload.nbytes <= self.limits[0]
        frames = payload.frames if payload.frames is not None else decode_video_bytes(payload.video).frames
        self.log.append((self.url, frames.shape[0], payload.video is not None))
        return fake_outputs(frames, payload.tasks), list(SMPL_JOINTS)

    def info(self, timeout_s=None):
        return self._info()

    def infer(self, payload, timeout_s=None):
        return self._infer(payload)

    def close(self):
        pass


class FakeAsyncEndpoint(FakeEndpoint):
    async def info(self, timeout_s=None):
        return self._info()

    async def infer(self, payload, timeout_s=None):
        await asyncio.sleep(0)
        return self._infer(payload)

    async def close(self):
        pass


@pytest.fixture
def fake_servers(monkeypatch):
    FakeEndpoint.log, FakeEndpoint.dead, FakeEndpoint.fail_once = [], set(), set()
    monkeypatch.setattr(client_sync, "SyncEndpoint", FakeEndpoint)
    monkeypatch.setattr(client_aio, "AsyncEndpoint", FakeAsyncEndpoint)
    return FakeEndpoint


def _predict(urls, video, tasks="all", use_async=False, **kw):
    if use_async:
        async def go():
            async with AsyncThfmClient(urls, retries=kw.pop("retries", 3)) as c:
                return await c.predict(video, tasks, **kw)
        return asyncio.run(go())
    with ThfmClient(urls, retries=kw.pop("retries", 3)) as c:
        return c.predict(video, tasks, **kw)


def _same(a, b):
    assert a.keys() == b.keys()
    for t in a:
        assert a[t].keys() == b[t].keys()
        for k in a[t]:
            assert a[t][k].dtype == b[t][k].dtype and np.array_equal(a[t][k], b[t][k]), (t, k)


@pytest.mark.parametrize("use_async", [False, True])
def test_client_stitches_a_long_clip_in_the_pipeline_layout(fake_servers, use_async):
    frames = np.random.default_rng(0).integers(0, 256, (40, 24, 20, 3), dtype=np.uint8)
    pred = _predict(["a:1"], frames, use_async=use_async)
    assert len(pred.windows) > 1 and pred.num_frames == 40
    for t, arrays in pred.results.items():
        assert set(arrays) == {OUTPUT_KEYS[t]} | ({"joint_names"} if t.startswith("keypoints") else set())
        got = arrays[OUTPUT_KEYS[t]]
        ref = fake_outputs(frames, [t])[t]
        # A frame-local model gives the same value from both windows, so the cross-fade changes nothing
        # beyond rounding.
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.allclose(got, ref, atol=1e-6)
    assert list(pred.results["keypoints2d"]["joint_names"]) == list(SMPL_JOINTS)


@pytest.mark.parametrize("use_async", [False, True])
def test_two_servers_give_the_same_bytes_as_one(fake_servers, use_async):
    frames = np.random.default_rng(1).integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    one = _predict(["a:1"], frames, use_async=use_async)
    two = _predict(["a:1", "b:2"], frames, use_async=use_async)
    _same(one.results, two.results)
    assert two.requests_per_server["a:1"] > 0 and two.requests_per_server["b:2"] > 0
    assert sum(two.requests_per_server.values()) == len(two.windows)


@pytest.mark.parametrize("use_async", [False, True])
def test_a_dead_server_is_avoided_and_its_windows_retried(fake_servers, use_async):
    frames = np.random.default_rng(2).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    ref = _predict(["a:1"], frames, use_async=use_async)
    fake_servers.fail_once.add("b:2")  # b fails its first request (a crashed stub), then works
    pred = _predict(["a:1", "b:2"], frames, use_async=use_async)
    assert pred.retries == 1
    _same(ref.results, pred.results)
    fake_servers.dead.add("b:2")  # b does not even answer the config call
    pred = _predict(["a:1", "b:2"], frames, use_async=use_async)
    assert pred.requests_per_server["b:2"] == 0
    _same(ref.results, pred.results)


@pytest.mark.parametrize("use_async", [False, True])
def test_unreachable_servers_and_unknown_tasks_are_clear_errors(fake_servers, use_async):
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    fake_servers.dead.update({"a:1", "b:2"})
    with pytest.raises(ServerError, match="cannot reach Triton at a:1"):
        _predict(["a:1", "b:2"], frames, use_async=use_async)
    fake_servers.dead.clear()
    with pytest.raises(TaskError, match="unknown task 'pose'"):
        _predict(["a:1"], frames, tasks="depth,pose", use_async=use_async)


def test_frames_and_video_payloads_give_the_same_result(fake_servers, tmp_path):
    path = tmp_path / "c.mp4"
    make_clip(path, frames=30, height=48, width=64)
    by_video = _predict(["a:1"], path, tasks="depth,keypoints2d")
    sent_video = list(fake_servers.log)
    by_frames = _predict(["a:1"], path, tasks="depth,keypoints2d", send="frames")
    _same(by_video.results, by_frames.results)
    assert all(is_video for _, _, is_video in sent_video)
    assert by_video.sent_bytes < by_frames.sent_bytes


def test_a_single_window_clip_is_sent_as_the_file_itself(fake_servers, tmp_path):
    path = tmp_path / "short.mp4"
    make_clip(path, frames=6, height=32, width=48)
    pred = _predict(["a:1"], path, tasks="depth")
    assert pred.sent_bytes < path.stat().st_size + 64
    assert pred.results["depth"]["depth"].shape == (6, 32, 48)


def test_retries_exhausted_is_one_server_error(fake_servers, monkeypatch):
    frames = np.zeros((20, 16, 16, 3), np.uint8)

    class Flaky(FakeEndpoint):
        def infer(self, payload, timeout_s=None):
            raise RequestError(f"{self.url}: request failed: out of memory", True, "INTERNAL")

    monkeypatch.setattr(client_sync, "SyncEndpoint", Flaky)
    with ThfmClient(["a:1", "b:2"], retries=2, cooldown_s=0.01) as c:
        with pytest.raises(ServerError, match=r"failed after 3 attempts .*out of memory"):
            c.predict(frames, "depth")


# --- pictures -------------------------------------------------------------------------------------


def test_pictures_for_every_task(tmp_path):
    from PIL import Image

    from thfm_serve.visualize import draw_skeleton2d, write_pictures

    frames = np.random.default_rng(0).integers(0, 256, (6, 37, 50, 3), dtype=np.uint8)
    results = {t: {OUTPUT_KEYS[t]: a} for t, a in fake_outputs(frames, list(OUTPUT_KEYS)).items()}
    for t in ("keypoints2d", "keypoints3d"):
        results[t]["joint_names"] = np.asarray(SMPL_JOINTS)
    paths = write_pictures(results, tmp_path, frames, fps=12)
    assert sorted(p.name for p in paths) == sorted(f"{t}.{e}" for t in OUTPUT_KEYS for e in ("mp4", "png"))
    for t in OUTPUT_KEYS:
        v = read_video(tmp_path / f"{t}.mp4")
        assert v.frames.shape[0] == 6
        if t != "keypoints3d":
            assert v.frames.shape[1:3] == (38, 50)  # padded to even for 4:2:0
        assert Image.open(tmp_path / f"{t}.png").size[0] > 0
    black = np.zeros((1, 40, 40, 3), np.uint8)
    kp = np.full((1, len(SMPL_JOINTS), 2), 20.0, np.float32)
    kp[0, SMPL_JOINTS.index("head")] = (20, 5)
    drawn = draw_skeleton2d(black, kp, SMPL_JOINTS)
    assert drawn[0, 12, 20].any() and not drawn[0, 35, 2].any()  # the neck->head bone, nothing far away


def test_depth_colormap_is_bright_near():
    from thfm_serve.visualize import depth_to_rgb

    depth = np.tile(np.linspace(0.1, 5, 20, dtype=np.float32), (1, 4, 1))
    rgb = depth_to_rgb(depth).astype(int).sum(-1)
    assert rgb[0, 0, 0] > rgb[0, 0, -1]


def test_demo_clip_is_repeatable(tmp_path):
    from thfm_serve.client.democlip import main
    from thfm_serve.clipgen import walking_clip

    a = walking_clip(6, 48, 64)
    assert a.shape == (6, 48, 64, 3) and np.array_equal(a, walking_clip(6, 48, 64))
    assert not np.array_equal(a[0], a[5])  # the figure moves
    assert main([str(tmp_path / "d.mp4"), "--frames", "5", "--width", "64", "--height", "48"]) == 0
    assert read_video(tmp_path / "d.mp4").frames.shape == (5, 48, 64, 3)
    assert main([str(tmp_path / "e.mp4"), "--frames", "0"]) == 2  # a clear error, not a traceback


# --- the command ----------------------------------------------------------------------------------


def _cli(args, timeout=120):
    proc = subprocess.run([sys.executable, "-m", "thfm_serve.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return proc, errors


@pytest.mark.parametrize("case,expect", [
    ("missing", "not found"),
    ("unreadable", "cannot be opened as a video"),
    ("unreachable", "cannot reach triton"),
    ("task", "unknown task"),
    ("url", "host:port"),
])
def test_predict_url_errors_are_one_line(tmp_path, case, expect):
    video = tmp_path / "clip.mp4"
    make_clip(video, frames=5, height=32, width=32)
    url, tasks = f"127.0.0.1:{free_port()}", "depth"  # nothing listens there
    if case == "missing":
        video = tmp_path / "nope.mp4"
    elif case == "unreadable":
        video = tmp_path / "noise.mp4"
        video.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "task":
        tasks = "depth,pose"
    elif case == "url":
        url = "localhost"
    proc, errors = _cli(["predict", str(video), "--url", url, "--tasks", tasks, "--out", str(tmp_path / "out")])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(errors) == 1 and expect in errors[0].lower(), proc.stderr
    assert not (tmp_path / "out").exists()


def test_in_process_predict_writes_pictures(tmp_path, tiny_checkpoint):
    from thfm_serve.cli import main

    video = tmp_path / "clip.mp4"
    make_clip(video, frames=5, height=32, width=48)
    out = tmp_path / "out"
    assert main(["predict", str(video), "--checkpoint", str(tiny_checkpoint), "--tasks", "depth,keypoints2d",
                 "--out", str(out), "--pictures"]) == 0
    assert {p.name for p in (out / "pictures").iterdir()} == {"depth.mp4", "depth.png", "keypoints2d.mp4",
                                                              "keypoints2d.png"}
