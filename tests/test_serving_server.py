"""The THFM model repository behind a real tritonserver on loopback, called over gRPC.

One module-scoped server: the tiny checkpoint is exported for cpu/fp32 by the exporter (whose hook
writes the repository), the repository is rewritten with small request limits, and tritonserver
serves it. Every answer is checked against the in-process pipeline on the same frames, within the
fp32 export tolerance. A fresh export takes 50-90 s on 2 cores; tests/serverfix.py caches it in
pytest's cache folder, so later runs reuse it. The export shape (a 5-frame window at 32x32, smaller
than the tiny config's 9 at 64x64) keeps it small and checks that the served grid follows the
export shape.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from thfm_serve.contract import protocol
from thfm_serve.config import DENSE_TASKS, SPARSE_TASKS, TASKS
from thfm_serve.contract.specs import SubmodelSpec, tolerance_for
from thfm_serve.contract.tasks import OUTPUT_KEYS
from thfm_serve.repository import check_repository, write_repository
from thfm_serve.contract.specs import MAX_BATCH
from thfm_serve.serving import Limits
from thfm_serve.server import ServerConfig, TritonServer, free_ports, server_ports

pytestmark = pytest.mark.server
logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]

# Small limits so the tests can pass them.
LIMITS = Limits(max_frames=40, max_pixels=96 * 96, max_request_bytes=2 << 20)
# The export shape, which becomes the served grid (the VAE graphs take exactly WINDOW frames).
WINDOW, HEIGHT, WIDTH = 5, 32, 32


@pytest.fixture(scope="module")
def repo(request, tiny_checkpoint, tmp_path_factory) -> Path:
    from serverfix import served_repo

    # The exporter's output (cached across runs) at this module's grid, copied; then an operator
    # tightens the limits with write_repository, as the exporter's hook wrote the defaults, and turns
    # on window pipelining (a GPU repository's default), so that every multi-window request here makes
    # its BLS calls from two threads and is still checked against the pipeline.
    repo = served_repo(request.config, tmp_path_factory, tiny_checkpoint, None, WINDOW, HEIGHT, WIDTH)
    report = json.loads((repo / "export_report.json").read_text())
    specs = {n: SubmodelSpec.from_dict(d) for n, d in report["specs"].items()}
    write_repository(repo, specs, "cpu", "fp32", limits=LIMITS, window_pipeline=True)
    check_repository(repo, "cpu")
    return repo


@pytest.fixture(scope="module")
def server(repo):
    cfg = ServerConfig(repo=repo, host="127.0.0.1", **server_ports())
    srv = TritonServer(cfg)
    t0 = time.perf_counter()
    srv.start(timeout_s=180)
    logger.info("tritonserver ready in %.1f s", time.perf_counter() - t0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.grpc_url, channel_args=[("grpc.enable_http_proxy", 0)])
    yield c
    c.close()


def _inputs(frames=None, video=None, tasks=None, frames_dtype="UINT8"):
    import tritonclient.grpc as grpcclient

    out = []
    if frames is not None:
        t = grpcclient.InferInput(protocol.INPUT_FRAMES, list(frames.shape), frames_dtype)
        t.set_data_from_numpy(frames)
        out.append(t)
    if video is not None:
        t = grpcclient.InferInput(protocol.INPUT_VIDEO, [1], "BYTES")
        t.set_data_from_numpy(np.array([video], dtype=np.object_))
        out.append(t)
    if tasks is not None:
        t = grpcclient.InferInput(protocol.INPUT_TASKS, [len(tasks)], "BYTES")
        t.set_data_from_numpy(np.array([s.encode() for s in tasks], dtype=np.object_))
        out.append(t)
    return out


def _outputs(result) -> dict[str, np.ndarray]:
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def assert_matches_pipeline(outputs: dict[str, np.ndarray], reference: dict, tasks) -> None:
    """Every task's output equals the pipeline's within the fp32 export tolerance of its kind."""
    for t in tasks:
        got, ref = outputs[protocol.OUTPUT_FOR_TASK[t]], reference[t][OUTPUT_KEYS[t]]
        assert got.shape == ref.shape, t
        tol = tolerance_for("fp32", "maps" if t in DENSE_TASKS else "keypoints")
        ok, max_abs, max_rel = tol.check(got, ref)
        assert ok, f"{t}: max abs diff {max_abs:.3g} (rel {max_rel:.3g}) beyond {tol}"
    if any(t in SPARSE_TASKS for t in tasks):
        names = [n.decode() for n in outputs[protocol.OUTPUT_JOINT_NAMES]]
        assert names == list(reference[next(t for t in tasks if t in SPARSE_TASKS)]["joint_names"])


def reference(pipeline, frames: np.ndarray, tasks) -> dict:
    """The in-process pipeline on the served grid."""
    return pipeline.run(frames, list(tasks), height=HEIGHT, width=WIDTH, window=WINDOW)


def _core_counts(client) -> tuple[int, int]:
    stats = client.get_inference_statistics(protocol.CORE).model_stats[0]
    return stats.inference_count, stats.execution_count


def _frames(n: int, h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# --- the written repository, in process ---------------------------------------------------------

def test_repository_graphs_run_in_process_like_the_pipeline(repo, tiny_pipeline):
    """The entry model's logic over the repository's own onnxruntime models, without a server."""
    from thfm_serve import serving

    models = {name: serving.OnnxModel.load(repo / name, "1", name) for name in
              (protocol.VAE_ENCODER, protocol.CORE, protocol.VAE_DECODER)}
    assets = serving.load_assets(repo)
    grid = serving.Grid(WINDOW, HEIGHT, WIDTH)
    frames = _frames(4, seed=9)
    tasks = ["normals", "keypoints3d"]
    got = serving.run_entry(frames, tasks, grid, assets.config, assets.embeddings(), serving.local_call(models))
    assert_matches_pipeline(serving.entry_outputs(got), reference(tiny_pipeline, frames, tasks), tasks)


# --- health and metadata ------------------------------------------------------------------------

def test_health_ready_and_metadata(client, repo):
    assert client.is_server_live() and client.is_server_ready()
    manifest = check_repository(repo)
    for name in manifest["models"]:
        assert client.is_model_ready(name), name
    meta = client.get_model_metadata(protocol.ENTRY_MODEL, as_json=True)
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        protocol.INPUT_VIDEO: "BYTES", protocol.INPUT_FRAMES: "UINT8", protocol.INPUT_TASKS: "BYTES",
        protocol.INPUT_OUTPUT_SIZE: "BYTES"}
    assert [o["name"] for o in meta["outputs"]] == [protocol.OUTPUT_FOR_TASK[t] for t in TASKS] + [protocol.OUTPUT_JOINT_NAMES]
    config = client.get_model_config(protocol.ENTRY_MODEL, as_json=True)["config"]
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params == {protocol.PARAM_WINDOW_FRAMES: str(WINDOW), protocol.PARAM_HEIGHT: str(HEIGHT),
                      protocol.PARAM_WIDTH: str(WIDTH), protocol.PARAM_OVERLAP: "1",  # the default for 5 frames
                      protocol.PARAM_MAX_FRAMES: "40", protocol.PARAM_MAX_PIXELS: str(96 * 96),
                      protocol.PARAM_MAX_REQUEST_BYTES: str(2 << 20),
                      protocol.PARAM_MAX_RESPONSE_BYTES: str(LIMITS.max_response_bytes),
                      # On CPU the VAE takes every dense row of a window in one call (the spec's max batch).
                      protocol.PARAM_VAE_MAX_BATCH: str(MAX_BATCH), protocol.PARAM_WINDOW_PIPELINE: "1"}
    for name in (protocol.DENSE_ENSEMBLE, protocol.SPARSE_ENSEMBLE):
        assert client.get_model_metadata(name, as_json=True)["platform"] == "ensemble"


# --- the entry model ----------------------------------------------------------------------------

def test_entry_serves_every_task_in_one_request_batched_through_the_core(client, tiny_pipeline):
    frames = _frames(6)  # two windows: frames 0-4 and 1-5
    before = _core_counts(client)
    t0 = time.perf_counter()
    result = client.infer(protocol.ENTRY_MODEL, _inputs(frames=frames, tasks=list(TASKS)))
    logger.info("entry model, all six tasks, 6 frames: %.2f s", time.perf_counter() - t0)
    after = _core_counts(client)
    outputs = _outputs(result)
    assert set(outputs) == set(TASKS) | {protocol.OUTPUT_JOINT_NAMES}
    assert outputs["normals"].shape == (6, 40, 56, 3)
    assert_matches_pipeline(outputs, reference(tiny_pipeline, frames, TASKS), TASKS)
    # Per window one core execution with one row per task (Triton counts inferences per batch row).
    assert (after[0] - before[0], after[1] - before[1]) == (2 * len(TASKS), 2)


def test_entry_pads_a_clip_shorter_than_the_window(client, tiny_pipeline):
    """One frame: the VAE graphs (5 frames) run padded and are cropped back to 1 latent / 1 frame,
    which equals the pipeline's 1-frame clip (the Wan VAE is causal)."""
    frames = _frames(1, 24, 40, seed=1)
    tasks = ["depth", "densepose", "keypoints2d"]
    outputs = _outputs(client.infer(protocol.ENTRY_MODEL, _inputs(frames=frames, tasks=tasks)))
    assert outputs["depth"].shape == (1, 24, 40)
    assert_matches_pipeline(outputs, reference(tiny_pipeline, frames, tasks), tasks)


