"""A catalogue of bad inputs against a live tritonserver serving the THFM repository, and through
`thfm predict --url`.

Every case is one request. It either fails with an error that names the problem (checked by a
substring of the message and the gRPC status), or, for inputs that are legitimately fine (one
frame, odd sizes, frame counts that are not 4n+1, grayscale / 10-bit / RGBA / 16-bit video), it
succeeds with outputs at the input's frames and size. After every case the server must still be
ready and the next good request must succeed.

One server for the module (the tiny checkpoint exported at a 5-frame 32x32 grid, cached across
runs by tests/serverfix.py), with small limits so the cases can pass them. At the end of the run
the catalogue is printed as a table of case, input and outcome (tests/conftest.py's
pytest_terminal_summary), with or without `-s`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from serverfix import grpc_client, grpc_inputs, outputs, record, served_repo, start_server, tensor
from thfm_serve.contract import protocol
from thfm_serve.serving import Limits

pytestmark = pytest.mark.server
logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]

# Small limits so that cases can pass them cheaply; max_in_flight=2 so that a burst of requests
# overflows the entry model's queue.
# max_response_bytes=4 MiB: 40 frames of 96x96 as normals (4.4 MB) are over it, as depth (1.5 MB) under.
LIMITS = Limits(max_frames=40, max_pixels=96 * 96, max_request_bytes=2 << 20, max_in_flight=2,
                max_response_bytes=4 << 20)
TABLE = "catalogue of bad inputs (tests/test_bad_inputs.py)"
HEADER = ("case", "input", "outcome")


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request, tiny_checkpoint, tmp_path_factory):
    repo = served_repo(request.config, tmp_path_factory, tiny_checkpoint, LIMITS)
    srv = start_server(repo, tmp_path_factory.mktemp("bad-inputs-log"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = grpc_client(server.grpc_url, max_message=256 << 20)
    yield c
    c.close()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _frames(n: int, h: int = 32, w: int = 40, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    """Every file the cases send, written once (about 2 s): videos in odd formats, an image, audio."""
    from PIL import Image

    from thfm_serve.video import encode_video

    d = tmp_path_factory.mktemp("media")

    def video(name: str, frames: np.ndarray, **kw) -> bytes:
        encode_video(frames, d / name, **kw)
        return (d / name).read_bytes()

    m: dict[str, bytes] = {}
    m["good"] = video("good.mp4", _frames(7, 40, 56))
    m["gray"] = video("gray.mp4", _frames(5, 32, 48), pix_fmt="gray")
    m["10bit"] = video("ten_bit.mp4", _frames(5, 32, 48), pix_fmt="yuv420p10le")
    m["rgba"] = video("rgba.mov", _frames(5, 32, 48), codec="png", pix_fmt="rgba")
    m["rgb48"] = video("rgb48.mov", _frames(5, 32, 48), codec="png", pix_fmt="rgb48be")
    m["odd"] = video("odd.mp4", _frames(6, 33, 47), codec="libx264rgb", crf=0, pix_fmt="rgb24")
    m["2x2"] = video("tiny.mp4", _frames(3, 2, 2), codec="libx264rgb", crf=0, pix_fmt="rgb24")
    # 10000 frames of 16x16 (260 kB): far past max_frames; decoding must stop at the limit.
    m["10000 frames"] = video("many.mp4", np.zeros((10000, 16, 16, 3), np.uint8))
    # One black 8K frame compresses to ~8 kB but would decode to 100 MB: rejected from the header.
    m["8K"] = video("huge.mp4", np.zeros((1, 4320, 7680, 3), np.uint8))
    # 40 black frames of 96x96: a few kB that would answer 4.4 MB of normals.
    m["40x96x96"] = video("small_big_answer.mp4", np.zeros((40, 96, 96, 3), np.uint8))
    # Two MPEG-TS segments back to back: 3 frames of 16x16, then 4 of 112x112 (12544 > max_pixels).
    encode_video(_frames(3, 16, 16), d / "a.ts")
    encode_video(np.zeros((4, 112, 112, 3), np.uint8), d / "b.ts")
    m["size change"] = (d / "a.ts").read_bytes() + (d / "b.ts").read_bytes()
    Image.fromarray(_frames(1, 40, 56)[0]).save(d / "image.png")
    Image.fromarray(_frames(1, 40, 56)[0]).save(d / "image.jpg")
    m["png"], m["jpg"] = (d / "image.png").read_bytes(), (d / "image.jpg").read_bytes()
    with wave.open(str(d / "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(_rng().normal(0, 3000, 16000).astype("<i2").tobytes())
    m["wav"] = (d / "audio.wav").read_bytes()
    return m


# --- cases --------------------------------------------------------------------------------------

@dataclass
class Ctx:
    client: Any
    server: Any
    media: dict[str, bytes]


@dataclass
class Case:
    name: str
    what: str  # the input, for the table
    run: Callable[[Ctx], dict[str, np.ndarray]]  # sends the request, returns the outputs
    error: str | None = None  # substring of the error message; None: the request must succeed
    status: str = "INVALID_ARGUMENT"  # gRPC status of the error (HTTP cases: the HTTP status)
    check: Callable[[dict[str, np.ndarray]], None] | None = None  # for cases that succeed


class CaseError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


def infer(model: str = protocol.ENTRY_MODEL, outputs_: list[str] | None = None, version: str = "",
          timeout: float | None = None, **inputs) -> Callable[[Ctx], dict[str, np.ndarray]]:
    """A case body: one gRPC request to `model` with grpc_inputs(**inputs) (callables get the Ctx)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    def run(ctx: Ctx) -> dict[str, np.ndarray]:
        kw = {k: (v(ctx) if callable(v) else v) for k, v in inputs.items()}
        built = kw.pop("raw") if "raw" in kw else grpc_inputs(**kw)
        outs = [grpcclient.InferRequestedOutput(n) for n in outputs_] if outputs_ else None
        try:
            return outputs(ctx.client.infer(model, built, outputs=outs, model_version=version, client_timeout=timeout))
        except InferenceServerException as e:
            raise CaseError(str(e.status()).replace("StatusCode.", ""), e.message() or str(e)) from None

    return run


