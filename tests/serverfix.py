"""Shared pieces for tests that serve the tiny checkpoint's repository with a real tritonserver.

- ``served_repo``: the tiny checkpoint exported for cpu/fp32 at a small grid, cached in pytest's
  cache folder (``.pytest_cache/d/thfm-served-<F>x<H>x<W>``) so later runs reuse it (the exporter
  re-exports whatever no longer matches the checkpoint hash, spec and recipe), then copied into a
  temporary folder and given the test's request limits (repository.set_limits). A fresh export
  takes 50-90 s on 2 cores; a reused one about a second.
- ``start_server``: a TritonServer on free loopback ports with its log in a temporary folder.
- ``grpc_inputs`` / ``outputs``: requests to and answers from the entry model contract.
- ``record`` and ``write_tables``: rows a test leaves for the end of the run (tests/conftest.py's
  pytest_terminal_summary prints them), so a catalogue of cases shows its outcomes without `-s`.

Kept light at import time (no torch, no tritonclient): tests/conftest.py imports it at the end of
every run.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

logger = logging.getLogger(__name__)

# The export grid of the served tests: a 5-frame window at 32x32 (smaller than the tiny config's 9 at
# 64x64) keeps both the export and every request fast.
WINDOW, HEIGHT, WIDTH = 5, 32, 32

# --- the repository -----------------------------------------------------------------------------


def _cache_dir(config: pytest.Config, tmp_path_factory, name: str) -> Path:
    cache = getattr(config, "cache", None)
    if cache is None:  # run with -p no:cacheprovider: export into this session's temporary folder
        return tmp_path_factory.mktemp(name)
    return Path(cache.mkdir(name))


def exported_repo(config: pytest.Config, tmp_path_factory, checkpoint: Path, frames: int = WINDOW,
                  height: int = HEIGHT, width: int = WIDTH) -> Path:
    """The tiny checkpoint exported (or reused) for cpu/fp32 at frames x height x width, in the cache.

    The returned path is shared with other sessions: copy it (copy_export) before changing anything.
    """
    from thfm_serve.export import export_repository

    root = _cache_dir(config, tmp_path_factory, f"thfm-served-{frames}x{height}x{width}")
    repo = root / "repo"
    # Two pytest sessions on one checkout must not export into the same folder at once.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.perf_counter()
        export_repository(checkpoint, repo, "cpu", "fp32", frames=frames, height=height, width=width)
        logger.info("export (cpu, fp32, %dx%dx%d) ready in %.1f s", frames, height, width, time.perf_counter() - t0)
    return repo


def copy_export(src: Path, dest: Path, models: Sequence[str] | None = None) -> Path:
    """A private copy of a cached export (never taken while another session re-exports into it);
    with `models`, a repository holding only those submodels' folders (the export tests start from
    the served export's fp32 VAE pair this way, so a session traces the tiny VAE once)."""
    with open(src.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if models is None:
            shutil.copytree(src, dest)
        else:
            dest.mkdir(parents=True)
            for name in models:
                shutil.copytree(src / name, dest / name)
    return dest


def served_repo(config: pytest.Config, tmp_path_factory, checkpoint: Path, limits=None,
                frames: int = WINDOW, height: int = HEIGHT, width: int = WIDTH) -> Path:
    """A private copy of the cached export, rewritten with `limits` (serving.Limits)."""
    from thfm_serve.repository import check_repository, set_limits

    src = exported_repo(config, tmp_path_factory, checkpoint, frames, height, width)
    dest = copy_export(src, tmp_path_factory.mktemp("served") / "repo")
    if limits is not None:
        set_limits(dest, limits)
    check_repository(dest, "cpu")
    return dest


def start_server(repo: Path, log_dir: Path, timeout_s: float = 180, **cfg: Any):
    """tritonserver on free loopback ports serving `repo` (ServerConfig fields in cfg)."""
    from thfm_serve.server import ServerConfig, TritonServer, server_ports

    config = ServerConfig(repo=repo, host="127.0.0.1", **server_ports(), **cfg)
    srv = TritonServer(config, log_path=Path(log_dir) / "server.log")
    t0 = time.perf_counter()
    srv.start(timeout_s=timeout_s)
    logger.info("tritonserver ready in %.1f s (log %s)", time.perf_counter() - t0, srv.log_path)
    return srv


def grpc_client(url: str, max_message: int = 256 << 20):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url, channel_args=[
        ("grpc.enable_http_proxy", 0),
        ("grpc.max_send_message_length", max_message), ("grpc.max_receive_message_length", max_message)])


