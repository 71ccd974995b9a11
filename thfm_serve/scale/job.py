"""One video of a batch run, start to finish, and the run manifest. No Ray here: the Ray driver
(thfm_serve.scale.ray_batch) calls process_video inside its tasks, and tests call it directly.

Commit protocol (what makes a run resumable and idempotent):
- a video's outputs are written into `<out>/.partial/<id>.<random>/`, then the folder is renamed to
  `<out>/<id>/` in one rename(2) (atomic on one filesystem);
- `<out>/<id>/` exists only complete: it holds `_thfm_record.json` (the video's manifest record),
  written before the rename. A run skips every video whose folder exists;
- when two attempts race (Ray re-runs a task whose node died after it had already finished, or two
  runs overlap), the second rename fails because the folder exists; that attempt deletes its own
  copy and reports the first one's record. So no video is written twice;
- a failed attempt leaves only its `.partial` folder, which the next run clears.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from thfm_serve.errors import ShapeError, TaskError, VideoError

from .inputs import local_copy, video_id

logger = logging.getLogger(__name__)

RECORD_FILE = "_thfm_record.json"
MANIFEST = "manifest.jsonl"
PARTIAL = ".partial"
DONE, FAILED = "done", "failed"
# Errors in the video or the request itself: another try gives the same answer, so they fail at once.
INPUT_ERRORS = (VideoError, ShapeError, TaskError)


@dataclass
class VideoJob:
    """What every task of a run needs to process one video (picklable: Ray ships it to workers)."""

    out: str
    urls: list[str]
    tasks: list[str]
    pictures: bool = False
    retries: int = 2  # extra tries of a whole video after a failure that may pass (server, network)
    retry_wait_s: float = 2.0
    timeout_s: float | None = None
    max_in_flight: int | None = None
    window_retries: int | None = None  # per-window retries inside the client (its default when None)
    overlap: int | None = None
    send: str = "video"
    max_frames: int | None = None
    log_level: int = logging.WARNING
    extra: dict = field(default_factory=dict)


def output_dir(out: str | Path, video: str) -> Path:
    return Path(out) / video_id(video)


def read_record(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def _record(video: str, status: str, output: str | None, seconds: float, error: str | None, **more) -> dict:
    rec = {"video": video, "status": status, "output": output, "seconds": round(float(seconds), 3),
           "error": error}
    rec.update(more)
    return rec


def _write_outputs(pred, folder: Path, pictures: bool) -> None:
    # The writers `thfm predict --url` uses, so the files are the same.
    from thfm_serve.client.command import write_npz

    write_npz(pred.results, folder)
    if pictures:
        from thfm_serve.visualize import write_pictures

        write_pictures(pred.results, folder / "pictures", pred.frames, pred.fps)


def _commit(tmp: Path, final: Path) -> bool:
    """Rename tmp to final; False (and tmp removed) when final already exists."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def _predict(job: VideoJob, video: str):
    from thfm_serve.client import ThfmClient
    from thfm_serve.client.core import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S
    from thfm_serve.client.resolve import expand_urls

    # Resolved per video: a DNS name in front of a fleet that grows or shrinks is read anew.
    urls = expand_urls(job.urls)
    with local_copy(video) as path, ThfmClient(
        urls, timeout_s=job.timeout_s or DEFAULT_TIMEOUT_S, max_in_flight=job.max_in_flight,
        retries=DEFAULT_RETRIES if job.window_retries is None else job.window_retries,
    ) as client:
        return client.predict(path, job.tasks, overlap=job.overlap, send=job.send, max_frames=job.max_frames)


def process_video(job: VideoJob, video: str) -> dict:
    """Run one video through the servers and commit its outputs; never raises for the video's own
    failures: the returned record says done or failed and why."""
    logging.getLogger("thfm_serve").setLevel(job.log_level)
    t0 = time.monotonic()
    final = output_dir(job.out, video)
    prev = read_record(final)
    if prev is not None:
        return {**prev, "skipped": True}
    host = socket.gethostname()
    error = None
    attempts = 0
    for attempt in range(1 + max(0, job.retries)):
        attempts = attempt + 1
        tmp = Path(job.out) / PARTIAL / f"{final.name}.{uuid.uuid4().hex[:12]}"
        try:
            pred = _predict(job, video)
            tmp.mkdir(parents=True)
            _write_outputs(pred, tmp, job.pictures)
            rec = _record(video, DONE, str(final), time.monotonic() - t0, None, attempts=attempts,
                          frames=pred.num_frames, windows=len(pred.windows), tasks=list(job.tasks), host=host)
            (tmp / RECORD_FILE).write_text(json.dumps(rec) + "\n")
            if not _commit(tmp, final):
                logger.warning("%s: finished by another attempt already; keeping that one", video)
                return {**(read_record(final) or rec), "skipped": True}
            return rec
        except INPUT_ERRORS as e:
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{type(e).__name__}: {e}"
            break
        except Exception as e:  # noqa: BLE001 - a video's failure is recorded, never lost with the task
            shutil.rmtree(tmp, ignore_errors=True)
            error = f"{type(e).__name__}: {e}"
            if attempt < job.retries:
                logger.warning("%s: attempt %d failed (%s); retrying", video, attempts, error)
                time.sleep(job.retry_wait_s * (attempt + 1))
    return _record(video, FAILED, None, time.monotonic() - t0, error, attempts=attempts, host=host)


# --- the run manifest ----------------------------------------------------------------------------


def read_manifest(out: str | Path) -> dict[str, dict]:
    """{video: its latest record} from `<out>/manifest.jsonl` (a torn last line is ignored)."""
    path = Path(out) / MANIFEST
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("video"), str):
            records[rec["video"]] = rec
    return records


class Manifest:
    """`<out>/manifest.jsonl`: records are appended (and flushed) as videos finish, so a killed run
    keeps what it did; close() rewrites it atomically with one line per video."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.records = read_manifest(self.out)
        path = self.out / MANIFEST
        torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._file = open(path, "a", encoding="utf-8")
        if torn:  # a killed run's half-written last line must not swallow the next record
            self._file.write("\n")

    def add(self, rec: dict) -> None:
        rec = {k: v for k, v in rec.items() if k != "skipped"}
        self.records[rec["video"]] = rec
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, order: Iterable[str] = ()) -> None:
        self._file.close()
        order = list(order)
        rest = [v for v in self.records if v not in set(order)]
        tmp = self.out / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            for v in order + rest:
                if v in self.records:
                    f.write(json.dumps(self.records[v]) + "\n")
        os.replace(tmp, self.out / MANIFEST)


def plan(out: str | Path, videos: list[str]) -> tuple[list[str], list[dict]]:
    """(videos to run, records of videos already done). Clears what failed attempts left behind."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    todo, done = [], []
    for v in videos:
        rec = read_record(output_dir(out, v))
        if rec is not None and rec.get("status") == DONE:
            done.append(rec)
        else:
            todo.append(v)
    return todo, done


def summary(records: Iterable[dict]) -> dict:
    records = list(records)
    return {"done": sum(r["status"] == DONE for r in records), "failed": sum(r["status"] == FAILED for r in records),
            "total": len(records)}


def as_dict(job: VideoJob) -> dict:
    return asdict(job)