def raw(*build: Callable[[], Any]) -> Callable[[Ctx], list]:
    """Inputs given as tensors (for requests grpc_inputs cannot express)."""
    return lambda ctx: [b() for b in build]


def http(body: bytes, headers: dict[str, str] | None = None, model: str = protocol.ENTRY_MODEL):
    """A case body: one POST to the HTTP/REST endpoint."""

    def run(ctx: Ctx) -> dict[str, np.ndarray]:
        req = urllib.request.Request(f"http://{ctx.server.http_url}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in json.loads(r.read())["outputs"]}
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                text = json.loads(text).get("error", text)
            except ValueError:
                pass
            raise CaseError(f"HTTP {e.code}", text) from None

    return run


def shape(task: str, *dims: int) -> Callable[[dict[str, np.ndarray]], None]:
    def check(out: dict[str, np.ndarray]) -> None:
        assert out[task].shape == dims, (task, out[task].shape, dims)
        assert np.isfinite(out[task]).all()

    return check


def _output_size(value: bytes):
    return tensor(protocol.INPUT_OUTPUT_SIZE, np.array([value], dtype=np.object_), "BYTES")


def _core(latent: np.ndarray, text: np.ndarray) -> Callable[[Ctx], dict[str, np.ndarray]]:
    return infer(protocol.CORE, raw=raw(lambda: tensor("latent", latent, "FP32"), lambda: tensor("text", text, "FP32")))


_LAT = (1, 16, 2, 4, 4)  # a core latent of the 5-frame 32x32 grid; text is [1, 16, 32] for the tiny model
_TXT = (1, 16, 32)
_GOOD_JSON = json.dumps({"inputs": [
    {"name": "frames", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12},
    {"name": "tasks", "shape": [1], "datatype": "BYTES", "data": ["depth"]}]}).encode()
V = "video"
F = "frames"

CASES: list[Case] = [
    # -- the video input: bytes that are not a usable video
    Case("empty video", "0 bytes", infer(video=b"", tasks=["depth"]), "'video' is empty"),
    Case("random bytes", "5000 random bytes", infer(video=_rng().bytes(5000), tasks=["depth"]),
         "cannot be opened as a video"),
    Case("text file", "'hello world' x 100", infer(video=b"hello world\n" * 100, tasks=["depth"]),
         "cannot be opened as a video"),
    Case("truncated video", "first half of an mp4", infer(video=lambda c: c.media["good"][: len(c.media["good"]) // 2],
                                                          tasks=["depth"]), "cannot be opened as a video"),
    Case("truncated header", "first 40 bytes of an mp4", infer(video=lambda c: c.media["good"][:40], tasks=["depth"]),
         "cannot be opened as a video"),
    Case("PNG image", "a PNG", infer(video=lambda c: c.media["png"], tasks=["depth"]), "is an image, not a video"),
    Case("JPEG image", "a JPEG", infer(video=lambda c: c.media["jpg"], tasks=["depth"]), "is an image, not a video"),
    Case("audio file", "a WAV", infer(video=lambda c: c.media["wav"], tasks=["depth"]),
         "has no video stream (streams found: audio)"),
    Case("10000 frames", "mp4, 10000 frames 16x16 (260 kB)", infer(video=lambda c: c.media["10000 frames"], tasks=["depth"]),
         "video has 10000 frames (declared by the container), above the limit max_frames=40"),
    Case("8K frame (bomb)", "mp4, one 7680x4320 frame in 8 kB", infer(video=lambda c: c.media["8K"], tasks=["depth"]),
         "frame size 7680x4320 = 33177600 pixels is above the limit max_pixels=9216"),
    Case("frame size changes", "MPEG-TS: 3 frames 16x16, then 4 frames 112x112",
         infer(video=lambda c: c.media["size change"], tasks=["depth"]),
         "frame 3 is 112x112 = 12544 pixels (the stream changes size mid-way), above the limit max_pixels=9216"),
    Case("small video, big answer", "mp4 of 40 black 96x96 frames, normals",
         infer(video=lambda c: c.media["40x96x96"], tasks=["normals"]),
         "the response would be 4423680 bytes (4.2 MiB: 40 frames at 96x96; normals 4.2 MiB), above the limit "
         "max_response_bytes=4194304"),
    Case("big answer, frames", "frames [40,96,96,3], depth + normals + keypoints3d",
         infer(frames=np.zeros((40, 96, 96, 3), np.uint8), tasks=["depth", "normals", "keypoints3d"]),
         "the response would be 5911296 bytes (5.6 MiB: 40 frames at 96x96; depth 1.4 MiB, normals 4.2 MiB, "
         "keypoints3d 11.2 KiB), above the limit max_response_bytes=4194304 (4.0 MiB); ask for at most 28 frames "
         "per request (the client cuts clips into windows of 5), or output_size='model' (32x32: 652.8 KiB), or "
         "fewer tasks per request"),
    Case("big answer at the model grid", "the same video, output_size 'model'",
         infer(raw=lambda c: grpc_inputs(video=c.media["40x96x96"], tasks=["normals"]) + [_output_size(b"model")]),
         check=shape("normals", 40, 32, 32, 3)),
    Case("bad output_size", "output_size 'huge'",
         infer(raw=lambda c: grpc_inputs(frames=_frames(2), tasks=["depth"]) + [_output_size(b"huge")]),
         "'output_size' is 'huge'; choose 'input' or 'model'"),
    Case("ensemble: big answer", "thfm_dense, frames [40,96,96,3] (every dense task)",
         infer(protocol.DENSE_ENSEMBLE, frames=np.zeros((40, 96, 96, 3), np.uint8)),
         "preprocess: the response would be 11796480 bytes (11.2 MiB: 40 frames at 96x96; depth 1.4 MiB, normals "
         "4.2 MiB, segmentation 1.4 MiB, densepose 4.2 MiB), above the limit max_response_bytes=4194304 (4.0 MiB); ask "
         "for at most 14 frames per request, or the tasks you need from the 'thfm' model (which also takes output_size)"),
    Case("request bytes", "video of max_request_bytes + 1", infer(video=b"\0" * ((2 << 20) + 1), tasks=["depth"]),
         "2097153 bytes, above the limit max_request_bytes=2097152"),
    Case("64 MB request", "video of 64 MiB", infer(video=b"\0" * (64 << 20), tasks=["depth"]),
         "67108864 bytes, above the limit max_request_bytes=2097152"),
    # -- videos that are unusual but fine: a correct result at the input's frames and size
    Case("grayscale video", "h264 gray, 5x32x48", infer(video=lambda c: c.media["gray"], tasks=["depth"]),
         check=shape("depth", 5, 32, 48)),
    Case("10-bit video", "h264 yuv420p10le", infer(video=lambda c: c.media["10bit"], tasks=["depth"]),
         check=shape("depth", 5, 32, 48)),
    Case("RGBA video", "png-in-mov rgba", infer(video=lambda c: c.media["rgba"], tasks=["segmentation"]),
         check=shape("segmentation", 5, 32, 48)),
    Case("16-bit video", "png-in-mov rgb48", infer(video=lambda c: c.media["rgb48"], tasks=["normals"]),
         check=shape("normals", 5, 32, 48, 3)),
    Case("odd size, 6 frames", "33x47, 6 frames (not 4n+1)", infer(video=lambda c: c.media["odd"], tasks=["depth"]),
         check=shape("depth", 6, 33, 47)),
    Case("2x2 video", "3 frames of 2x2", infer(video=lambda c: c.media["2x2"], tasks=["densepose"]),
         check=shape("densepose", 3, 2, 2, 3)),
    # -- the frames input
    Case("one frame", "frames [1,32,40,3]", infer(frames=_frames(1), tasks=["depth", "keypoints2d"]),
         check=shape("depth", 1, 32, 40)),
    Case("6 frames", "frames [6,24,40,3] (not 4n+1)", infer(frames=_frames(6, 24), tasks=["keypoints3d"]),
         check=shape("keypoints3d", 6, 24, 3)),
    Case("1x1 frames", "frames [2,1,1,3]", infer(frames=_frames(2, 1, 1), tasks=["depth"]), check=shape("depth", 2, 1, 1)),
    Case("grayscale frames", "frames [2,16,16] (no channel axis)", infer(frames=_frames(2, 16, 16)[..., 0], tasks=["depth"]),
         "unexpected shape for input 'frames'"),
    Case("RGBA frames", "frames [2,16,16,4]", infer(frames=np.zeros((2, 16, 16, 4), np.uint8), tasks=["depth"]),
         "unexpected shape for input 'frames'"),
    Case("16-bit frames", "frames UINT16", infer(frames=np.zeros((2, 8, 8, 3), np.uint16), frames_dtype="UINT16",
                                                 tasks=["depth"]), "data-type is 'UINT16', but model 'thfm' expects 'UINT8'"),
    Case("NaN in FP32 frames", "frames FP32 full of NaN",
         infer(frames=np.full((2, 8, 8, 3), np.nan, np.float32), frames_dtype="FP32", tasks=["depth"]),
         "data-type is 'FP32', but model 'thfm' expects 'UINT8'"),
    Case("zero frames", "frames [0,8,8,3] (0 bytes)", infer(frames=np.zeros((0, 8, 8, 3), np.uint8), tasks=["depth"]),
         "frames: zero frames"),
    Case("zero size", "frames [2,0,0,3]", infer(frames=np.zeros((2, 0, 0, 3), np.uint8), tasks=["depth"]),
         "empty image size 0x0"),
    Case("too many frames", "frames [41,8,8,3]", infer(frames=np.zeros((41, 8, 8, 3), np.uint8), tasks=["depth"]),
         "41 frames, above the limit max_frames=40"),
    Case("huge frame", "frames [1,97,96,3]", infer(frames=np.zeros((1, 97, 96, 3), np.uint8), tasks=["depth"]),
         "above the limit max_pixels=9216"),
    Case("frames over bytes", "frames [30,160,160,3] (2.3 MB)", infer(frames=np.zeros((30, 160, 160, 3), np.uint8),
                                                                      tasks=["depth"]),
         "2304000 bytes, above the limit max_request_bytes=2097152"),
    # -- missing, duplicated, extra and mistyped inputs
    Case("video and frames", "both clip inputs", infer(frames=_frames(2), video=b"x", tasks=["depth"]),
         "exactly one of 'video'"),
    Case("no clip", "tasks only", infer(tasks=["depth"]), "got neither"),
    Case("no tasks", "frames only", infer(frames=_frames(2)), "missing input 'tasks'"),
    Case("duplicated tasks input", "'tasks' twice",
         infer(raw=lambda c: grpc_inputs(frames=_frames(2), tasks=["depth"]) + grpc_inputs(tasks=["normals"])),
         "input 'tasks' already exists in request"),
    Case("duplicated video input", "'video' twice",
         infer(raw=lambda c: grpc_inputs(video=c.media["good"], tasks=["depth"]) + grpc_inputs(video=c.media["good"])),
         "input 'video' already exists in request"),
    Case("extra input", "an input 'prompt'",
         infer(raw=lambda c: grpc_inputs(frames=_frames(2), tasks=["depth"])
               + [tensor("prompt", np.array([b"a person"], dtype=np.object_), "BYTES")]),
         "unexpected inference input 'prompt'"),
    Case("tasks as INT32", "tasks INT32 [2]",
         infer(raw=raw(lambda: tensor("frames", _frames(2), "UINT8"), lambda: tensor("tasks", np.array([1, 2], np.int32), "INT32"))),
         "inference input 'tasks' data-type is 'INT32', but model 'thfm' expects 'BYTES'"),
    Case("tasks of rank 2", "tasks BYTES [1,1]",
         infer(raw=raw(lambda: tensor("frames", _frames(2), "UINT8"),
                       lambda: tensor("tasks", np.array([[b"depth"]], dtype=np.object_), "BYTES"))),
         "unexpected shape for input 'tasks'"),
    Case("two videos in one tensor", "video BYTES [2]",
         infer(raw=lambda c: [tensor("video", np.array([c.media["good"]] * 2, dtype=np.object_), "BYTES")]
               + grpc_inputs(tasks=["depth"])), "unexpected shape for input 'video'"),
    Case("video as UINT8", "the mp4 as a UINT8 tensor",
         infer(raw=lambda c: [tensor("video", np.frombuffer(c.media["good"], np.uint8).copy(), "UINT8")]
               + grpc_inputs(tasks=["depth"])), "data-type is 'UINT8', but model 'thfm' expects 'BYTES'"),
    # -- the task list
    Case("empty task list", "tasks []", infer(frames=_frames(2), tasks=[]), "no task given"),
    Case("empty task name", "tasks ['']", infer(frames=_frames(2), tasks=[""]), "no task given"),
    Case("unknown task", "tasks ['depth', 'optical_flow']", infer(frames=_frames(2), tasks=["depth", "optical_flow"]),
         "unknown task 'optical_flow'"),
    Case("wrong case", "tasks ['DEPTH']", infer(frames=_frames(2), tasks=["DEPTH"]), "unknown task 'DEPTH'"),
    Case("duplicated task names", "tasks ['depth', 'depth']", infer(frames=_frames(2), tasks=["depth", "depth"]),
         check=shape("depth", 2, 32, 40)),
    Case("'all'", "tasks ['all']", infer(frames=_frames(2), tasks=["all"]),
         check=lambda out: [shape("normals", 2, 32, 40, 3)(out), shape("keypoints3d", 2, 24, 3)(out)]),
    Case("'all' twice", "tasks ['all', 'all']", infer(frames=_frames(2), tasks=["all", "all"]),
         check=lambda out: [shape("depth", 2, 32, 40)(out), shape("keypoints2d", 2, 24, 2)(out)]),
    Case("1 MB task name", "tasks ['x' * 1000000]", infer(frames=_frames(2), tasks=["x" * 1_000_000]),
         "task name of 1000000 bytes"),
    Case("100000 tasks", "tasks ['depth'] * 100000", infer(frames=_frames(2), tasks=["depth"] * 100_000),
         "has 100000 task names, above the limit of 64"),
    Case("non-UTF-8 task", "tasks [b'\\xff\\xfe']", infer(frames=_frames(2), tasks=[b"\xff\xfe"]), "is not UTF-8"),
    # -- outputs, models, versions, deadlines
    Case("unknown output", "outputs ['foo']", infer(frames=_frames(2), tasks=["depth"], outputs_=["foo"]),
         "unexpected inference output 'foo'"),
    Case("output of another task", "tasks ['depth'], outputs ['normals']",
         infer(frames=_frames(2), tasks=["depth"], outputs_=["normals"]),
         "outputs ['normals'] were requested but the request's tasks (depth) do not produce them"),
    Case("unknown model", "model 'nope'", infer("nope", frames=_frames(2), tasks=["depth"]), "unknown model", "NOT_FOUND"),
    Case("unknown version", "model 'thfm' version 7", infer(version="7", frames=_frames(2), tasks=["depth"]),
         "unknown model", "NOT_FOUND"),
    # A request the server accepts (within max_pixels and max_response_bytes), so it is still being
    # answered when the client gives up: a refused one can be answered inside the 1 ms.
    Case("deadline 1 ms", "client gives up after 1 ms (10 frames 96x96, all tasks)",
         infer(frames=np.zeros((10, 96, 96, 3), np.uint8), tasks=["all"], timeout=0.001), "Deadline Exceeded",
         "DEADLINE_EXCEEDED"),
    # -- internal models called directly
    Case("core: NaN latent", f"latent {list(_LAT)} all NaN", _core(np.full(_LAT, np.nan, np.float32), np.zeros(_TXT, np.float32)),
         "core: input 'latent' has 512 NaN and 0 Inf values"),
    Case("core: Inf text", f"text {list(_TXT)} all +Inf", _core(np.zeros(_LAT, np.float32), np.full(_TXT, np.inf, np.float32)),
         "core: input 'text' has 0 NaN and 512 Inf values"),
    Case("core: wrong channels", "latent [1,3,2,4,4]", _core(np.zeros((1, 3, 2, 4, 4), np.float32), np.zeros(_TXT, np.float32)),
         "unexpected shape for input 'latent' for model 'core'"),
    Case("core: odd latent size", "latent [1,16,2,3,5]", _core(np.zeros((1, 16, 2, 3, 5), np.float32), np.zeros(_TXT, np.float32)),
         "core: input 'latent' axis 2*hp cannot be 3"),
    Case("core: batch 100", "latent/text batch 100", _core(np.zeros((100, 16, 2, 4, 4), np.float32), np.zeros((100, 16, 32), np.float32)),
         "batch-size must be <= 6 for 'core'"),
    Case("core: batch mismatch", "latent batch 2, text batch 1", _core(np.zeros((2, 16, 2, 4, 4), np.float32), np.zeros(_TXT, np.float32)),
         "input 'latent' batch size does not match"),
    Case("core: beyond profile", "latent [1,16,2,400,400]", _core(np.zeros((1, 16, 2, 400, 400), np.float32), np.zeros(_TXT, np.float32)),
         "is outside the export profile"),
    Case("vae_encoder: 7 frames", "video [1,3,7,32,32] (window is 5)",
         infer(protocol.VAE_ENCODER, raw=raw(lambda: tensor("video", np.zeros((1, 3, 7, 32, 32), np.float32), "FP32"))),
         "unexpected shape for input 'video' for model 'vae_encoder'"),
    Case("vae_decoder: NaN latent", f"latent {list(_LAT)} all NaN",
         infer(protocol.VAE_DECODER, raw=raw(lambda: tensor("latent", np.full(_LAT, np.nan, np.float32), "FP32"))),
         "vae_decoder: input 'latent' has 512 NaN"),
    Case("postprocess: bad geometry", "geometry [0,-1,5]",
         infer(protocol.POSTPROCESS_DENSE, raw=raw(lambda: tensor("geometry", np.array([0, -1, 5], np.int64), "INT64"),
                                                   lambda: tensor("maps_depth", np.zeros((1, 3, 5, 32, 32), np.float32), "FP32"))),
         "'geometry' must be [frames, height, width], positive"),
    Case("ensemble: tasks input", "thfm_dense with 'tasks'", infer(protocol.DENSE_ENSEMBLE, frames=_frames(2), tasks=["depth"]),
         "unexpected inference input 'tasks' for model 'thfm_dense'"),
    Case("ensemble: garbage video", "thfm_sparse, 140 bytes of junk", infer(protocol.SPARSE_ENSEMBLE, video=b"garbage" * 20),
         "preprocess: <bytes>: cannot be opened as a video"),
    Case("ensemble: 41 frames", "thfm_dense, frames [41,8,8,3]",
         infer(protocol.DENSE_ENSEMBLE, frames=np.zeros((41, 8, 8, 3), np.uint8)), "above the limit max_frames=40"),
    # -- HTTP/REST
    Case("HTTP: malformed JSON", "POST body '{\"inputs\": ['", http(b'{"inputs": ['), "failed to parse the request JSON buffer",
         "HTTP 500"),
    Case("HTTP: binary length lies", "Inference-Header-Content-Length 99999 > body",
         http(_GOOD_JSON, {"Inference-Header-Content-Length": "99999"}), "inference header size should be in range",
         "HTTP 400"),
    Case("HTTP: tasks as numbers", "tasks BYTES data [1, 2]",
         http(json.dumps({"inputs": [{"name": "frames", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": [0] * 12},
                                     {"name": "tasks", "shape": [2], "datatype": "BYTES", "data": [1, 2]}]}).encode()),
         "Unable to parse JSON bytes array", "HTTP 500"),
    Case("HTTP: good request", "frames [1,2,2,3], depth", http(_GOOD_JSON), check=shape("depth", 1, 2, 2)),
]


def _outcome(out: dict[str, np.ndarray]) -> str:
    return "ok: " + ", ".join(f"{k} {list(np.shape(v))}" for k, v in out.items() if k != protocol.OUTPUT_JOINT_NAMES)


def _good_request(client) -> None:
    out = outputs(client.infer(protocol.ENTRY_MODEL, grpc_inputs(frames=_frames(2, 16, 16, seed=7), tasks=["keypoints3d"])))
    assert out["keypoints3d"].shape == (2, 24, 3) and np.isfinite(out["keypoints3d"]).all()


# func_only: the limit is the request's; the session's first export and server start (over two
# minutes on an AVX2-only CPU) run in the first test's setup and have limits of their own.
@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, client, server, media, request):
    ctx = Ctx(client, server, media)
    t0 = time.perf_counter()
    try:
        out = case.run(ctx)
    except CaseError as e:
        outcome = f"error {e.status}: {' '.join(e.message.split())}"
        record(request.config, TABLE, (case.name, case.what, outcome), HEADER)
        assert case.error is not None, f"{case.name}: expected a result, got {outcome}"
        assert e.status == case.status, outcome
        assert case.error in e.message, outcome
        # An error names the problem in a message a client can carry (gRPC metadata is capped at 16 KiB).
        assert len(e.message) < 4000, outcome[:300]
    else:
        record(request.config, TABLE, (case.name, case.what, _outcome(out)), HEADER)
        assert case.error is None, f"{case.name}: expected an error containing {case.error!r}, got {_outcome(out)}"
        if case.check is not None:
            case.check(out)
    logger.info("%s: %.2f s", case.name, time.perf_counter() - t0)
    # The server keeps serving: ready, every model ready, and the next good request succeeds.
    assert client.is_server_ready() and client.is_model_ready(protocol.ENTRY_MODEL)
    assert server.dead_stubs() == []
    _good_request(client)


def test_every_case_has_a_distinct_name():
    assert len({c.name for c in CASES}) == len(CASES) >= 25


# --- requests in flight -------------------------------------------------------------------------

@pytest.mark.timeout(120, func_only=True)
def test_requests_beyond_max_in_flight_are_rejected_and_the_rest_served(client, server, request):
    """A burst of 12 slow requests against max_in_flight=2: the entry model's queue holds 2 (plus the
    one running); tritonserver rejects the others at once with UNAVAILABLE, the rest succeed."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    config = client.get_model_config(protocol.ENTRY_MODEL, as_json=True)["config"]
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == LIMITS.max_in_flight
    frames = _frames(40, 96, 96, seed=3)  # 8 windows of 5 frames: long enough for the burst to pile up
    barrier = threading.Barrier(12)

    def one(i: int) -> str:
        c = grpcclient.InferenceServerClient(server.grpc_url, channel_args=[("grpc.enable_http_proxy", 0)])
        try:
            c.is_server_live()  # connect before the barrier so that all 12 arrive together
            barrier.wait()
            out = outputs(c.infer(protocol.ENTRY_MODEL, grpc_inputs(frames=frames, tasks=["depth"])))
            assert out["depth"].shape == (40, 96, 96)
            return "ok"
        except InferenceServerException as e:
            return f"{str(e.status()).replace('StatusCode.', '')}: {e.message()}"
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    ok = results.count("ok")
    rejected = [r for r in results if r != "ok"]
    record(request.config, TABLE, ("12 at once", f"12 concurrent requests, max_in_flight={LIMITS.max_in_flight}",
                                   f"{ok} ok, {len(rejected)} rejected: {rejected[0] if rejected else '-'}"), HEADER)
    assert rejected, "no request was rejected: the queue is not bounded"
    assert all(r.startswith("UNAVAILABLE") and "Exceeds maximum queue size" in r for r in rejected), rejected
    assert ok >= LIMITS.max_in_flight  # those that found room were served
    assert client.is_server_ready()
    _good_request(client)


# --- through the client: `thfm predict --url` ---------------------------------------------------

def _cli_cases(tmp: Path, media: dict[str, bytes], url: str) -> dict[str, tuple[str, list[str], str]]:
    """name -> (input, argv after `thfm predict`, substring of the one ERROR line)."""
    (tmp / "image.png").write_bytes(media["png"])
    (tmp / "audio.wav").write_bytes(media["wav"])
    (tmp / "junk.mp4").write_bytes(b"not a video at all\n" * 50)
    (tmp / "empty.mp4").write_bytes(b"")
    (tmp / "a_directory.mp4").mkdir(exist_ok=True)
    (tmp / "good.mp4").write_bytes(media["good"])
    big = tmp / "big.mp4"
    from thfm_serve.video import encode_video

    encode_video(np.zeros((3, 112, 112, 3), np.uint8), big)  # 12544 pixels > max_pixels=9216
    free = f"127.0.0.1:{_closed_port()}"
    return {
        "cli: missing file": ("no such path", [str(tmp / "missing.mp4"), "--url", url], "file not found"),
        "cli: image": ("a PNG", [str(tmp / "image.png"), "--url", url], "is an image, not a video"),
        "cli: audio": ("a WAV", [str(tmp / "audio.wav"), "--url", url], "has no video stream"),
        "cli: unreadable": ("a directory named .mp4", [str(tmp / "a_directory.mp4"), "--url", url], "is a directory"),
        "cli: junk bytes": ("text in an .mp4", [str(tmp / "junk.mp4"), "--url", url], "cannot be opened as a video"),
        "cli: empty file": ("0-byte .mp4", [str(tmp / "empty.mp4"), "--url", url], "file is empty"),
        "cli: unknown task": ("--tasks depth,flow", [str(tmp / "good.mp4"), "--url", url, "--tasks", "depth,flow"],
                              "unknown task 'flow'"),
        "cli: unreachable": ("--url of a closed port", [str(tmp / "good.mp4"), "--url", free, "--retries", "0"],
                             "cannot reach Triton"),
        "cli: bad url": ("--url nonsense", [str(tmp / "good.mp4"), "--url", "nonsense"], "is not HOST:PORT"),
        "cli: over max_pixels": ("112x112 video, server max_pixels=9216", [str(big), "--url", url, "--tasks", "depth"],
                                 "max_pixels=9216"),
    }


def _closed_port() -> int:
    from thfm_serve.server import free_port

    return free_port()  # free now, and nothing listens on it


@pytest.mark.timeout(300, func_only=True)
def test_cli_bad_inputs_exit_2_with_one_error_line(server, media, tmp_path, request):
    cases = _cli_cases(tmp_path, media, server.grpc_url)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def run(item):
        name, (what, argv, _) = item
        cmd = [sys.executable, "-m", "thfm_serve.cli", "predict", *argv, "--out", str(tmp_path / "out" / name)]
        return name, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)

    # In parallel: each run is mostly Python start-up and imports.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        done = dict(pool.map(run, cases.items()))
    failures = []
    for name, (what, argv, expect) in cases.items():
        proc = done[name]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")]
        outcome = f"exit {proc.returncode}: {errors[0] if errors else proc.stderr[-200:]}"
        record(request.config, TABLE, (name, what, outcome), HEADER)
        if proc.returncode != 2 or len(errors) != 1 or expect not in errors[0] or "Traceback" in proc.stderr:
            failures.append(f"{name}: exit {proc.returncode}\n{proc.stderr}")
    assert not failures, "\n\n".join(failures)
    assert client_ready(server)


def client_ready(server) -> bool:
    c = grpc_client(server.grpc_url)
    try:
        return c.is_server_ready()
    finally:
        c.close()
