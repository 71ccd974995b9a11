"""`thfm batch` without Ray: which videos a run covers (files, folders, globs, manifests, fsspec URLs),
their output folders, the commit protocol and the run manifest. Fast; no server except where a test
says it wants an unreachable one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from thfm_serve.errors import ThfmError
from thfm_serve.scale import job as jobs
from thfm_serve.scale.inputs import list_videos, local_copy, video_id
from thfm_serve.server import free_port


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "corpus"
    for rel in ("a.mp4", "sub/b.MOV", "sub/deeper/c.webm", "notes.txt.bak", "sub/readme.md", "d.mkv"):
        _touch(root / rel)
    return root


def test_directory_glob_and_duplicates(tree):
    want = [str(tree / p) for p in ("a.mp4", "d.mkv", "sub/b.MOV", "sub/deeper/c.webm")]
    assert list_videos([str(tree)]) == want
    assert list_videos([str(tree / "*.mp4"), str(tree / "**" / "*.webm")]) == [want[0], want[3]]
    # The same video named twice (directly and through the folder) is run once.
    assert list_videos([str(tree / "a.mp4"), str(tree), "file://" + str(tree / "d.mkv")]) == want


def test_manifests_txt_jsonl_csv_relative_to_their_folder(tree, tmp_path):
    lists = tmp_path / "lists"
    _touch(lists / "v.txt", b"# corpus\n../corpus/a.mp4\n\n" + str(tree / "d.mkv").encode() + b"\n")
    _touch(lists / "v.jsonl", json.dumps({"video": "../corpus/sub/b.MOV", "status": "failed"}).encode() + b"\n")
    _touch(lists / "v.csv", b"video,label\n../corpus/sub/deeper/c.webm,walk\n")
    got = list_videos([str(lists / "v.txt"), str(lists / "v.jsonl"), str(lists / "v.csv")])
    assert got == [str(tree / p) for p in ("a.mp4", "d.mkv", "sub/b.MOV", "sub/deeper/c.webm")]


@pytest.mark.parametrize("content,name,message", [
    (b"{not json\n", "bad.jsonl", "not JSON"),
    (b'{"path": "a.mp4"}\n', "bad.jsonl", '"video" string'),
    (b"path\na.mp4\n", "bad.csv", "'video' column"),
])
def test_bad_manifests_name_the_problem(tmp_path, content, name, message):
    _touch(tmp_path / name, content)
    with pytest.raises(ThfmError, match=message):
        list_videos([str(tmp_path / name)])


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(ThfmError, match="does not exist"):
        list_videos([str(tmp_path / "nope.mp4")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ThfmError, match="matches no video"):
        list_videos([str(tmp_path / "empty")])
    with pytest.raises(ThfmError, match="no input"):
        list_videos([])


def test_fsspec_urls(tmp_path):
    fs = fsspec.filesystem("memory")
    for name in ("clips/x.mp4", "clips/y.mov", "clips/z.txt"):
        fs.pipe(f"/thfm-test/{name}", name.encode())
    fs.pipe("/thfm-test/list.txt", b"clips/x.mp4\nmemory://thfm-test/clips/y.mov\n")
    try:
        want = [fs.unstrip_protocol("/thfm-test/clips/x.mp4"), fs.unstrip_protocol("/thfm-test/clips/y.mov")]
        assert list_videos(["memory://thfm-test/clips"]) == want
        assert list_videos(["memory://thfm-test/clips/*.mp4"]) == want[:1]
        assert list_videos(["memory://thfm-test/list.txt"]) == want
        # Named directly, through its folder and through a manifest: one video.
        assert list_videos(["memory://thfm-test/clips/x.mp4", "memory://thfm-test/clips",
                            "memory://thfm-test/list.txt"]) == want
        with local_copy(want[1]) as path:
            assert path.suffix == ".mov" and path.read_bytes() == b"clips/y.mov"
            kept = path
        assert not kept.exists()  # the temporary copy is gone after use
        with pytest.raises(ThfmError, match="does not exist"):
            list_videos(["memory://thfm-test/missing.mp4"])
    finally:
        fs.rm("/thfm-test", recursive=True)


def test_video_ids_are_stable_and_distinct():
    a, b = video_id("/data/x/clip.mp4"), video_id("/data/y/clip.mp4")
    assert a != b and a.startswith("clip-") and b.startswith("clip-")
    assert video_id("/data/x/clip.mp4") == a
    assert video_id("s3://bucket/we ird:name.mp4").startswith("we_ird_name-")


def test_commit_is_once_only(tmp_path):
    final = tmp_path / "v"
    first, second = tmp_path / ".partial" / "v.1", tmp_path / ".partial" / "v.2"
    _touch(first / "depth.npz", b"first")
    _touch(second / "depth.npz", b"second")
    assert jobs._commit(first, final) is True
    assert jobs._commit(second, final) is False  # the later attempt yields to the committed one
    assert (final / "depth.npz").read_bytes() == b"first" and not second.exists()


def test_a_finished_video_is_skipped_without_contacting_a_server(tmp_path):
    video = str(tmp_path / "a.mp4")
    folder = jobs.output_dir(tmp_path / "out", video)
    rec = {"video": video, "status": "done", "output": str(folder), "seconds": 1.0, "error": None}
    _touch(folder / jobs.RECORD_FILE, json.dumps(rec).encode())
    job = jobs.VideoJob(out=str(tmp_path / "out"), urls=["127.0.0.1:1"], tasks=["depth"])
    assert jobs.process_video(job, video) == {**rec, "skipped": True}


def test_unreachable_servers_fail_the_video_after_retries(tmp_path):
    video = _touch(tmp_path / "a.mp4")
    out = tmp_path / "out"
    job = jobs.VideoJob(out=str(out), urls=[f"127.0.0.1:{free_port()}"], tasks=["depth"], retries=2,
                        retry_wait_s=0.0, window_retries=0)
    rec = jobs.process_video(job, str(video))
    assert rec["status"] == "failed" and rec["attempts"] == 3 and rec["output"] is None
    assert "cannot reach Triton" in rec["error"]
    assert not jobs.output_dir(out, str(video)).exists()
    assert not any((out / jobs.PARTIAL).glob("*")) if (out / jobs.PARTIAL).exists() else True


def test_manifest_keeps_one_line_per_video(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / jobs.MANIFEST).write_text(json.dumps({"video": "old", "status": "done"}) + "\n{torn")
    m = jobs.Manifest(out)
    m.add({"video": "b", "status": "failed", "error": "e1"})
    m.add({"video": "a", "status": "done", "skipped": True})
    m.add({"video": "b", "status": "done", "error": None})
    # Appended as they come (a killed run keeps them) ...
    assert len((out / jobs.MANIFEST).read_text().splitlines()) == 5
    m.close(order=["a", "b"])
    lines = [json.loads(x) for x in (out / jobs.MANIFEST).read_text().splitlines()]
    # ... and compacted at the end: the run's order, the latest record each, older videos kept.
    assert lines == [{"video": "a", "status": "done"}, {"video": "b", "status": "done", "error": None},
                     {"video": "old", "status": "done"}]


def test_plan_clears_partial_attempts(tmp_path):
    out = tmp_path / "out"
    done, todo = str(tmp_path / "done.mp4"), str(tmp_path / "todo.mp4")
    rec = {"video": done, "status": "done", "output": "x", "seconds": 0, "error": None}
    _touch(jobs.output_dir(out, done) / jobs.RECORD_FILE, json.dumps(rec).encode())
    _touch(out / jobs.PARTIAL / "todo-1234.abc" / "depth.npz")
    assert jobs.plan(out, [done, todo]) == ([todo], [rec])
    assert not (out / jobs.PARTIAL).exists()


@pytest.mark.parametrize("args,message", [
    (["--url", "nohostport"], "is not HOST:PORT"),
    (["--url", "127.0.0.1:1", "--tasks", "depht"], "depht"),
    (["--repo", "/nonexistent-repo", "--servers-per-node", "0"], "--servers-per-node"),
    (["--repo", "/nonexistent-repo"], "/nonexistent-repo is not a directory"),
])
def test_cli_errors_before_ray_starts(tmp_path, args, message):
    _touch(tmp_path / "a.mp4")
    proc = subprocess.run([sys.executable, "-m", "thfm_serve.cli", "batch", str(tmp_path / "a.mp4"),
                           "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_cli_unreachable_fleet_fails_before_ray_starts(tmp_path):
    _touch(tmp_path / "a.mp4")
    proc = subprocess.run([sys.executable, "-m", "thfm_serve.cli", "batch", str(tmp_path / "a.mp4"), "--out",
                           str(tmp_path / "out"), "--url", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "cannot reach Triton" in proc.stderr, proc.stderr
    assert "Ray instance" not in proc.stderr and "streaming_executor" not in proc.stderr