def test_entry_takes_encoded_video_over_several_windows(client, tiny_pipeline, tmp_path):
    from thfm_serve.clipgen import make_clip

    from thfm_serve.video import decode_video_bytes

    path = tmp_path / "clip.mp4"
    make_clip(path, frames=14, height=48, width=64)  # four windows: frames 0-4, 4-8, 8-12, 9-13
    data = path.read_bytes()
    tasks = ["keypoints2d", "depth"]
    before = _core_counts(client)
    outputs = _outputs(client.infer(protocol.ENTRY_MODEL, _inputs(video=data, tasks=tasks)))
    after = _core_counts(client)
    assert set(outputs) == {"keypoints2d", "depth", protocol.OUTPUT_JOINT_NAMES}
    frames = decode_video_bytes(data).frames
    assert outputs["depth"].shape == (14, 48, 64)
    assert_matches_pipeline(outputs, reference(tiny_pipeline, frames, tasks), tasks)
    assert (after[0] - before[0], after[1] - before[1]) == (4 * len(tasks), 4)  # one core run per window


def test_entry_returns_only_the_tasks_asked_for(client, tiny_pipeline):
    frames = _frames(3, 32, 32, seed=3)
    outputs = _outputs(client.infer(protocol.ENTRY_MODEL, _inputs(frames=frames, tasks=["segmentation"])))
    assert list(outputs) == ["segmentation"]
    assert_matches_pipeline(outputs, reference(tiny_pipeline, frames, ["segmentation"]), ["segmentation"])


