"""The client against real tritonservers serving the tiny checkpoint's exported repository.

The repository is exported once per machine into pytest's cache folder (.pytest_cache/d/...) and
reused on later runs: the exporter keys each model by the checkpoint's hash, the spec and its recipe
version, and re-exports whatever no longer matches. A fresh export takes about 100 s on 2 cores;
with it reused the file takes under a minute.
"""

from __future__ import annotations

import fcntl
import os
import signal

import numpy as np
import pytest

from thfm_serve.client import AsyncThfmClient, ThfmClient
from thfm_serve.contract.specs import tolerance_for
from thfm_serve.contract.tasks import DENSE_TASKS, OUTPUT_KEYS
from thfm_serve.server import ServerConfig, TritonServer, server_ports
from thfm_serve.video import read_video
from thfm_serve.clipgen import encoder_available, make_clip

pytestmark = pytest.mark.server

ALL = list(OUTPUT_KEYS)


@pytest.fixture(scope="module")
def tiny_repo(request, tiny_checkpoint):
    from thfm_serve.export.build import export_repository

    repo = request.config.cache.mkdir("thfm-tiny-repo") / "model_repository"
    # Two pytest sessions on one checkout must not export into the same folder at once.
    with open(repo.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        export_repository(tiny_checkpoint, repo, target="cpu", precision="fp32")
    return repo


def _server(repo, tmp_path_factory) -> TritonServer:
    cfg = ServerConfig(repo=repo, **server_ports())
    log = tmp_path_factory.mktemp("triton") / "server.log"
    return TritonServer(cfg, log_path=log).start(timeout_s=120)


@pytest.fixture(scope="module")
def two_servers(tiny_repo, tmp_path_factory):
    servers = []
    try:
        servers = [_server(tiny_repo, tmp_path_factory) for _ in range(2)]
        yield servers
    finally:
        for s in servers:
            s.stop()


def _equal(a, b):
    assert a.keys() == b.keys()
    for t in a:
        for k in a[t]:
            assert np.array_equal(a[t][k], b[t][k]), (t, k, np.abs(a[t][k] - b[t][k]).max() if k != "joint_names" else "")


@pytest.mark.timeout(600)
def test_two_servers_equal_one_and_no_frame_is_lost(two_servers, tmp_path):
    video = tmp_path / "long.mp4"
    make_clip(video, frames=31, height=40, width=56)  # tiny window 9: 4 windows with the default overlap
    urls = [s.grpc_url for s in two_servers]
    with ThfmClient(urls[:1]) as c:
        one = c.predict(video, ALL)
    with ThfmClient(urls) as c:
        two = c.predict(video, ALL)
    _equal(one.results, two.results)
    assert len(two.windows) > 1 and all(n > 0 for n in two.requests_per_server.values())
    for t, arrays in two.results.items():
        assert arrays[OUTPUT_KEYS[t]].shape[0] == 31  # no frame lost or duplicated
    # The asyncio client, with frames on the wire instead of video: the same bytes again (the window
    # encoding is lossless).
    import asyncio

    async def go():
        async with AsyncThfmClient(list(reversed(urls))) as c:
            return await c.predict(video, ALL, send="frames")

    _equal(one.results, asyncio.run(go()).results)


def _assert_npz_close(local, remote):
    """The same files, keys, shapes and dtypes; float arrays equal up to ONNX-vs-PyTorch rounding."""
    assert sorted(p.name for p in local.glob("*.npz")) == sorted(p.name for p in remote.glob("*.npz"))
    for t in ALL:
        with np.load(local / f"{t}.npz") as a, np.load(remote / f"{t}.npz") as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (t, k)
                if a[k].dtype == np.float32:
                    # Within the fp32 export tolerance, and far tighter (the seam cross-fades of both
                    # paths are the same sums of the same windows).
                    ok, max_abs, max_rel = tolerance_for("fp32", "maps" if t in DENSE_TASKS else "keypoints").check(b[k], a[k])
                    assert ok, (t, k, max_abs, max_rel)
                    assert np.allclose(a[k], b[k], atol=2e-4, rtol=1e-4), (t, k, np.abs(a[k] - b[k]).max())
                else:
                    assert list(a[k]) == list(b[k])


# 1 frame (padded to the smallest 4n+1 clip), exactly one 9-frame window, and 31 frames: four
# windows of the tiny checkpoint's 9 with the default overlap, so three cross-faded seams.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("frames", [1, 9, 31])
def test_checkpoint_and_url_give_the_same_answer_by_default(two_servers, tiny_checkpoint, tmp_path, frames):
    from thfm_serve.cli import main

    video = tmp_path / "clip.mp4"
    make_clip(video, frames=frames, height=40, width=56)
    local, remote = tmp_path / "local", tmp_path / "remote"
    args = ["predict", str(video), "--tasks", "all"]
    assert main(args + ["--checkpoint", str(tiny_checkpoint), "--out", str(local)]) == 0
    assert main(args + ["--url", two_servers[0].grpc_url, "--url", two_servers[1].grpc_url, "--out", str(remote)]) == 0
    _assert_npz_close(local, remote)
    with np.load(local / "depth.npz") as d:
        assert d["depth"].shape[0] == frames  # no frame lost or duplicated


@pytest.mark.timeout(600)
def test_overlap_zero_matches_the_in_process_pipeline(two_servers, tiny_pipeline, tmp_path):
    video = tmp_path / "clip.mp4"
    make_clip(video, frames=23, height=48, width=40)
    frames = read_video(video).frames
    ref = tiny_pipeline.run(frames, ALL, overlap=0)
    with ThfmClient([s.grpc_url for s in two_servers]) as c:
        got = c.predict(video, ALL, overlap=0).results
    for t in ALL:
        k = OUTPUT_KEYS[t]
        assert got[t][k].shape == ref[t][k].shape
        # ONNX vs PyTorch on the same frames: rounding only.
        assert np.allclose(got[t][k], ref[t][k], atol=2e-4, rtol=1e-4), (t, np.abs(got[t][k] - ref[t][k]).max())
        if t.startswith("keypoints"):
            assert list(got[t]["joint_names"]) == list(ref[t]["joint_names"])


@pytest.mark.timeout(600)
def test_output_size_model_matches_the_in_process_pipeline(two_servers, tiny_pipeline, tmp_path):
    """Dense maps at the model grid (64x64 for the tiny checkpoint), through the client and in process."""
    video = tmp_path / "clip.mp4"
    make_clip(video, frames=12, height=48, width=40)
    frames = read_video(video).frames
    tasks = ["depth", "normals", "keypoints2d"]
    ref = tiny_pipeline.run(frames, tasks, output_size="model")
    with ThfmClient([s.grpc_url for s in two_servers]) as c:
        got = c.predict(video, tasks, output_size="model").results  # the one windowing policy on both sides
    assert got["depth"]["depth"].shape == (12, 64, 64) and got["normals"]["normals"].shape == (12, 64, 64, 3)
    assert got["keypoints2d"]["keypoints"].shape == (12, 24, 2)  # in input pixels, as without the option
    for t in tasks:
        k = OUTPUT_KEYS[t]
        assert np.allclose(got[t][k], ref[t][k], atol=2e-4, rtol=1e-4), (t, np.abs(got[t][k] - ref[t][k]).max())


@pytest.mark.timeout(600)
def test_a_server_killed_mid_run(two_servers, tiny_repo, tmp_path_factory, tmp_path):
    video = tmp_path / "long.mp4"
    make_clip(video, frames=60, height=32, width=32)
    with ThfmClient([two_servers[0].grpc_url]) as c:
        ref = c.predict(video, ["depth", "keypoints2d"])

    victim = _server(tiny_repo, tmp_path_factory)
    killed = []

    def kill_after_first(done, total):
        if not killed:
            # SIGKILL the whole group: a crash, not a clean shutdown that would finish its requests.
            os.killpg(victim.pid, signal.SIGKILL)
            killed.append(done)

    try:
        with ThfmClient([two_servers[0].grpc_url, victim.grpc_url], cooldown_s=30) as c:
            pred = c.predict(video, ["depth", "keypoints2d"], progress=kill_after_first)
    finally:
        victim.stop()
    assert killed == [1]
    _equal(ref.results, pred.results)
    assert pred.retries >= 1
    assert pred.requests_per_server[two_servers[0].grpc_url] >= len(pred.windows) - 1


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["mp4", "mov", "webm", "vfr", "rotated", "long-rotated"])
def test_real_files_come_back_in_displayed_shape(two_servers, tmp_path, kind):
    frames, h, w, rotation, codec, ext, pts = 7, 48, 64, None, "libx264", "mp4", None
    if kind == "mov":
        ext = "mov"
    elif kind == "webm":
        codec, ext = "libvpx-vp9", "webm"
        if not encoder_available(codec):
            pytest.skip("no vp9 encoder in this PyAV")
    elif kind == "vfr":
        ext, pts = "mkv", [0, 40, 50, 120, 130, 200, 260]  # irregular timestamps (ms)
    elif kind == "rotated":
        rotation = 90  # a phone's portrait video: stored 64x48, displayed 48 wide and 64 high
    elif kind == "long-rotated":
        rotation, frames = -90, 20
    path = tmp_path / f"clip.{ext}"
    make_clip(path, frames=frames, height=h, width=w, codec=codec, rotation=rotation, audio=(kind == "mov"), pts=pts)
    shown = (w, h) if rotation else (h, w)
    with ThfmClient([s.grpc_url for s in two_servers]) as c:
        pred = c.predict(path, ["depth", "keypoints2d"])
    assert pred.results["depth"]["depth"].shape == (frames, *shown)
    kp = pred.results["keypoints2d"]["keypoints"]
    assert kp.shape == (frames, 24, 2)
    assert (kp[..., 0] <= shown[1]).all() and (kp[..., 1] <= shown[0]).all()


