"""Find, configure and run the real tritonserver bundled in the nvidia-pytriton wheel.

The wheel (nvidia-pytriton==0.7.0, installed with --no-deps by scripts/setup.sh) ships a tritonserver
2.51.0 binary, the python backend and one python-backend stub per Python version. This module never
imports `pytriton` itself (its package pulls dependencies we did not install); it only locates the
files. How to run that binary on CPU is written up in shared/docs/runtime-notes.md, "Triton Inference
Server on CPU"; the comments below say where each choice comes from.

Stages: model repository -> server (this module) -> client. `thfm serve` calls `serve_forever`; tests
and tools use the `TritonServer` context manager.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from thfm_serve import argv_secret
from thfm_serve.errors import ServerError

log = logging.getLogger(__name__)

# The python backend names its shared-memory regions with this prefix and passes the name to each
# stub on its command line; a server killed with SIGKILL leaves them in /dev/shm.
_SHM_PREFIX = "triton_python_backend_shm_region"
# Lines of the server log shown when a start fails.
_TAIL_LINES = 25

MODEL_CONTROL_MODES = ("none", "explicit")
# tritonserver APIs that clients of THFM never need and that are risky on a network: shared memory
# (a client registers a /dev/shm region of the server's host by name and reads or writes it as a
# tensor), trace and logging (change what the server records; verbose logging of every request can
# fill a disk). Restricted by default to a header whose value is random per start, i.e. refused.
RESTRICTABLE_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                     "statistics", "trace", "logging")
DEFAULT_RESTRICTED_APIS = ("shared-memory", "trace", "logging")
# glibc malloc settings for tritonserver and its stubs (see server_command).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "32768", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}
RESTRICTED_HEADER = "thfm-admin-key"  # gRPC clients send it as "triton-grpc-protocol-thfm-admin-key"


@dataclass
class ServerConfig:
    """How to run tritonserver. Defaults bind to loopback only: the server has no authentication."""

    repo: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # "none": load the whole repository at startup, no load/unload API.
    # "explicit": also load the whole repository at startup (see server_command), and allow the
    # model-control API. "poll" is not offered: it reloads models from disk while serving.
    model_control: str = "none"
    log_verbose: int = 0
    # APIs answered only to requests carrying RESTRICTED_HEADER=restricted_key (tritonserver's
    # --grpc-restricted-protocol / --http-restricted-api). With no key given, one is made up per
    # start and never shown, so these APIs are simply refused (gRPC UNAVAILABLE, HTTP 403).
    restricted_apis: tuple[str, ...] = DEFAULT_RESTRICTED_APIS
    restricted_key: str | None = None
    # tritonserver 2.51 has no flag to cap request size (checked with `tritonserver --help` and by
    # trying --grpc-max-message-size / --http-max-input-size: both "unrecognized option"). Its gRPC
    # server accepts messages up to 2 GiB - 1 and its HTTP server has no body limit (a 160 MB request
    # was accepted). The field exists so callers get a clear error instead of a cap that silently
    # does nothing; set it only with a tritonserver that has such a flag.
    grpc_max_message_mb: int | None = None
    # Appended last, verbatim, so they can add or override flags.
    extra_args: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ServerError(
                f"model_control must be one of {MODEL_CONTROL_MODES}, got {self.model_control!r}"
            )
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ServerError(f"{name} must be in 1..65535, got {port}")
        ports = [self.http_port, self.grpc_port, self.metrics_port]
        if len(set(ports)) != 3:
            raise ServerError(f"http, grpc and metrics ports must differ, got {ports}")
        if self.log_verbose < 0:
            raise ServerError(f"log_verbose must be >= 0, got {self.log_verbose}")
        if self.grpc_max_message_mb is not None:
            raise ServerError(
                "grpc_max_message_mb is set, but tritonserver 2.51 has no flag to cap message size "
                "(gRPC accepts up to 2 GiB - 1, HTTP has no body limit); enforce a limit in front of "
                "the server or in the model instead"
            )
        unknown = [a for a in self.restricted_apis if a not in RESTRICTABLE_APIS]
        if isinstance(self.restricted_apis, str) or unknown:
            raise ServerError(f"restricted_apis must be a sequence of {', '.join(RESTRICTABLE_APIS)}; "
                              f"got {self.restricted_apis!r}")
        if self.restricted_key is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,}", self.restricted_key):
            raise ServerError("restricted_key must be at least 8 characters of letters, digits, '.', '_', '~', '-'")
        if isinstance(self.extra_args, str):
            # A bare string would be split into characters by tuple(); catch the mistake here.
            raise ServerError("extra_args must be a sequence of arguments, not one string")


# --- locating the bundled files -------------------------------------------------------------------


def _pytriton_root() -> Path:
    """<site-packages>/pytriton, found without importing the package."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            f"nvidia-pytriton is not installed in this Python ({sys.prefix}), so there is no "
            "tritonserver binary: run scripts/setup.sh"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the tritonserver binary bundled in nvidia-pytriton."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise ServerError(
            f"nvidia-pytriton is installed but {binary} is missing or not executable: "
            "run scripts/setup.sh"
        )
    return binary


