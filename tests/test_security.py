"""Security defaults: loopback binding, safetensors only, no model-control API unless asked for,
request size caps, pinned dependencies, and the deployment notes (docs/security.md)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serverfix import grpc_client, served_repo, start_server
from thfm_serve.contract import protocol
from thfm_serve.server import ServerConfig, server_command

ROOT = Path(__file__).resolve().parents[1]


# --- loopback by default ------------------------------------------------------------------------

def test_thfm_serve_binds_loopback_unless_told(tmp_path):
    from thfm_serve.cli import build_parser

    args = build_parser().parse_args(["serve", "--repo", str(tmp_path)])
    assert args.host == "127.0.0.1" and args.model_control == "none"
    assert ServerConfig(repo=tmp_path).host == "127.0.0.1"
    argv, _ = server_command(ServerConfig(repo=tmp_path))
    for endpoint in ("http", "grpc", "metrics"):
        assert f"--{endpoint}-address=127.0.0.1" in argv
    # tritonserver's own default is 0.0.0.0: every address is always passed explicitly.
    argv, _ = server_command(ServerConfig(repo=tmp_path, host="0.0.0.0"))
    assert {a for a in argv if a.endswith("-address=0.0.0.0")} == {
        "--http-address=0.0.0.0", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"}
    args = build_parser().parse_args(["serve", "--repo", str(tmp_path), "--host", "0.0.0.0"])
    assert args.host == "0.0.0.0"


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on a TCP port."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                out.add(addr)
    return out


@pytest.fixture(scope="module")
def server(request, tiny_checkpoint, tmp_path_factory):
    repo = served_repo(request.config, tmp_path_factory, tiny_checkpoint)
    srv = start_server(repo, tmp_path_factory.mktemp("security-log"))
    yield srv
    srv.stop()


@pytest.mark.server
def test_a_served_repository_listens_on_loopback_only(server):
    # 127.0.0.1 in /proc/net/tcp's byte order, and as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)
    # in /proc/net/tcp6, which is how the HTTP endpoint's socket shows it.
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}
    for port in (server.cfg.http_port, server.cfg.grpc_port, server.cfg.metrics_port):
        found = _listening(port)
        assert found and found <= loopback, (port, found)


# --- no model-control API unless asked for --------------------------------------------------------

@pytest.mark.server
def test_load_and_unload_are_refused_by_default(server):
    from tritonclient.utils import InferenceServerException

    client = grpc_client(server.grpc_url)
    try:
        for call in (lambda: client.unload_model(protocol.ENTRY_MODEL), lambda: client.load_model(protocol.CORE)):
            with pytest.raises(InferenceServerException, match="This protocol is restricted") as err:
                call()
            # Not tritonserver's own wording, which blames polling (model control is "none").
            assert "polling" not in str(err.value)
        # HTTP too: the repository API refuses and changes nothing.
        for action in ("unload", "load"):
            req = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/{protocol.ENTRY_MODEL}/{action}",
                                         data=b"{}", method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(req, timeout=10)
            assert err.value.code == 403
            body = err.value.read().decode()
            assert "This API is restricted" in body and "polling" not in body
        assert client.is_model_ready(protocol.ENTRY_MODEL) and client.is_model_ready(protocol.CORE)
    finally:
        client.close()


@pytest.mark.server
def test_shared_memory_trace_and_logging_apis_are_refused(server):
    """Not needed by THFM clients and risky on a network (see thfm_serve.server.RESTRICTABLE_APIS)."""
    from tritonclient.utils import InferenceServerException

    client = grpc_client(server.grpc_url)
    try:
        for call in (lambda: client.register_system_shared_memory("r", "/triton_python_backend_shm_region_x", 64),
                     client.get_system_shared_memory_status, client.get_trace_settings,
                     lambda: client.update_log_settings({"log_verbose_level": 3})):
            with pytest.raises(InferenceServerException, match="This protocol is restricted"):
                call()
        for path in ("/v2/systemsharedmemory/status", "/v2/trace/setting", "/v2/logging"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10)
            assert err.value.code == 403 and "This API is restricted" in err.value.read().decode()
        # What clients use stays open.
        assert client.is_server_ready() and client.get_model_config(protocol.ENTRY_MODEL)
        assert client.get_inference_statistics(protocol.ENTRY_MODEL)
    finally:
        client.close()


@pytest.mark.server
@pytest.mark.timeout(60, func_only=True)
@pytest.mark.parametrize("key", ["s3cret-admin-key-0123", None], ids=["operator-key", "random-key"])
def test_the_restricted_api_key_is_on_no_command_line(tmp_path, key):
    """Every local user can read /proc/<pid>/cmdline; the key must not be there, yet tritonserver must
    have it: the restricted APIs answer a request carrying it and refuse one without."""
    from tritonclient.utils import InferenceServerException

    from test_server_runtime import make_config, write_model
    from thfm_serve import argv_secret
    from thfm_serve.server import RESTRICTED_HEADER, TritonServer, group_members

    write_model(tmp_path / "repo", "add_sub")
    cfg = make_config(tmp_path / "repo", restricted_key=key)
    _, env = server_command(cfg)
    secret = env[argv_secret.ENV_NAME]
    with TritonServer(cfg, log_path=tmp_path / "server.log") as server:
        pids = group_members(server.pid)
        assert server.pid in pids and len(pids) >= 2  # tritonserver and its stub
        for pid in pids:
            assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), pid
            # Nor left in the environment, for the server's own user (or the stubs) to find.
            assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), pid
        assert argv_secret.helper_loaded(server.pid)
        server_cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert f"{RESTRICTED_HEADER}={argv_secret.PLACEHOLDER}".encode() in server_cmdline
        if key is None:
            return  # the random key exists nowhere else; its use is shown with the operator's key
        client = grpc_client(server.grpc_url)
        grpc_header = "triton-grpc-protocol-" + RESTRICTED_HEADER  # how tritonserver's gRPC side names it
        try:
            with pytest.raises(InferenceServerException, match="This protocol is restricted"):
                client.get_trace_settings()
            with pytest.raises(InferenceServerException, match="This protocol is restricted"):
                client.get_trace_settings(headers={grpc_header: argv_secret.PLACEHOLDER})
            assert client.get_trace_settings(headers={grpc_header: key}) is not None
        finally:
            client.close()
        req = urllib.request.Request(f"http://{server.http_url}/v2/trace/setting", headers={RESTRICTED_HEADER: key})
        for attempt in range(50):  # readiness is polled over gRPC; the HTTP port may open a moment later
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert r.status == 200
                break
            except urllib.error.URLError as e:
                if isinstance(e, urllib.error.HTTPError) or attempt == 49:
                    raise
                time.sleep(0.1)


def test_the_preloaded_helper_fills_the_argument_and_keeps_it_out_of_cmdline(tmp_path):
    """The mechanism on its own, with python3 as the program: main() sees the secret, /proc does not."""
    import subprocess
    import sys

    from thfm_serve import argv_secret

    code = ("import sys, os; c = open('/proc/self/cmdline', 'rb').read(); e = open('/proc/self/environ', 'rb').read(); "
            "print(sys.argv[1]); print(b'k3y-value-42' in c, b'k3y-value-42' in e, os.environ.get('THFM_TRITON_SECRET'))")
    argv, env = argv_secret.hide([sys.executable, "-c", code, "--flag=k3y-value-42"], dict(os.environ), "k3y-value-42",
                                 tmp_path)
    assert argv[-1] == f"--flag={argv_secret.PLACEHOLDER}"
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["--flag=k3y-value-42", "False", "False", "None"], out.stderr
    # Without the variable the helper refuses to run the program rather than let it see the placeholder.
    env.pop(argv_secret.ENV_NAME)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78 and "no THFM_TRITON_SECRET" in out.stderr


# --- request size caps ----------------------------------------------------------------------------

def test_request_caps_are_in_every_front_model(tmp_path):
    """max_request_bytes/max_frames/max_pixels are parameters of the entry model and of preprocess,
    and max_in_flight their queue bound; tritonserver 2.51 has no flag to cap a request's size."""
    from thfm_serve.errors import ServerError
    from thfm_serve.serving import DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_REQUEST_BYTES, Limits

    assert Limits().max_request_bytes == DEFAULT_MAX_REQUEST_BYTES <= 1 << 30
    assert 1 <= Limits().max_in_flight == DEFAULT_MAX_IN_FLIGHT <= 64
    with pytest.raises(ServerError, match="no flag to cap"):
        server_command(ServerConfig(repo=tmp_path, grpc_max_message_mb=64))