@pytest.mark.timeout(600)
def test_predict_url_command_writes_the_in_process_files(two_servers, tiny_checkpoint, tmp_path):
    from thfm_serve.cli import main

    video = tmp_path / "clip.mp4"
    make_clip(video, frames=12, height=40, width=48)
    remote, local = tmp_path / "remote", tmp_path / "local"
    args = ["predict", str(video), "--tasks", "all"]
    assert main(args + ["--checkpoint", str(tiny_checkpoint), "--out", str(local), "--overlap", "0"]) == 0
    urls = [a for s in two_servers for a in ("--url", s.grpc_url)]
    assert main(args + urls + ["--out", str(remote), "--overlap", "0", "--pictures", "--max-in-flight", "2"]) == 0
    _assert_npz_close(local, remote)
    pics = remote / "pictures"
    assert {p.name for p in pics.iterdir()} == {f"{t}.{e}" for t in ALL for e in ("mp4", "png")}
    assert read_video(pics / "depth.mp4").frames.shape[0] == 12


@pytest.mark.timeout(120, func_only=True)
def test_server_side_rejection_is_not_retried(two_servers, tmp_path):
    """A request the server refuses (here: above its per-request byte limit, checked client-side
    from the config) fails at once with the server's limit named, not after retries."""
    from thfm_serve.client.transport import RequestError
    from thfm_serve.client.wire import Payload, ServerInfo
    from thfm_serve.errors import ThfmError

    with ThfmClient([two_servers[0].grpc_url]) as c:
        info = c.info()
        assert (info.window_frames, info.height, info.width) == (9, 64, 64)
        c._info = ServerInfo(**{**info.__dict__, "max_request_bytes": 1000})
        with pytest.raises(ThfmError, match="max_request_bytes=1000"):
            c.predict(np.zeros((20, 32, 32, 3), np.uint8), ["depth"], send="frames")
        # Past the client's own check, straight to the server: its TaskError comes back as a request
        # error that is not worth retrying.
        ep = c.endpoints[two_servers[0].grpc_url]
        with pytest.raises(RequestError, match="unknown task 'pose'") as err:
            ep.infer(Payload(("depth", "pose"), frames=np.zeros((5, 32, 32, 3), np.uint8)), 60)
        assert not err.value.retriable