def _venv_dir() -> Path:
    """The environment the stub must run in: the one running this code."""
    return Path(sys.prefix)


def _venv_bin() -> Path:
    # The stub looks up `python3` on PATH and reads the venv's pyvenv.cfg next to it to find the
    # venv's site-packages (PYTHONPATH is ignored: the stub runs Python isolated).
    for candidate in (_venv_dir() / "bin", Path(sys.executable).parent):
        if (candidate / "python3").exists():
            return candidate
    raise ServerError(
        f"no python3 next to {sys.executable} or in {_venv_dir() / 'bin'}: the python-backend stub "
        "finds its interpreter as `python3` on PATH"
    )


def _copy_if_changed(src: Path, dst: Path) -> None:
    """Copy src to dst unless dst already has src's size and mtime.

    The copy goes to a temporary name and is renamed into place, so a server starting at the same
    time (another test, another process) never loads a half-written libtriton_python.so.
    """
    st = src.stat()
    try:
        dt = dst.stat()
        if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
            return
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)  # copy2 keeps the mode (the stub must stay executable) and mtime
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def backend_directory(cache_dir: Path | None = None) -> Path:
    """Build (idempotently) the backend directory tritonserver needs and return its path.

    Layout (runtime notes): <dir>/python/ holds libtriton_python.so and triton_python_backend_utils.py
    from pytriton/tritonserver/backends/python/, and triton_python_backend_stub from
    pytriton/tritonserver/python_backend_stubs/<X.Y>/ for the running Python. Files are copied, not
    linked: the python backend looks for the stub next to the directory it loaded the .so from.
    The default location, <venv>/tritonserver-backends, goes away with the venv it belongs to.
    """
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, src in sources.items():
        if not src.is_file():
            raise ServerError(
                f"nvidia-pytriton has no {name} for Python {version} (looked for {src}): "
                "run scripts/setup.sh with a supported Python"
            )
    out = Path(cache_dir) if cache_dir is not None else _venv_dir() / "tritonserver-backends"
    py_dir = out / "python"
    py_dir.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        _copy_if_changed(src, py_dir / name)
    return out


def _check_numpy() -> None:
    # numpy 2 makes python-backend outputs silently empty with this tritonserver (runtime notes); the
    # stub imports numpy from this same venv, so refuse to start rather than serve empty tensors.
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return
    if int(version.split(".")[0]) >= 2:
        raise ServerError(
            f"numpy {version} is installed; python-backend outputs come back empty with numpy 2 in "
            "tritonserver 2.51: install numpy<2 (scripts/setup.sh pins 1.26.4)"
        )


# --- command line ---------------------------------------------------------------------------------