@pytest.mark.server
def test_served_front_models_carry_the_caps(server):
    client = grpc_client(server.grpc_url)
    try:
        for model in (protocol.ENTRY_MODEL, protocol.PREPROCESS):
            config = client.get_model_config(model, as_json=True)["config"]
            params = {k: v["string_value"] for k, v in config["parameters"].items()}
            assert int(params[protocol.PARAM_MAX_REQUEST_BYTES]) > 0, model
            assert int(config["dynamic_batching"]["default_queue_policy"]["max_queue_size"]) > 0, model
    finally:
        client.close()


# --- safetensors only -------------------------------------------------------------------------------

class _Unpickled(AssertionError):
    pass


@pytest.fixture
def no_pickle(monkeypatch):
    """Make unpickling raise: pickle.load(s) (numpy's allow_pickle path goes through them) and
    torch.load. pickle.Unpickler itself stays: libraries subclass it at import time."""
    import torch

    def refuse(*args, **kwargs):
        raise _Unpickled(f"unpickling attempted: {args[:1]!r}")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    yield


def _poison(directory: Path, marker: Path) -> None:
    """A pickle next to the safetensors weights that would create `marker` if it were ever loaded."""

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin", "model.pt"):
        (directory / name).write_bytes(pickle.dumps(Boom()))


