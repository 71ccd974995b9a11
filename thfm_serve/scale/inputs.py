"""Which videos a batch run covers, where each one's outputs go, and how a worker reads one.

Inputs (`thfm batch INPUT...`), each one of:
- a video file: a local path or an fsspec URL (s3://, gs://, memory://, file://, ...);
- a directory: every video in it and below it (by extension);
- a glob: `clips/*.mp4`, `s3://bucket/corpus/**/*.mov`;
- a manifest file: `.txt` / `.lst` (one video per line, `#` comments), `.jsonl` (objects with a
  "video" key: a previous run's manifest.jsonl works) or `.csv` (a "video" column). Relative entries
  are taken relative to the manifest's own folder.

Every video gets a stable id, `<stem>-<8 hex of sha1(uri)>`, which names its output folder: two
clips called `a.mp4` in different folders do not collide, and a re-run finds the same folder.
"""

from __future__ import annotations

import contextlib
import csv
import glob as globlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from thfm_serve.errors import ThfmError

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
MANIFEST_EXTENSIONS = (".txt", ".lst", ".jsonl", ".csv")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB_CHARS = set("*?[")


def is_url(s: str) -> bool:
    """An fsspec URL other than file:// (those are local paths)."""
    return bool(_SCHEME.match(s)) and not s.startswith("file://")


def _local(s: str) -> str:
    return s[len("file://"):] if s.startswith("file://") else s


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS)


def _is_manifest(name: str) -> bool:
    return name.lower().endswith(MANIFEST_EXTENSIONS)


def _fs(url: str):
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec comes with the scale extra
        raise ThfmError(f"{url}: reading URLs needs fsspec (pip install 'thfm-serve[scale]')") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise ThfmError(f"{url}: no fsspec filesystem for this URL ({e})") from None


def _with_protocol(fs, path: str, like: str) -> str:
    """fsspec globs and listings drop the protocol; put it back so a worker can open the path."""
    if _SCHEME.match(path):
        return path
    return fs.unstrip_protocol(path) if is_url(like) else path


def canonical_url(url: str) -> str:
    """fsspec's own spelling of a URL (memory://x/a -> memory:///x/a), so that a video named directly
    and found through its folder or a glob is one video with one output folder."""
    fs, path = _fs(url)
    return fs.unstrip_protocol(path)


def _manifest_entries(text: str, name: str) -> list[str]:
    lower = name.lower()
    if lower.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ThfmError(f"{name}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("video"), str):
                raise ThfmError(f"{name}:{n}: expected an object with a \"video\" string")
            out.append(obj["video"])
        return out
    if lower.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "video" not in reader.fieldnames:
            raise ThfmError(f"{name}: a CSV manifest needs a 'video' column (columns: {reader.fieldnames})")
        return [row["video"].strip() for row in reader if (row.get("video") or "").strip()]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _relative_to(entry: str, manifest: str) -> str:
    if is_url(entry) or os.path.isabs(_local(entry)):
        return entry
    if is_url(manifest):
        return str(PurePosixPath(manifest).parent / entry).replace(":/", "://", 1)
    return os.path.join(os.path.dirname(os.path.abspath(_local(manifest))), entry)


def _expand_one(item: str) -> list[str]:
    if is_url(item):
        fs, path = _fs(item)
        if _GLOB_CHARS & set(path):
            found = sorted(fs.glob(path))
            return [_with_protocol(fs, p, item) for p in found if _is_video(p) or _is_manifest(p)]
        if fs.isdir(path):
            return [_with_protocol(fs, p, item) for p in sorted(fs.find(path)) if _is_video(p)]
        if not fs.exists(path):
            raise ThfmError(f"input {item} does not exist")
        return [fs.unstrip_protocol(path)]
    path = _local(item)
    if _GLOB_CHARS & set(path):
        found = sorted(globlib.glob(path, recursive=True))
        return [os.path.abspath(p) for p in found if os.path.isfile(p) and (_is_video(p) or _is_manifest(p))]
    if os.path.isdir(path):
        out = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            out.extend(os.path.join(root, f) for f in sorted(files) if _is_video(f))
        return [os.path.abspath(p) for p in out]
    if not os.path.exists(path):
        raise ThfmError(f"input {item} does not exist")
    return [os.path.abspath(path)]


def read_text(uri: str) -> str:
    if is_url(uri):
        fs, path = _fs(uri)
        with fs.open(path, "rb") as f:
            return f.read().decode("utf-8")
    return Path(_local(uri)).read_text(encoding="utf-8")


def list_videos(inputs: Sequence[str]) -> list[str]:
    """Every video named by the inputs (files, directories, globs, manifests), in order, once each.

    ThfmError when an input does not exist or nothing at all is found."""
    if not inputs:
        raise ThfmError("no input given (video files, directories, globs or manifest files)")
    out: list[str] = []
    seen: set[str] = set()

    def add(v: str) -> None:
        if v not in seen:
            seen.add(v)
            out.append(v)

    for item in inputs:
        found = _expand_one(str(item))
        if not found:
            raise ThfmError(f"input {item} matches no video ({', '.join(VIDEO_EXTENSIONS)}) or manifest")
        for f in found:
            if _is_manifest(f) and not _is_video(f):
                for entry in _manifest_entries(read_text(f), f):
                    entry = _relative_to(entry, f)
                    add(canonical_url(entry) if is_url(entry) else os.path.abspath(_local(entry)))
            else:
                add(f)
    if not out:
        raise ThfmError(f"no videos found in {', '.join(map(str, inputs))}")
    return out


def video_id(uri: str) -> str:
    """`<stem>-<8 hex>`: readable, stable across runs, distinct for distinct URIs."""
    stem = PurePosixPath(uri.rstrip("/")).stem or "video"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80]
    return f"{stem}-{hashlib.sha1(uri.encode('utf-8')).hexdigest()[:8]}"


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local file for the video: the path itself, or a temporary copy of an fsspec URL (the
    decoder and the client's single-window shortcut both want a seekable file)."""
    if not is_url(uri):
        yield Path(_local(uri))
        return
    fs, path = _fs(uri)
    tmpdir = tempfile.mkdtemp(prefix="thfm-batch-")
    try:
        dest = Path(tmpdir) / PurePosixPath(path).name
        with fs.open(path, "rb") as src, open(dest, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        yield dest
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