def _has_flag(args: Iterable[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(cfg: ServerConfig) -> tuple[list[str], dict[str, str]]:
    """argv and environment for tritonserver (run without a shell)."""
    cfg.validate()
    repo = Path(cfg.repo).resolve()
    binary = find_tritonserver()
    argv = [
        str(binary),
        f"--model-repository={repo}",
        f"--backend-directory={backend_directory()}",
        # Bind every endpoint to the configured host (loopback by default): tritonserver's own default
        # is 0.0.0.0, and the server has no authentication.
        f"--http-address={cfg.host}",
        f"--grpc-address={cfg.host}",
        f"--metrics-address={cfg.host}",
        f"--http-port={cfg.http_port}",
        f"--grpc-port={cfg.grpc_port}",
        f"--metrics-port={cfg.metrics_port}",
        f"--model-control-mode={cfg.model_control}",
        # Ready means every model in the repository is loaded, so health polling waits for models.
        "--strict-readiness=true",
        # A model that fails to load stops the server instead of leaving it serving a partial
        # repository; start() sees the exit and reports the model's error from the log.
        "--exit-on-error=true",
        # Our config.pbtxt files are generated complete from one spec per model; auto-complete would
        # let the backend fill in or change fields (it runs each model's auto_complete_config and
        # applies default-max-batch-size=4 to models that allow batching), so what is served could
        # differ from what was written. Disabled, a missing field is a load error instead.
        "--disable-auto-complete-config",
        # No GPU here: GPU metrics need DCGM/NVML. CPU metrics are a 2 s /proc poll we do not use on a
        # 2-core machine; the inference metrics (counts, latencies) stay on the metrics port.
        "--allow-gpu-metrics=false",
        "--allow-cpu-metrics=false",
        # Pinned and CUDA pools need CUDA; 0 disables them cleanly (the server logs "... pool
        # disabled") instead of trying to allocate 256 MB pinned / 64 MB CUDA by default.
        "--pinned-memory-pool-byte-size=0",
        "--cuda-memory-pool-byte-size=0:0",
        f"--log-verbose={cfg.log_verbose}",
        # The gRPC frontend keeps this many request/response objects for reuse (default 8), each with
        # the buffers of the largest message it carried: after a few refused 300 MB requests the server
        # held 300-400 MB more per request. 0 frees them with the request (measured: tests/test_memory.py).
        "--grpc-infer-allocation-pool-size=0",
    ]
    key = None
    if cfg.restricted_apis:
        key = cfg.restricted_key or secrets.token_urlsafe(24)
        restricted = list(cfg.restricted_apis)
        if cfg.model_control == "none" and "model-repository" not in restricted:
            # Without model control the repository API can only list models and refuse load/unload, and
            # tritonserver 2.51 words that refusal "... not allowed if polling is enabled", which is
            # wrong here; restricted, it answers "This protocol/API is restricted" instead.
            restricted.append("model-repository")
        apis = ",".join(restricted)
        argv += [f"--grpc-restricted-protocol={apis}:{RESTRICTED_HEADER}={key}",
                 f"--http-restricted-api={apis}:{RESTRICTED_HEADER}={key}"]
    if cfg.model_control == "explicit" and not _has_flag(cfg.extra_args, "--load-model"):
        # In explicit mode tritonserver loads nothing at startup unless told; "*" loads the whole
        # repository like "none" does, and the load/unload API is available afterwards. Skipped when
        # extra_args name models, since "*" combined with other --load-model flags is an error.
        argv.append("--load-model=*")
    argv.extend(cfg.extra_args)

    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    # The stub links libpython3.X.so from Python's lib dir; tritonserver and libtriton_python.so
    # link the vendored libraries in <site-packages>/nvidia_pytriton.libs.
    lib_paths = [p for p in (libdir, str(_pytriton_root().parent / "nvidia_pytriton.libs")) if p]
    if env.get("LD_LIBRARY_PATH"):
        lib_paths.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_paths)
    env["PATH"] = os.pathsep.join(p for p in (str(_venv_bin()), env.get("PATH", "")) if p)
    # glibc's malloc raises its mmap threshold to the size of the largest block freed (up to 32 MB)
    # and keeps freed heap memory (128 KiB and more at the top of each arena) for reuse, so the
    # buffers of a large message stay resident after the request: tritonserver grew by 64-160 MB per
    # 300 MB request, up to 355 MB, with the allocation pool already off. A fixed 32 KiB threshold
    # serves large buffers by mmap, which gives them back on free, and trim threshold and top pad 0
    # give back freed heap tops at once; tritonserver then stays at ~10 MB of private memory through
    # the same requests (tests/test_memory.py). The stubs inherit the settings; their big arrays are
    # mmapped either way. An operator's own MALLOC_* settings win.
    for name, value in MALLOC_ENV.items():
        env.setdefault(name, value)
    if key is not None:
        # The key reaches tritonserver through its environment (owner-only), not its command line
        # (readable by every local user); see thfm_serve/argv_secret.py.
        argv, env = argv_secret.hide(argv, env, key, backend_directory())
    return argv, env


# --- process helpers ------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a pid from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may contain spaces: parse after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, found by scanning /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is not None and st[1] == pgid and st[0] != "Z":
            members.append(int(entry))
    return members


def _shm_regions(pids: Iterable[int]) -> set[str]:
    names = set()
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names.update(a.decode() for a in args if a.startswith(_SHM_PREFIX.encode()))
    return names


def remove_regions(names: Iterable[str]) -> list[str]:
    """Unlink python-backend regions from /dev/shm (only names with the backend's prefix); the removed ones."""
    removed = []
    for name in names:
        if not name.startswith(_SHM_PREFIX) or "/" in name:
            continue
        try:
            Path("/dev/shm", name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d python-backend shared-memory region(s) left in /dev/shm", len(removed))
    return removed


def python_stub_regions(pids: Iterable[int]) -> set[str]:
    """Names (in /dev/shm) of the python-backend shared-memory regions the given processes were started with."""
    return _shm_regions(pids)


_STUB_BINARY = "triton_python_backend_stub"


def python_stubs(pgid: int) -> dict[int, str]:
    """Live python-backend stubs of a server's process group: pid -> model instance name.

    The stub's argv is (python backend 2.51): stub, <repo>/<model>/<version>/model.py, shm region,
    shm sizes, parent pid, backend dir, ipc handle, instance name ("core_0_0"), ... The instance name
    is taken from argv[8] when it looks like one, else from the model path.
    """
    out = {}
    for pid in group_members(pgid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not args or not args[0].endswith(_STUB_BINARY.encode()):
            continue
        text = [a.decode(errors="replace") for a in args]
        name = text[8] if len(text) > 8 and text[8].rsplit("_", 2)[-1].isdigit() else ""
        if not name and len(text) > 1:
            parts = Path(text[1]).parts
            name = parts[-3] if len(parts) >= 3 else text[1]
        out[pid] = name or f"pid {pid}"
    return out


def _is_error_line(line: str) -> bool:
    # tritonserver's log lines start with the severity and date: "E1124 06:52:09.821764 ...".
    return len(line) > 5 and line[0] == "E" and line[1:5].isdigit()


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The error lines and the last lines of a tritonserver log, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    # Drop the ASCII tables tritonserver prints at startup; keep error-severity lines ("E1124 ...")
    # since a model's load error is often printed well before the last lines.
    text = [t for t in text if t and not t.startswith(("+", "|"))]
    errors = [t for t in text if _is_error_line(t)]
    last = text[-lines:]
    out = [t for t in errors if t not in last][-10:] + last
    return "\n".join(out)


def _headline(path: Path | None) -> str:
    """The most telling error in a tritonserver log, on one line (e.g. a model's load error)."""
    try:
        text = path.read_text(errors="replace").splitlines() if path is not None else []
    except OSError:
        return ""
    errors = [
        t for t in text
        if _is_error_line(t)
        # Logged by every start of this build on a machine without a GPU; not the cause of anything.
        and "CudaDriverHelper has not been initialized" not in t
    ]
    loads = [t for t in errors if "failed to load" in t]
    finals = [t for t in text if t.startswith("error: ")]
    line = (loads or errors or finals or [""])[0]
    # 'E1124 06:52:09.821764 3419 model_lifecycle.cc:642] "failed to load ...\n\nAt: ..."'
    if "] " in line:
        line = line.split("] ", 1)[1]
    return line.strip('"').split("\\n")[0]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it); for tests."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on 127.0.0.1 right now. All n sockets are bound at once: ports taken
    one after another can repeat (the OS may hand a just-closed port out again), and a server given
    the same port twice refuses to start."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def server_ports() -> dict[str, int]:
    """ServerConfig's three ports, free and distinct: ServerConfig(repo=..., **server_ports())."""
    return dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3)))