def test_checkpoint_loading_never_unpickles(tiny_checkpoint, tmp_path, no_pickle):
    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.pipeline import ThfmPipeline

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    marker = tmp_path / "pwned"
    for part in ("transformer", "vae", "text_encoder"):
        _poison(ck / part, marker)
    loaded = load_checkpoint(ck)
    assert loaded.text_encoder is not None
    ThfmPipeline.from_checkpoint(ck)
    assert not marker.exists()


def test_a_pickle_only_checkpoint_is_refused(tiny_checkpoint, tmp_path, no_pickle):
    """diffusers falls back to torch.load when a part has only a .bin; load_checkpoint must refuse."""
    import torch
    from safetensors.torch import load_file

    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.errors import CheckpointError

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    weights = ck / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    torch.save(state, ck / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(ck)


def test_served_assets_never_unpickle(tmp_path, no_pickle):
    """The task embeddings the python models read are .npz with allow_pickle=False: an object array
    in them is an error, not code."""
    from thfm_serve.config import TASKS
    from thfm_serve.errors import CheckpointError
    from thfm_serve.serving import load_task_embeddings

    class Cfg:
        tasks, text_len, text_dim = list(TASKS), 4, 8

    path = tmp_path / "task_embeddings.npz"
    np.savez(path, **{t: np.zeros((4, 8), np.float32) for t in TASKS[1:]}, depth=np.array([object()], dtype=object))
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_task_embeddings(path, Cfg)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_export_never_unpickles(tiny_checkpoint, tmp_path, no_pickle):
    """The whole export (load, ONNX export, validation, configs) under the no-pickle guard."""
    from thfm_serve.export import export_repository

    ck = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, ck)
    marker = tmp_path / "pwned"
    _poison(ck / "transformer", marker)
    export_repository(ck, tmp_path / "repo", "cpu", "fp32", frames=5, height=32, width=32)
    assert not marker.exists()


# --- pinned dependencies ------------------------------------------------------------------------------

def test_every_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps.extend(extra)
    assert deps
    pinned = re.compile(r"^[A-Za-z0-9_.\-]+(\[[A-Za-z0-9_,\-]+\])?==[0-9][A-Za-z0-9.+!\-]*$")
    # An extra that names another of this project's extras ("thfm-serve[modelopt]") adds no package of its
    # own: the packages it stands for are checked where that extra lists them.
    own = re.compile(r"^" + re.escape(project["name"]) + r"\[[A-Za-z0-9_,\-]+\]$")
    loose = [d for d in deps if not pinned.match(d.replace(" ", "")) and not own.match(d.replace(" ", ""))]
    assert not loose, f"dependencies not pinned with ==: {loose}"