# --- the ensembles ------------------------------------------------------------------------------

def test_dense_and_sparse_ensembles_answer_like_the_pipeline(client, tiny_pipeline):
    frames = _frames(7, seed=5)  # whole windows (0-4, 2-6): the ensembles equal the pipeline
    ref = reference(tiny_pipeline, frames, TASKS)
    t0 = time.perf_counter()
    dense = _outputs(client.infer(protocol.DENSE_ENSEMBLE, _inputs(frames=frames)))
    logger.info("dense ensemble, 7 frames: %.2f s", time.perf_counter() - t0)
    assert set(dense) == set(DENSE_TASKS)
    assert_matches_pipeline(dense, ref, DENSE_TASKS)
    sparse = _outputs(client.infer(protocol.SPARSE_ENSEMBLE, _inputs(frames=frames)))
    assert set(sparse) == set(SPARSE_TASKS) | {protocol.OUTPUT_JOINT_NAMES}
    assert_matches_pipeline(sparse, ref, SPARSE_TASKS)


def test_ensemble_takes_encoded_video(client, tiny_pipeline, tmp_path):
    from thfm_serve.clipgen import make_clip

    from thfm_serve.video import decode_video_bytes

    path = tmp_path / "clip.mp4"
    make_clip(path, frames=5, height=32, width=48)
    data = path.read_bytes()
    sparse = _outputs(client.infer(protocol.SPARSE_ENSEMBLE, _inputs(video=data)))
    assert_matches_pipeline(sparse, reference(tiny_pipeline, decode_video_bytes(data).frames, SPARSE_TASKS), SPARSE_TASKS)


