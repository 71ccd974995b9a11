"""Faults while the client is mid-run: the server killed and restarted, a python-backend stub killed.

What tritonserver 2.51 does when a python-backend stub dies (kill -9): the request in flight fails
with INTERNAL "Stub process '<model>_0_0' is not healthy", and so does every later request that
reaches that model; the server and the model still report ready, and requests that never touch the
model keep working. It never restarts the stub. `thfm serve` therefore watches the stubs and
restarts the server in place when one dies (thfm_serve.server.serve_forever), and the client retries
failed windows (on another server when it has one). In every case the client must finish with every
frame once: results equal to a clean run, frame for frame.

Each test uses the tiny checkpoint exported at a 5-frame 32x32 grid (cached by tests/serverfix.py)
and a 60-frame clip (16 windows), killing something after the second window is answered.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serverfix import grpc_client, grpc_inputs, outputs, served_repo, start_server
from thfm_serve.contract import protocol
from thfm_serve.client import ThfmClient
from thfm_serve.server import free_ports, python_stubs

pytestmark = pytest.mark.server
logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
TASKS = ["depth", "normals", "keypoints2d"]
FRAMES = 60


@pytest.fixture(scope="module")
def repo(request, tiny_checkpoint, tmp_path_factory) -> Path:
    return served_repo(request.config, tmp_path_factory, tiny_checkpoint)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (FRAMES, 40, 48, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = start_server(repo, tmp_path_factory.mktemp("faults-log"))
    yield srv
    srv.stop(timeout_s=5)


@pytest.fixture(scope="module")
def reference(server, clip):
    """A clean run: what every faulty run must reproduce exactly."""
    with ThfmClient([server.grpc_url]) as c:
        return c.predict(clip, TASKS, send="frames")


def assert_same_run(pred, ref) -> None:
    """Every frame once (the client's stitcher refuses a window twice) and the same bytes."""
    assert pred.num_frames == FRAMES
    assert sum(pred.requests_per_server.values()) == len(pred.windows) == len(ref.windows)
    assert pred.results.keys() == ref.results.keys()
    for task, arrays in ref.results.items():
        for key, want in arrays.items():
            got = pred.results[task][key]
            if key != "joint_names":
                assert got.shape[0] == FRAMES, (task, got.shape)
            assert got.shape == want.shape and np.array_equal(got, want), (task, key)


def kill_after(n: int, action) -> tuple[list[int], object]:
    """A progress callback that runs `action` once, after n windows are answered."""
    fired: list[int] = []

    def progress(done: int, total: int) -> None:
        if done >= n and not fired:
            fired.append(done)
            action()

    return fired, progress


# --- the server killed mid-request and restarted ------------------------------------------------

@pytest.mark.timeout(300, func_only=True)
def test_server_killed_mid_run_and_restarted_at_the_same_address(server, clip, reference):
    restarted = threading.Event()

    def crash_and_restart() -> None:
        os.killpg(server.pid, signal.SIGKILL)  # a crash: no graceful finish of the requests in flight

        def supervisor() -> None:  # what systemd / a container runtime does
            server.stop(timeout_s=0)  # reap it and remove its shared-memory regions
            time.sleep(0.5)
            server.start(timeout_s=120)
            restarted.set()

        threading.Thread(target=supervisor, daemon=True).start()

    fired, progress = kill_after(2, crash_and_restart)
    with ThfmClient([server.grpc_url], retries=6, cooldown_s=1.0) as c:
        pred = c.predict(clip, TASKS, send="frames", progress=progress)
    assert fired == [2] and restarted.is_set()
    assert pred.retries >= 1
    assert_same_run(pred, reference)


# --- a python-backend stub killed -----------------------------------------------------------------

@pytest.mark.timeout(120, func_only=True)
def test_tritonserver_does_not_restart_a_dead_stub(repo, tmp_path_factory):
    """Documents tritonserver 2.51: the model stays 'ready' and fails every request, forever."""
    from tritonclient.utils import InferenceServerException

    srv = start_server(repo, tmp_path_factory.mktemp("dead-stub-log"))
    client = grpc_client(srv.grpc_url)
    try:
        frames = np.zeros((3, 16, 16, 3), np.uint8)
        stubs = {name: pid for pid, name in srv.stubs.items()}
        assert set(stubs) == {f"{m}_0_0" for m in (protocol.ENTRY_MODEL, protocol.PREPROCESS, protocol.VAE_ENCODER,
                                                   protocol.CORE, protocol.VAE_DECODER, protocol.POSTPROCESS_DENSE,
                                                   protocol.POSTPROCESS_SPARSE)}
        os.kill(stubs["vae_decoder_0_0"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while srv.dead_stubs() != ["vae_decoder_0_0"]:
            assert time.monotonic() < deadline, srv.dead_stubs()
            time.sleep(0.1)
        for _ in range(3):
            with pytest.raises(InferenceServerException, match="Stub process 'vae_decoder_0_0' is not healthy"):
                client.infer(protocol.ENTRY_MODEL, grpc_inputs(frames=frames, tasks=["depth"]))
            time.sleep(0.3)
        # Still "ready" by every health API, which is why thfm serve checks the stubs itself.
        assert client.is_server_ready() and client.is_model_ready(protocol.VAE_DECODER)
        # Requests that never reach the dead model still work.
        out = outputs(client.infer(protocol.ENTRY_MODEL, grpc_inputs(frames=frames, tasks=["keypoints3d"])))
        assert out["keypoints3d"].shape == (3, 24, 3)
    finally:
        client.close()
        srv.stop(timeout_s=5)


@pytest.mark.timeout(300, func_only=True)
@pytest.mark.parametrize("victim", ["core_0_0", "thfm_0_0"])
def test_thfm_serve_restarts_after_a_stub_dies_and_the_client_finishes(repo, clip, reference, tmp_path, victim):
    """kill -9 the stub of the core (called through BLS) or of the entry model itself, mid-run."""
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "thfm_serve.cli", "serve", "--repo", str(repo), "--grpc-port", str(grpc_port),
            "--http-port", str(http_port), "--metrics-port", str(metrics_port), "--log", str(tmp_path / "triton.log")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"127.0.0.1:{grpc_port}"
        _wait_ready(url, proc, log)
        triton_pid = _process_with_arg(f"--grpc-port={grpc_port}")
        pids = {name: pid for pid, name in python_stubs(triton_pid).items()}

        fired, progress = kill_after(2, lambda: os.kill(pids[victim], signal.SIGKILL))
        with ThfmClient([url], retries=6, cooldown_s=1.0) as c:
            pred = c.predict(clip, TASKS, send="frames", progress=progress)
        assert fired == [2] and pred.retries >= 1
        assert_same_run(pred, reference)
        text = log.read_text()
        assert f"python-backend stub of {victim} died" in text and "restarting tritonserver (restart 1)" in text, text
        assert "ready again after restart 1" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.timeout(300, func_only=True)
def test_a_dead_stub_on_one_of_two_servers_fails_over(repo, server, clip, reference, tmp_path_factory):
    """Without the watchdog (a plain tritonserver) the broken server answers every window with an
    error; the client retries those windows on the healthy server and finishes."""
    broken = start_server(repo, tmp_path_factory.mktemp("broken-log"))
    try:
        core = next(pid for pid, name in broken.stubs.items() if name == "core_0_0")
        fired, progress = kill_after(2, lambda: os.kill(core, signal.SIGKILL))
        with ThfmClient([broken.grpc_url, server.grpc_url], retries=3, cooldown_s=1.0) as c:
            pred = c.predict(clip, TASKS, send="frames", progress=progress)
        assert fired == [2] and pred.retries >= 1
        assert broken.dead_stubs() == ["core_0_0"]
        assert_same_run(pred, reference)
    finally:
        broken.stop(timeout_s=5)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    client = grpc_client(url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            assert time.monotonic() < deadline, "thfm serve was not ready in time\n" + log.read_text()
            time.sleep(0.3)
    finally:
        client.close()


def _process_with_arg(arg: str) -> int:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in args:
                return int(entry)
    raise AssertionError(f"no process with {arg}")
