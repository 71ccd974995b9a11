"""`thfm batch` on a real Ray cluster started on this machine (a head and a second node, each a
`ray start` process tree, tests/rayfix.py) against real tritonservers serving the tiny checkpoint.

The reference for every output is `thfm predict --url` on the same clip and server: the batch files
must be byte-for-byte the same arrays. The corpus holds one corrupt file, which must be recorded as
failed with its reason while the others complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rayfix import RayCluster
from serverfix import served_repo, start_server
from thfm_serve.clipgen import make_clip

pytestmark = pytest.mark.server

THFM = [sys.executable, "-m", "thfm_serve.cli"]
TASKS = "depth,normals,keypoints2d"
CLIP_FRAMES = (5, 7, 9, 12)  # served window: 5 frames -> 1, 2, 2 and 3 windows


@pytest.fixture(scope="module")
def repo(request, tmp_path_factory, tiny_checkpoint):
    return served_repo(request.config, tmp_path_factory, tiny_checkpoint)


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    srv = start_server(repo, tmp_path_factory.mktemp("batch-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster(cpus_per_node=1)
    try:
        c.start(workers=1)
        yield c
    finally:
        pids = c.pids()
        c.stop()
        left = [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in _state(p)]
        assert not left, f"ray processes left behind: {left}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, n in enumerate(CLIP_FRAMES):
        make_clip(_mk(d / "clips", f"clip{i}.mp4"), frames=n, height=24 + 8 * (i % 2), width=40)
    (d / "clips" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    return d / "clips"


def _mk(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


@pytest.fixture(scope="module")
def references(corpus, server, tmp_path_factory):
    """`thfm predict --url` outputs per clip: the ground truth the batch run must reproduce."""
    from thfm_serve.cli import main

    out = {}
    for clip in sorted(corpus.glob("clip*.mp4")):
        dest = tmp_path_factory.mktemp("ref") / clip.stem
        assert main(["-q", "predict", str(clip), "--url", server.grpc_url, "--tasks", TASKS, "--out", str(dest)]) == 0
        out[str(clip)] = dest
    return out


def _batch(args, cluster, timeout=600, **popen):
    return subprocess.run(THFM + ["batch", *args, "--ray-address", cluster.address], capture_output=True,
                          text=True, timeout=timeout, env=cluster.env, **popen)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _assert_same_files(folder: Path, ref: Path) -> None:
    names = sorted(p.name for p in ref.glob("*.npz"))
    assert sorted(p.name for p in folder.glob("*.npz")) == names and names
    for name in names:
        with np.load(folder / name) as a, np.load(ref / name) as b:
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (folder, name, k)


def _check_run(out: Path, corpus: Path, references: dict) -> list[dict]:
    records = _manifest(out)
    videos = [r["video"] for r in records]
    assert len(videos) == len(set(videos)) == len(references) + 1  # one line per video, none lost
    by_video = {r["video"]: r for r in records}
    bad = by_video[str(corpus / "corrupt.mp4")]
    assert bad["status"] == "failed" and bad["output"] is None and "VideoError" in bad["error"], bad
    for clip, ref in references.items():
        rec = by_video[clip]
        assert rec["status"] == "done" and rec["error"] is None, rec
        assert set(rec) >= {"video", "status", "output", "seconds", "error"}
        _assert_same_files(Path(rec["output"]), ref)
    # Exactly one folder per finished video and nothing half-written.
    folders = sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert sorted(Path(by_video[c]["output"]) for c in references) == folders
    assert not any((out / ".partial").glob("*"))
    return records


@pytest.mark.timeout(900)
def test_corpus_on_two_node_cluster_matches_predict_and_resumes(cluster, server, corpus, references, tmp_path):
    out = tmp_path / "out"
    proc = _batch([str(corpus), "--out", str(out), "--url", server.grpc_url, "--tasks", TASKS], cluster)
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: some video failed (the corrupt one)
    records = _check_run(out, corpus, references)
    nodes = {r["node"] for r in records if "node" in r}
    assert len(nodes) == 2, f"videos ran on {len(nodes)} node(s) of the 2-node cluster"

    # Re-run over a manifest file naming the same videos: finished videos are skipped (their folders
    # untouched), the failed one is tried again and recorded again, still one line per video.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    listing = tmp_path / "videos.txt"
    listing.write_text("# the corpus again\n" + "\n".join(os.path.relpath(v, tmp_path) for v in
                                                           sorted(r["video"] for r in records)) + "\n")
    proc = _batch([str(listing), "--out", str(out), "--url", server.grpc_url, "--tasks", TASKS], cluster)
    assert proc.returncode == 1, proc.stderr[-3000:]
    again = _check_run(out, corpus, references)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")} == stamps
    done_before = {r["video"]: r["seconds"] for r in records if r["status"] == "done"}
    assert {r["video"]: r["seconds"] for r in again if r["status"] == "done"} == done_before


@pytest.mark.timeout(900)
def test_repo_starts_a_server_on_every_node(cluster, repo, corpus, references, tmp_path):
    out = tmp_path / "out"
    clips = sorted(references)[:2]
    proc = _batch([*clips, "--out", str(out), "--repo", str(repo), "--tasks", TASKS, "--pictures"], cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started 2 tritonserver(s) on 2 node(s)" in proc.stderr, proc.stderr[-3000:]
    records = _manifest(out)
    assert [r["status"] for r in records] == ["done", "done"]
    for r in records:
        _assert_same_files(Path(r["output"]), references[r["video"]])
        pictures = sorted(p.name for p in (Path(r["output"]) / "pictures").iterdir())
        assert pictures == sorted(f"{t}.{ext}" for t in TASKS.split(",") for ext in ("mp4", "png"))
    # The servers the job started are gone with it.
    assert not [p for p in cluster.pids() if "tritonserver" in _cmdline(p)]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_worker_node_killed_mid_run(server, tmp_path):
    """The second node is SIGKILLed while videos are in flight; the job completes, every video once."""
    clips = tmp_path / "clips"
    for i in range(12):
        make_clip(_mk(clips, f"v{i:02d}.mp4"), frames=12, height=24, width=40)
    out = tmp_path / "out"
    with RayCluster(cpus_per_node=1) as c:
        c.start(workers=1)
        proc = subprocess.Popen(THFM + ["batch", str(clips), "--out", str(out), "--url", server.grpc_url,
                                        "--tasks", TASKS, "--ray-address", c.address],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=c.env, text=True)
        log: list[str] = []
        reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            committed = [p for p in out.glob("*") if p.is_dir() and not p.name.startswith(".")] if out.exists() else []
            if len(committed) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the node could be killed: " + "".join(log)[-2000:]
        c.kill_node(1)
        killed_at = len([p for p in out.glob("*") if p.is_dir() and not p.name.startswith(".")])
        rc = proc.wait(timeout=600)
        reader.join(timeout=10)
        assert rc == 0, "".join(log)[-4000:]
    assert killed_at < 12
    records = _manifest(out)
    assert sorted(r["video"] for r in records) == sorted(str(p) for p in clips.glob("*.mp4"))
    assert all(r["status"] == "done" for r in records), records
    folders = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(folders) == 12 and all((f / "depth.npz").exists() for f in folders)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_servers_started_by_a_killed_driver_go_away(repo, tmp_path):
    """`thfm batch --repo` SIGKILLed after its servers are up: Ray ends the actors' child processes
    (the tritonservers) and their python-backend stubs exit with them; nothing is left running."""
    clips = tmp_path / "clips"
    for i in range(8):
        make_clip(_mk(clips, f"v{i}.mp4"), frames=12, height=24, width=40)
    log = tmp_path / "driver.log"
    with RayCluster(cpus_per_node=1) as c:
        c.start(workers=1)
        with open(log, "w") as f:
            proc = subprocess.Popen(THFM + ["batch", str(clips), "--out", str(tmp_path / "out"), "--repo", str(repo),
                                            "--tasks", "depth", "--ray-address", c.address],
                                    stdout=subprocess.DEVNULL, stderr=f, env=c.env)
        deadline = time.monotonic() + 300
        while "started 2 tritonserver(s)" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert len(_servers(repo)) == 2
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _servers(repo, stubs=True) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _servers(repo, stubs=True), "tritonserver processes outlived their driver"


def _servers(repo: Path, stubs: bool = False) -> list[int]:
    """tritonserver (and with stubs, python-backend stub) processes serving this repository."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            cmd = _cmdline(int(d))
            if str(repo) in cmd and ("tritonserver " in cmd.split(str(repo))[0] or (stubs and "backend_stub" in cmd)):
                out.append(int(d))
    return out