# --- requests -----------------------------------------------------------------------------------


def tensor(name: str, array, datatype: str):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def grpc_inputs(frames=None, video: bytes | None = None, tasks: Sequence[str | bytes] | None = None,
                frames_dtype: str = "UINT8") -> list:
    """Entry-contract inputs (protocol names); tasks may be str or raw bytes."""
    import numpy as np

    from thfm_serve.contract import protocol

    out = []
    if frames is not None:
        out.append(tensor(protocol.INPUT_FRAMES, frames, frames_dtype))
    if video is not None:
        out.append(tensor(protocol.INPUT_VIDEO, np.array([video], dtype=np.object_), "BYTES"))
    if tasks is not None:
        items = [t if isinstance(t, bytes) else t.encode() for t in tasks]
        out.append(tensor(protocol.INPUT_TASKS, np.array(items, dtype=np.object_), "BYTES"))
    return out


def outputs(result) -> dict:
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


# --- tables printed at the end of the run --------------------------------------------------------

TABLES = pytest.StashKey[dict]()


def record(config: pytest.Config, table: str, row: Sequence[Any], header: Sequence[str] = ()) -> None:
    """Add a row to a named table that pytest_terminal_summary prints after the run; the table's
    header is taken from its first row's call."""
    tables = config.stash.setdefault(TABLES, {})
    if table not in tables:
        tables[table] = [tuple(header)] if header else []
    tables[table].append(tuple(str(c) for c in row))


def write_tables(terminalreporter, config: pytest.Config, max_cell: int = 50, max_last: int = 220) -> None:
    """Each recorded table as aligned columns; long cells are cut (the last column at max_last)."""

    def cut(text: str, n: int) -> str:
        return text if len(text) <= n else text[: n - 3] + "..."

    for title, rows in config.stash.get(TABLES, {}).items():
        if not rows:
            continue
        terminalreporter.section(title)
        ncols = max(len(r) for r in rows)
        rows = [tuple(r) + ("",) * (ncols - len(r)) for r in rows]
        widths = [min(max_cell, max(len(r[i]) for r in rows)) for i in range(ncols - 1)]
        for r in rows:
            cells = [cut(c, w).ljust(w) for c, w in zip(r, widths)] + [cut(r[-1], max_last)]
            terminalreporter.write_line("  ".join(cells).rstrip())


def assert_served_as_in_process(src: Path, tmp_path: Path, tasks: Sequence[str], grid: tuple[int, int, int],
                                seed: int = 4) -> None:
    """A copy of repository `src` served by a real tritonserver answers the entry model as the same
    repository's models do in process (the entry logic over serving's sessions), to 1e-4."""
    import numpy as np

    from thfm_serve import serving
    from thfm_serve.contract import protocol
    from thfm_serve.repository import check_repository

    repo = tmp_path / "repo"
    shutil.copytree(src, repo)
    check_repository(repo, "cpu")
    frames = np.random.default_rng(seed).integers(0, 256, (grid[0], 40, 48, 3), dtype=np.uint8)
    names = (protocol.VAE_ENCODER, protocol.CORE, protocol.VAE_DECODER)
    models = {n: serving.OnnxModel.load(repo / n, "1", n) for n in names}
    assets = serving.load_assets(repo)
    local = serving.entry_outputs(serving.run_entry(frames, list(tasks), serving.Grid(*grid), assets.config,
                                                    assets.embeddings(), serving.local_call(models)))
    srv = start_server(repo, tmp_path)
    try:
        client = grpc_client(srv.grpc_url)
        assert client.is_model_ready(protocol.VAE_DECODER) and client.is_model_ready(protocol.ENTRY_MODEL)
        got = outputs(client.infer(protocol.ENTRY_MODEL, grpc_inputs(frames=frames, tasks=list(tasks))))
    finally:
        srv.stop()
    for task in tasks:
        name = protocol.OUTPUT_FOR_TASK[task]
        np.testing.assert_allclose(got[name], local[name], atol=1e-4, rtol=1e-4, err_msg=task)