# --- bad requests ---------------------------------------------------------------------------------

BAD_REQUESTS = {
    "wrong dtype": (dict(frames=_frames(3).astype(np.float32), tasks=["depth"], frames_dtype="FP32"),
                    "data-type is 'FP32', but model 'thfm' expects 'UINT8'"),
    "wrong rank": (dict(frames=_frames(3)[..., 0], tasks=["depth"]), "unexpected shape for input 'frames'"),
    "four channels": (dict(frames=np.zeros((2, 16, 16, 4), np.uint8), tasks=["depth"]),
                      "unexpected shape for input 'frames'"),
    "corrupt video": (dict(video=b"\x00\x00\x00\x18ftypmp42 definitely not a video" * 8, tasks=["depth"]),
                      "cannot be opened as a video"),
    "unknown task": (dict(frames=_frames(3), tasks=["depth", "optical_flow"]), "unknown task 'optical_flow'"),
    "no task": (dict(frames=_frames(3), tasks=[]), "no task given"),
    "too many frames": (dict(frames=np.zeros((41, 8, 8, 3), np.uint8), tasks=["depth"]),
                        "41 frames, above the limit max_frames=40"),
    "too many pixels": (dict(frames=np.zeros((1, 97, 96, 3), np.uint8), tasks=["depth"]),
                        "above the limit max_pixels=9216"),
    "too many bytes": (dict(video=b"\x00" * ((2 << 20) + 1), tasks=["depth"]),
                       "above the limit max_request_bytes=2097152"),
    "both inputs": (dict(frames=_frames(3), video=b"x", tasks=["depth"]), "exactly one of 'video'"),
    "neither input": (dict(tasks=["depth"]), "got neither"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_an_error_and_the_server_keeps_serving(client, case):
    from tritonclient.utils import InferenceServerException

    kwargs, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException) as info:
        client.infer(protocol.ENTRY_MODEL, _inputs(**kwargs))
    assert message in info.value.message(), info.value.message()
    assert client.is_server_ready() and client.is_model_ready(protocol.ENTRY_MODEL)
    good = _outputs(client.infer(protocol.ENTRY_MODEL, _inputs(frames=_frames(2, 16, 16), tasks=["keypoints3d"])))
    assert good["keypoints3d"].shape == (2, 24, 3)


def test_bad_request_to_an_ensemble_names_the_failing_step(client):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="preprocess: .*cannot be opened as a video"):
        client.infer(protocol.DENSE_ENSEMBLE, _inputs(video=b"garbage" * 20))
    with pytest.raises(InferenceServerException, match="41 frames, above the limit max_frames=40"):
        client.infer(protocol.SPARSE_ENSEMBLE, _inputs(frames=np.zeros((41, 8, 8, 3), np.uint8)))
    assert client.is_server_ready()
    assert protocol.OUTPUT_JOINT_NAMES in _outputs(client.infer(protocol.SPARSE_ENSEMBLE, _inputs(frames=_frames(2))))


# --- `thfm serve` ---------------------------------------------------------------------------------

def test_thfm_serve_runs_until_sigterm(repo, tmp_path):
    import tritonclient.grpc as grpcclient

    http_port, grpc_port, metrics_port = free_ports(3)
    argv = [sys.executable, "-m", "thfm_serve.cli", "serve", "--repo", str(repo), "--http-port", str(http_port),
            "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--log", str(tmp_path / "server.log")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "thfm serve was not ready in time"
            time.sleep(0.3)
        assert client.is_model_ready(protocol.ENTRY_MODEL)
        client.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "ready: grpc=127.0.0.1:" in text and "received SIGTERM, stopping" in text
    assert _processes_with_arg(f"--grpc-port={grpc_port}") == []  # its tritonserver is gone


def _processes_with_arg(arg: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in args:
                found.append(int(entry))
    return found