def _connect_host(host: str) -> str:
    # A server bound to a wildcard address is reached through loopback.
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# --- the server -----------------------------------------------------------------------------------


class TritonServer:
    """A tritonserver process: start, wait for readiness, stop (context manager).

    The process runs in its own session and process group, so stopping it also reaches the
    python-backend stubs it spawned, and a Ctrl-C in the terminal reaches only the Python parent,
    which then shuts the server down once, in order.
    """

    def __init__(self, cfg: ServerConfig, log_path: Path | None = None):
        self.cfg = cfg
        self.log_path = Path(log_path) if log_path is not None else None
        self._own_log = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._client = None
        self._stopped = False  # set once stop() has reaped the process and swept its group
        self._lock = threading.Lock()
        self._starts = 0
        # The python-backend stubs seen when the server became ready (pid -> instance name).
        self._stubs: dict[int, str] = {}
        # Their shared-memory regions (names in /dev/shm), remembered so that stop() removes those of
        # stubs that died since: a stub killed with SIGKILL is gone from the process group by then.
        self._regions: set[str] = set()

    # -- addresses

    @property
    def grpc_url(self) -> str:
        return f"{_connect_host(self.cfg.host)}:{self.cfg.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{_connect_host(self.cfg.host)}:{self.cfg.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"{_connect_host(self.cfg.host)}:{self.cfg.metrics_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    # -- lifecycle

    def start(self, timeout_s: float = 120, cancel: threading.Event | None = None) -> TritonServer:
        """Start tritonserver and wait until it is ready (all models loaded).

        Raises ServerError with the tail of the server log if the server exits or is not ready in
        time; the process is stopped before raising. If `cancel` is set while waiting, the wait
        returns early without raising and the caller decides (serve_forever stops the server).
        """
        if self._proc is not None and self._proc.poll() is None:
            raise ServerError(f"tritonserver is already running (pid {self._proc.pid})")
        repo = Path(self.cfg.repo)
        if not repo.is_dir():
            raise ServerError(f"model repository {repo} is not a directory")
        argv, env = server_command(self.cfg)
        _check_numpy()

        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting tritonserver (repository %s, log %s)", repo, self.log_path)
        self._stopped = False
        self._stubs = {}
        log.debug("argv: %s", argv)
        # A restart (same object, e.g. serve_forever after a stub died) appends, so the log of the
        # run that went wrong is kept.
        self._starts += 1
        with open(self.log_path, "wb" if self._starts == 1 else "ab") as log_file:
            # The child keeps its own copy of the descriptor; ours is closed when the block ends.
            self._proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group: pgid == pid
                close_fds=True,
            )
        try:
            secret = env.get(argv_secret.ENV_NAME)
            if secret and argv_secret.cmdline_holds(self._proc.pid, secret):
                raise ServerError("tritonserver's command line holds the restricted-API key; refusing to serve")
            self.wait_ready(timeout_s, cancel=cancel)
            if secret and self._proc.poll() is None and not argv_secret.helper_loaded(self._proc.pid):
                # Without the helper tritonserver took the placeholder, which everyone can read, as the key.
                raise ServerError("the helper that passes the restricted-API key to tritonserver was not loaded "
                                  f"(LD_PRELOAD={env.get('LD_PRELOAD')!r}); refusing to serve")
        except BaseException:
            # Keep the log of a failed start even if it is a temporary file: the message points at it.
            self._own_log = False
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float, cancel: threading.Event | None = None) -> None:
        """Poll gRPC readiness until ready; ServerError if the process exits or time runs out."""
        if self._proc is None:
            raise ServerError("tritonserver was not started")
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        delay = 0.05
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise ServerError(
                    f"tritonserver exited with code {rc} before it was ready: "
                    f"{_headline(self.log_path) or 'see the log'}\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            if self.is_ready():
                self._stubs = python_stubs(self._proc.pid)
                self._regions = python_stub_regions(self._stubs)
                log.info("tritonserver ready in %.1f s (pid %d)", time.monotonic() - t0, self._proc.pid)
                return
            if cancel is not None and cancel.is_set():
                return
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"tritonserver was not ready after {timeout_s:.0f} s: "
                    f"{_headline(self.log_path) or 'no error in the log'}\n"
                    f"--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def is_ready(self, settle_s: float = 0.0) -> bool:
        """True if the process runs and reports ready over gRPC (with strict readiness: all models).

        settle_s > 0 asks again for that long before answering no: a channel that saw the port closed
        while the models loaded waits out its reconnect backoff (up to 0.5 s) and fails every call
        meanwhile, though another client may already see the server ready."""
        deadline = time.monotonic() + settle_s
        while not self._probe_ready():
            if time.monotonic() >= deadline or self._proc is None or self._proc.poll() is not None:
                return False
            time.sleep(0.1)
        return True

    def _probe_ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        from tritonclient.utils import InferenceServerException

        try:
            if self._client is None:
                import tritonclient.grpc as grpcclient

                self._client = grpcclient.InferenceServerClient(
                    self.grpc_url,
                    channel_args=[
                        # Never route the health check through an http(s)_proxy from the environment
                        # (gRPC honours those variables); the server is local.
                        ("grpc.enable_http_proxy", 0),
                        # tritonserver opens its gRPC port only after every model has loaded. gRPC's
                        # default reconnect backoff grows from 1 s towards 120 s while the port is
                        # closed, which would notice a slow-loading server seconds late.
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 500),
                    ],
                )
            return bool(self._client.is_server_ready(client_timeout=2.0))
        except InferenceServerException:
            return False  # not listening yet, or shutting down

    @property
    def stubs(self) -> dict[int, str]:
        """The python-backend stubs the server had when it became ready (pid -> instance name)."""
        return dict(self._stubs)

    def dead_stubs(self) -> list[str]:
        """Instance names whose python-backend stub has died since the server became ready.

        tritonserver 2.51 does not restart a dead stub (checked: after a `kill -9` of the core's stub
        every later request to it fails with "Stub process 'core_0_0' is not healthy", while the
        server and the model still report ready), so this is the only way to notice one.
        """
        if self._proc is None or self._proc.poll() is not None or not self._stubs:
            return []
        alive = python_stubs(self._proc.pid)
        return sorted(name for pid, name in self._stubs.items() if pid not in alive)

    def stop(self, timeout_s: float = 30) -> int | None:
        """Stop the server and every process in its group; idempotent. Returns the exit code.

        SIGTERM goes to tritonserver alone: it finishes in-flight requests, unloads the models (which
        runs each python model's finalize) and ends its stubs. Whatever is still alive after
        timeout_s, or left in the group afterwards, is killed with SIGKILL.
        """
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # a closing channel must not keep us from stopping the server
                    pass
                self._client = None
            proc = self._proc
            if proc is None:
                return None
            if self._stopped:
                return proc.returncode
            pgid = proc.pid  # start_new_session made it the group leader
            if proc.poll() is None:
                log.info("stopping tritonserver (pid %d)", proc.pid)
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not stop in %.0f s; killing its process group", timeout_s)
            shm = _shm_regions(group_members(pgid)) | self._regions
            self._kill_group(pgid)
            proc.wait()
            # Regions are removed by a clean shutdown; those of a stub killed with SIGKILL (or of a
            # server killed so) would stay in /dev/shm and pile up over restarts.
            remove_regions(shm)
            rc = proc.returncode
            self._stopped = True
            log.info("tritonserver stopped (exit code %s)", rc)
            if self._own_log and self.log_path is not None:
                self.log_path.unlink(missing_ok=True)
                self.log_path, self._own_log = None, False
            return rc

    @staticmethod
    def _kill_group(pgid: int, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                raise ServerError(f"processes {group_members(pgid)} of group {pgid} survived SIGKILL")
            time.sleep(0.05)

    def __enter__(self) -> TritonServer:
        if self._proc is None or self._proc.poll() is not None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --- `thfm serve` ---------------------------------------------------------------------------------


STUB_DEATH_ACTIONS = ("restart", "exit")
# Exit status of serve_forever when a stub died and on_stub_death="exit" (or restarts keep failing):
# EX_SOFTWARE from sysexits.h, distinct from tritonserver's own codes and from 128+N.
EXIT_STUB_DIED = 70


def serve_forever(cfg: ServerConfig, log_path: Path | None = None, start_timeout_s: float = 300,
                  on_stub_death: str = "restart", max_restarts: int = 5, restart_window_s: float = 600,
                  restart_grace_s: float = 0.0, poll_s: float = 0.5) -> int:
    """Run tritonserver until SIGINT/SIGTERM (then stop it cleanly and return 0) or until it dies
    (then return its exit code, 128+N if killed by signal N, as a shell would report it).

    A python-backend stub that dies (OOM killer, a crash in a native library) is not restarted by
    tritonserver 2.51: its model keeps reporting ready and fails every request. With
    on_stub_death="restart" (the default) the whole server is restarted in place (requests in flight
    fail; clients retry them), at most max_restarts times in restart_window_s, after which, or with
    on_stub_death="exit", serve_forever stops the server and returns EXIT_STUB_DIED for a supervisor
    to act on. The broken server is killed after restart_grace_s (default 0: at once): while a
    tritonserver shuts down gracefully it answers NOT_FOUND "has no available versions", which
    clients take for a wrong repository, whereas a closed port reads as UNAVAILABLE and is retried. The check runs only with model_control "none": in "explicit" mode an unload ends stubs
    on purpose.

    A failed start raises ServerError (the CLI prints its message: the model's load error and the
    tail of the log). A signal during start stops the half-started server and returns 0.
    """
    if on_stub_death not in STUB_DEATH_ACTIONS:
        raise ServerError(f"on_stub_death must be one of {STUB_DEATH_ACTIONS}, got {on_stub_death!r}")
    watch_stubs = cfg.model_control == "none"
    restarts: list[float] = []
    stop_requested = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        # Only set a flag: raising from here could interrupt Popen between fork and bookkeeping and
        # leak a server.
        received.append(signum)
        stop_requested.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    else:
        log.warning("serve_forever is not on the main thread: SIGINT/SIGTERM will not stop the server")

    server = TritonServer(cfg, log_path=log_path)
    try:
        server.start(timeout_s=start_timeout_s, cancel=stop_requested)
        # Say so whenever it did become ready, even if a signal came in meanwhile: a client may
        # already have seen it ready.
        if server.stubs or server.is_ready(settle_s=1.0):
            log.info(
                "ready: grpc=%s http=%s metrics=%s (log %s)",
                server.grpc_url, server.http_url, server.metrics_url, server.log_path,
            )
        while not stop_requested.wait(poll_s):
            rc = server.returncode
            if rc is not None:
                log.error("tritonserver exited with code %d:\n%s", rc, _tail(server.log_path))
                server._own_log = False  # keep the log of a crash
                return 128 - rc if rc < 0 else rc
            dead = server.dead_stubs() if watch_stubs else []
            if not dead:
                continue
            server._own_log = False  # keep the log of what went wrong
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < restart_window_s]
            why = (f"python-backend stub of {', '.join(dead)} died; tritonserver does not restart it and "
                   "every request to that model would fail")
            if on_stub_death == "exit" or len(restarts) >= max_restarts:
                if on_stub_death == "restart":
                    why += f" ({len(restarts)} restarts in the last {restart_window_s:.0f} s already)"
                log.error("%s: stopping (exit code %d; log %s)", why, EXIT_STUB_DIED, server.log_path)
                server.stop(timeout_s=restart_grace_s)
                return EXIT_STUB_DIED
            restarts.append(now)
            log.error("%s: restarting tritonserver (restart %d)", why, len(restarts))
            server.stop(timeout_s=restart_grace_s)
            server.start(timeout_s=start_timeout_s, cancel=stop_requested)
            if server.stubs or server.is_ready(settle_s=1.0):
                log.info("ready again after restart %d: grpc=%s", len(restarts), server.grpc_url)
        log.info("received %s, stopping", signal.Signals(received[0]).name)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
