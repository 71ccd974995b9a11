"""Runtime tests for thfm_serve.server: the real tritonserver on loopback with a tiny python model.

The model repository is written into tmp_path at test time (an add/sub model with a configurable
scale), so these tests need nothing but the venv built by scripts/setup.sh. Tests that start a
server are marked `server`; together they take about 20 s on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from thfm_serve.errors import ServerError
from thfm_serve.server import (
    ServerConfig,
    TritonServer,
    backend_directory,
    find_tritonserver,
    free_port,
    group_members,
    server_command,
    server_ports,
)

ROOT = Path(__file__).resolve().parents[1]

# --- a tiny python-backend model ------------------------------------------------------------------

CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 0
input [
  {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "INPUT1" data_type: TYPE_FP32 dims: [ -1 ] }}
]
output [
  {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "OUTPUT1" data_type: TYPE_FP32 dims: [ -1 ] }}
]
parameters {{ key: "scale" value: {{ string_value: "{scale}" }} }}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

# OUTPUT0 = scale * (INPUT0 + INPUT1), OUTPUT1 = scale * (INPUT0 - INPUT1)
MODEL_PY = """\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.scale = np.float32(config["parameters"]["scale"]["string_value"])

    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("OUTPUT0", (self.scale * (a + b)).astype(np.float32)),
                pb_utils.Tensor("OUTPUT1", (self.scale * (a - b)).astype(np.float32)),
            ]))
        return responses
"""

BROKEN_MODEL_PY = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("weights file missing: broken on purpose")

    def execute(self, requests):
        return []
"""


def write_model(repo: Path, name: str, model_py: str = MODEL_PY, scale: float = 2.0) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(name=name, scale=scale))
    (repo / name / "1" / "model.py").write_text(model_py)


def make_config(repo: Path, **kw) -> ServerConfig:
    return ServerConfig(
        repo=repo, **server_ports(), **kw
    )


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def assert_gone(pids: list[int], pgid: int) -> None:
    """No process of the group is left (zombies count as gone: they hold no resources)."""
    assert group_members(pgid) == [], [cmdline(p) for p in group_members(pgid)]
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "Z", f"pid {pid} still alive: {cmdline(pid)}"


def infer(client, model: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tritonclient.grpc as grpcclient

    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
              grpcclient.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(model, inputs)
    return result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")


# --- no server ------------------------------------------------------------------------------------


def test_find_tritonserver():
    binary = find_tritonserver()
    assert binary.name == "tritonserver" and os.access(binary, os.X_OK)


def test_backend_directory_is_idempotent(tmp_path):
    out = backend_directory(tmp_path / "backends")
    assert out == tmp_path / "backends"
    files = {p.name: p for p in (out / "python").iterdir()}
    assert set(files) == {"libtriton_python.so", "triton_python_backend_utils.py",
                          "triton_python_backend_stub"}
    assert os.access(files["triton_python_backend_stub"], os.X_OK)
    before = {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in files.items()}
    assert backend_directory(tmp_path / "backends") == out
    after = {n: (p.stat().st_ino, p.stat().st_mtime_ns) for n, p in files.items()}
    assert before == after  # nothing rewritten


def test_server_command(tmp_path):
    cfg = ServerConfig(repo=tmp_path, http_port=9000, grpc_port=9001, metrics_port=9002,
                       extra_args=("--log-info=true",))
    argv, env = server_command(cfg)
    assert argv[0] == str(find_tritonserver())
    for flag in (f"--model-repository={tmp_path.resolve()}", "--http-address=127.0.0.1",
                 "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1", "--grpc-port=9001",
                 "--http-port=9000", "--metrics-port=9002", "--model-control-mode=none",
                 "--strict-readiness=true", "--exit-on-error=true", "--disable-auto-complete-config",
                 "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                 "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"):
        assert flag in argv, flag
    assert argv[-1] == "--log-info=true"  # extra args come last so they can override
    assert not any(a.startswith("--load-model") for a in argv)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[1].endswith("nvidia_pytriton.libs")
    assert Path(env["PATH"].split(os.pathsep)[0], "python3").exists()

    argv, _ = server_command(ServerConfig(repo=tmp_path, model_control="explicit"))
    assert "--model-control-mode=explicit" in argv and "--load-model=*" in argv
    argv, _ = server_command(ServerConfig(repo=tmp_path, model_control="explicit",
                                          extra_args=("--load-model=a",)))
    assert "--load-model=*" not in argv


@pytest.mark.parametrize("kw, match", [
    ({"model_control": "poll"}, "model_control"),
    ({"grpc_max_message_mb": 64}, "no flag to cap"),
    ({"http_port": 9000, "grpc_port": 9000}, "must differ"),
    ({"extra_args": "--log-info=true"}, "not one string"),
])
def test_bad_config(tmp_path, kw, match):
    with pytest.raises(ServerError, match=match):
        server_command(ServerConfig(repo=tmp_path, **kw))


def test_missing_repository(tmp_path):
    with pytest.raises(ServerError, match="not a directory"):
        TritonServer(make_config(tmp_path / "nope")).start()


def test_free_port_can_be_bound():
    import socket

    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))  # OSError if something already holds it


def test_server_ports_are_distinct_and_bindable():
    import contextlib
    import socket

    # Three ports taken one after another can repeat (a server given the same port twice exits 2):
    # all of them must be free at once.
    for _ in range(20):
        ports = server_ports()
        assert set(ports) == {"http_port", "grpc_port", "metrics_port"} and len(set(ports.values())) == 3
        with contextlib.ExitStack() as stack:
            for port in ports.values():
                stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)).bind(("127.0.0.1", port))


# --- real server ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def add_sub_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_model(repo, "add_sub", scale=2.0)
    with TritonServer(make_config(repo), log_path=repo.parent / "server.log") as server:
        yield server


@pytest.mark.server
@pytest.mark.timeout(60)
def test_live_ready_metadata_infer(add_sub_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    assert add_sub_server.grpc_url == f"127.0.0.1:{add_sub_server.cfg.grpc_port}"
    client = grpcclient.InferenceServerClient(add_sub_server.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("add_sub")
        assert client.get_server_metadata(as_json=True)["version"] == "2.51.0"
        meta = client.get_model_metadata("add_sub", as_json=True)
        assert meta["name"] == "add_sub" and meta["platform"] == "python" and meta["versions"] == ["1"]
        assert [i["name"] for i in meta["inputs"]] == ["INPUT0", "INPUT1"]
        assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0", "OUTPUT1"]
        assert all(t["datatype"] == "FP32" and t["shape"] == ["-1"]
                   for t in meta["inputs"] + meta["outputs"])

        a = np.arange(16, dtype=np.float32)
        b = np.full(16, 0.5, dtype=np.float32)
        out0, out1 = infer(client, "add_sub", a, b)
        np.testing.assert_array_equal(out0, 2.0 * (a + b))
        np.testing.assert_array_equal(out1, 2.0 * (a - b))

        # model_control="none": the model-control API is refused.
        with pytest.raises(InferenceServerException):
            client.unload_model("add_sub")
        assert client.is_model_ready("add_sub")
    finally:
        client.close()
    # Metrics bind to the configured host too.
    import urllib.request

    with urllib.request.urlopen(f"http://{add_sub_server.metrics_url}/metrics", timeout=5) as r:
        assert b"nv_inference_request_success" in r.read()


@pytest.mark.server
@pytest.mark.timeout(60)
def test_stop_leaves_no_process(tmp_path):
    write_model(tmp_path / "repo", "add_sub")
    server = TritonServer(make_config(tmp_path / "repo"), log_path=tmp_path / "server.log")
    server.start()
    pgid = server.pid
    members = group_members(pgid)
    # The server leads its own group, and the python-backend stub is in it.
    assert os.getpgid(pgid) == pgid and pgid in members
    assert any("triton_python_backend_stub" in cmdline(p) for p in members), members
    shm = [n for n in os.listdir("/dev/shm") if any(n in cmdline(p) for p in members)]
    assert shm

    assert server.stop() == 0
    assert_gone(members, pgid)
    assert not any((Path("/dev/shm") / n).exists() for n in shm)
    assert not server.is_ready()
    server.stop()  # idempotent


@pytest.mark.server
@pytest.mark.timeout(60)
def test_stop_removes_the_region_of_a_stub_killed_with_sigkill(tmp_path):
    from thfm_serve.server import python_stub_regions

    write_model(tmp_path / "repo", "add_sub")
    server = TritonServer(make_config(tmp_path / "repo"), log_path=tmp_path / "server.log")
    server.start()
    try:
        stub = next(p for p in group_members(server.pid) if "triton_python_backend_stub" in cmdline(p))
        regions = python_stub_regions([stub])
        assert regions and all((Path("/dev/shm") / n).exists() for n in regions)
        os.kill(stub, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.dead_stubs() != ["add_sub_0_0"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.dead_stubs() == ["add_sub_0_0"]
    finally:
        # As serve_forever restarts a server whose stub died: killed at once, no graceful shutdown
        # that could clean up after the stub.
        server.stop(timeout_s=0)
    assert not [n for n in regions if (Path("/dev/shm") / n).exists()]


@pytest.mark.server
@pytest.mark.timeout(60)
def test_explicit_mode_allows_unload(tmp_path):
    import tritonclient.grpc as grpcclient

    write_model(tmp_path / "repo", "add_sub")
    with TritonServer(make_config(tmp_path / "repo", model_control="explicit")) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            assert client.is_model_ready("add_sub")  # loaded at startup (--load-model=*)
            client.unload_model("add_sub")
            deadline = time.monotonic() + 10
            while client.is_model_ready("add_sub") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not client.is_model_ready("add_sub")
        finally:
            client.close()
        log_path = server.log_path
    assert not log_path.exists()  # a temporary log is removed after a clean stop


@pytest.mark.server
@pytest.mark.timeout(60)
def test_broken_model_fails_start(tmp_path):
    repo = tmp_path / "repo"
    write_model(repo, "add_sub")
    write_model(repo, "broken", model_py=BROKEN_MODEL_PY)
    server = TritonServer(make_config(repo))
    with pytest.raises(ServerError) as info:
        server.start(timeout_s=60)
    message = str(info.value)
    assert "weights file missing: broken on purpose" in message.splitlines()[0]
    assert "failed to load 'broken'" in message
    assert server.log_path.exists()  # kept for a failed start, and named in the message
    assert str(server.log_path) in message
    assert_gone([server.pid], server.pid)
    server.log_path.unlink()


@pytest.mark.server
@pytest.mark.timeout(60)
def test_serve_forever_stops_on_sigterm(tmp_path):
    write_model(tmp_path / "repo", "add_sub")
    cfg = make_config(tmp_path / "repo")
    code = (
        "import logging, sys; from pathlib import Path\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s')\n"
        "from thfm_serve.server import ServerConfig, serve_forever\n"
        f"sys.exit(serve_forever(ServerConfig(repo=Path({str(cfg.repo)!r}), http_port={cfg.http_port}, "
        f"grpc_port={cfg.grpc_port}, metrics_port={cfg.metrics_port}), "
        f"log_path=Path({str(tmp_path / 'server.log')!r})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("ready: "):
                break
        assert lines and lines[-1].startswith("ready: "), "".join(lines)
        assert f"grpc=127.0.0.1:{cfg.grpc_port}" in lines[-1]
        pid_line = next(x for x in lines if "tritonserver ready in" in x)
        server_pid = int(pid_line.rsplit("pid ", 1)[1].rstrip(")\n"))
        members = group_members(server_pid)
        assert len(members) >= 2  # server and stub

        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "received SIGTERM" in rest
    assert_gone(members, server_pid)


@pytest.mark.server
@pytest.mark.timeout(60)
def test_stop_kills_group_after_timeout(tmp_path):
    """A server that does not finish shutting down in time is killed with its stubs, and the
    shared-memory regions a clean shutdown would have removed are removed too."""
    write_model(tmp_path / "repo", "add_sub")
    server = TritonServer(make_config(tmp_path / "repo")).start()
    pgid = server.pid
    members = group_members(pgid)
    shm = [n for n in os.listdir("/dev/shm") if any(n in cmdline(p) for p in members)]
    assert shm
    assert server.stop(timeout_s=0) == -signal.SIGKILL
    assert_gone(members, pgid)
    assert not any((Path("/dev/shm") / n).exists() for n in shm)


# --- restricted APIs and the stub watchdog ---------------------------------------------------------


def test_restricted_apis(tmp_path):
    from thfm_serve.server import DEFAULT_RESTRICTED_APIS, RESTRICTED_HEADER

    from thfm_serve import argv_secret

    argv, env = server_command(ServerConfig(repo=tmp_path))
    grpc = [a for a in argv if a.startswith("--grpc-restricted-protocol=")]
    http = [a for a in argv if a.startswith("--http-restricted-api=")]
    assert len(grpc) == len(http) == 1
    apis, key = grpc[0].split("=", 1)[1].split(":", 1)
    # With model control "none" the repository API is restricted too (it could only refuse, misworded).
    assert apis.split(",") == [*DEFAULT_RESTRICTED_APIS, "model-repository"] and key.startswith(RESTRICTED_HEADER + "=")
    argv_explicit, _ = server_command(ServerConfig(repo=tmp_path, model_control="explicit"))
    explicit = [a for a in argv_explicit if a.startswith("--grpc-restricted-protocol=")][0]
    assert "model-repository" not in explicit
    # The key is not on the command line: a placeholder is, and the key travels in the environment.
    assert key.split("=", 1)[1] == argv_secret.PLACEHOLDER
    assert len(env[argv_secret.ENV_NAME]) >= 24  # random per start
    assert env[argv_secret.ENV_NAME] not in " ".join(argv)
    argv, env = server_command(ServerConfig(repo=tmp_path, restricted_key="s3cret-key"))
    assert any(a.endswith(f":{RESTRICTED_HEADER}={argv_secret.PLACEHOLDER}") for a in argv)
    assert env[argv_secret.ENV_NAME] == "s3cret-key" and "s3cret-key" not in " ".join(argv)
    argv, _ = server_command(ServerConfig(repo=tmp_path, restricted_apis=()))
    assert not any(a.startswith(("--grpc-restricted", "--http-restricted")) for a in argv)
    for kw in ({"restricted_apis": ("bogus",)}, {"restricted_apis": "trace"}, {"restricted_key": "a b"}):
        with pytest.raises(ServerError):
            server_command(ServerConfig(repo=tmp_path, **kw))


def test_is_ready_settles_over_a_reconnect_backoff(tmp_path, monkeypatch):
    # A channel that saw the port closed fails calls until its backoff ends, while a fresh client
    # already sees the server ready; serve_forever asks with settle_s before saying whether it was.
    server = TritonServer(make_config(tmp_path))
    server._proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        answers = iter([False, False, False, True])
        monkeypatch.setattr(server, "_probe_ready", lambda: next(answers))
        assert not server.is_ready()
        assert server.is_ready(settle_s=2.0)
        monkeypatch.setattr(server, "_probe_ready", lambda: False)
        t0 = time.monotonic()
        assert not server.is_ready(settle_s=0.3)
        assert time.monotonic() - t0 >= 0.3
    finally:
        server._proc.kill()
        server._proc.wait()
    assert not server.is_ready(settle_s=5.0)  # no process: no waiting either


def test_serve_forever_rejects_an_unknown_stub_policy(tmp_path):
    from thfm_serve.server import serve_forever

    with pytest.raises(ServerError, match="on_stub_death"):
        serve_forever(ServerConfig(repo=tmp_path), on_stub_death="ignore")


@pytest.mark.server
@pytest.mark.timeout(60)
def test_dead_stubs_are_noticed(tmp_path):
    from thfm_serve.server import python_stubs

    write_model(tmp_path / "repo", "add_sub")
    write_model(tmp_path / "repo", "add_sub_2")
    with TritonServer(make_config(tmp_path / "repo")) as server:
        assert sorted(server.stubs.values()) == ["add_sub_0_0", "add_sub_2_0_0"]
        assert python_stubs(server.pid) == server.stubs and server.dead_stubs() == []
        victim = next(pid for pid, name in server.stubs.items() if name == "add_sub_0_0")
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.dead_stubs() != ["add_sub_0_0"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.stop(timeout_s=0)
    assert server.dead_stubs() == []  # nothing to report for a stopped server


@pytest.mark.server
@pytest.mark.timeout(120)
def test_serve_forever_exits_70_when_told_and_stubs_die(tmp_path):
    """--on-stub-death exit: the server is stopped and the exit status tells a supervisor why."""
    from thfm_serve.server import EXIT_STUB_DIED

    write_model(tmp_path / "repo", "add_sub")
    cfg = make_config(tmp_path / "repo")
    code = (
        "import logging, sys; from pathlib import Path\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s')\n"
        "from thfm_serve.server import ServerConfig, serve_forever\n"
        f"sys.exit(serve_forever(ServerConfig(repo=Path({str(cfg.repo)!r}), http_port={cfg.http_port}, "
        f"grpc_port={cfg.grpc_port}, metrics_port={cfg.metrics_port}), on_stub_death='exit', poll_s=0.1))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("ready: "):
                break
        pid_line = next(x for x in lines if "tritonserver ready in" in x)
        server_pid = int(pid_line.rsplit("pid ", 1)[1].rstrip(")\n"))
        stub = next(p for p in group_members(server_pid) if "triton_python_backend_stub" in cmdline(p))
        os.kill(stub, signal.SIGKILL)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == EXIT_STUB_DIED, "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "python-backend stub of add_sub_0_0 died" in rest
    assert_gone([server_pid], server_pid)
