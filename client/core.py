"""What the sync and asyncio clients share: turning a clip into requests and answers into results.

A `Run` holds one clip on its way through the servers: the window plan, the task groups, the
payload of each request (made lazily, once per window, kept only while a request of that window is
outstanding) and the stitchers that put the answers together. It does no I/O; the drivers in
sync.py and aio.py decide when payloads are made and where they go.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from thfm_serve.contract import protocol
from thfm_serve.contract.geometry import validate_frames
from thfm_serve.contract.tasks import SPARSE_TASKS, parse_tasks, task_result
from thfm_serve.errors import ServerError, ShapeError, ThfmError

from . import wire
from thfm_serve.contract.windows import ClipWindow, Stitcher, check_overlap, default_overlap, plan_windows, stitched

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0  # one window on a CPU server with a real checkpoint takes minutes
DEFAULT_RETRIES = 3
PER_SERVER_IN_FLIGHT = 2  # one request computing and one queued per server keeps each server busy


@dataclass
class Clip:
    """Frames to run, with what the client knows about where they came from."""

    frames: np.ndarray  # uint8 [F, H, W, 3], displayed orientation
    fps: float = 24.0
    source: str = "<frames>"
    path: Path | None = None  # the file, when the frames were decoded from one


@dataclass
class Prediction:
    """A finished run. results is {task: {key: array}}, the layout of `<task>.npz` (and of
    ThfmPipeline.run), at the clip's frames and resolution."""

    results: dict[str, dict[str, np.ndarray]]
    num_frames: int
    windows: list[ClipWindow]
    requests_per_server: dict[str, int]
    retries: int
    sent_bytes: int
    seconds: float = 0.0
    frames: np.ndarray | None = field(default=None, repr=False)
    fps: float = 24.0


def load_clip(video, max_frames: int | None = None, max_pixels: int | None = None) -> Clip:
    """A path (decoded like the in-process path), a thfm_serve.video.Video, or frames [F, H, W, 3]."""
    from thfm_serve.video import Video, read_video

    if isinstance(video, Clip):
        return video
    if isinstance(video, Video):
        return Clip(validate_frames(video.frames), video.fps, video.source,
                    Path(video.source) if video.source != "<bytes>" else None)
    if isinstance(video, np.ndarray):
        frames = validate_frames(video)
        if max_pixels and frames.shape[1] * frames.shape[2] > max_pixels:
            raise ShapeError(f"frame size {frames.shape[2]}x{frames.shape[1]} is above the server's limit "
                             f"max_pixels={max_pixels}")
        return Clip(frames)
    if isinstance(video, (str, os.PathLike)):
        v = read_video(video, max_frames=max_frames, max_pixels=max_pixels)
        logger.info("decoded %s: %d frames %dx%d at %.2f fps", video, v.frames.shape[0], v.frames.shape[2],
                    v.frames.shape[1], v.fps)
        return Clip(v.frames, v.fps, os.fspath(video), Path(video))
    raise TypeError(f"video must be a path, a Video or a uint8 frame array, got {type(video).__name__}")


def resolve_tasks(tasks, info: wire.ServerInfo) -> list[str]:
    """Task names checked against what the server serves (TaskError names both)."""
    return parse_tasks(tasks, list(info.tasks))


def check_infos(infos: list[wire.ServerInfo]) -> wire.ServerInfo:
    """Every server must serve the same export, or the stitched windows would not fit together."""
    first = infos[0]
    for other in infos[1:]:
        diff = first.same_model(other)
        if diff:
            raise ServerError("the servers serve different models: " + "; ".join(diff))
    return first


class Run:
    """One clip's requests and results (see the module docstring). Keys are (window, group)."""

    def __init__(self, clip: Clip, tasks: list[str], info: wire.ServerInfo, overlap: int | None = None,
                 send: str = "video", output_size: str = protocol.OUTPUT_SIZE_INPUT):
        if send not in wire.SEND_MODES:
            raise ThfmError(f"send must be one of {wire.SEND_MODES}, got {send!r}")
        if output_size not in protocol.OUTPUT_SIZES:
            raise ThfmError(f"output_size must be one of {protocol.OUTPUT_SIZES}, got {output_size!r}")
        self.clip = clip
        self.tasks = list(tasks)
        self.info = info
        self.send = send
        self.output_size = output_size
        n, h, w = clip.frames.shape[:3]
        self.num_frames, self.height, self.width = n, h, w
        # Dense maps come back at the input's size or, asked for, at the model grid.
        self.out_height, self.out_width = (h, w) if output_size == protocol.OUTPUT_SIZE_INPUT else (info.height, info.width)
        window = info.window_frames
        # The server's overlap unless told otherwise: the same plan the server and the in-process
        # pipeline use, so the stitched result equals theirs.
        chosen = info.overlap if overlap is None else overlap
        self.overlap = check_overlap(window, default_overlap(window) if chosen is None else chosen)
        self.plan = plan_windows(n, window, self.overlap)
        longest = max(win.frames for win in self.plan)
        if info.max_frames and longest > info.max_frames:
            raise ShapeError(f"a window of {longest} frames is above the server's max_frames={info.max_frames}")
        if info.max_pixels and h * w > info.max_pixels:
            raise ShapeError(f"{clip.source}: frame size {w}x{h} = {h * w} pixels is above the server's "
                             f"limit max_pixels={info.max_pixels}")
        self.groups = wire.group_tasks(self.tasks, longest, self.out_height, self.out_width, info.max_response_bytes)
        if len(self.groups) > 1:
            logger.info("results too large for one gRPC message per window: tasks go in %d requests per "
                        "window (%s)", len(self.groups), " | ".join(",".join(g) for g in self.groups))
        self.keys = [(win.index, g) for win in self.plan for g in range(len(self.groups))]
        # The source file itself is the smallest lossless payload when it is the only window.
        self._source_bytes = None
        if send == "video" and len(self.plan) == 1 and clip.path is not None and self.plan[0].frames == n:
            size = clip.path.stat().st_size
            if not info.max_request_bytes or size <= info.max_request_bytes:
                self._source_bytes = size
        raw = longest * h * w * 3
        if send == "frames":
            self.request_bound = raw + 4096
            if info.max_request_bytes and self.request_bound > info.max_request_bytes:
                raise ShapeError(
                    f"a window of {longest} raw frames of {w}x{h} is {raw} bytes, above the server's "
                    f"max_request_bytes={info.max_request_bytes}; send encoded video instead (--send video)"
                )
            wire.check_fits(self.request_bound, f"one request of {longest} raw frames of {w}x{h}")
        else:
            # Lossless H.264 of pure noise can come out slightly above raw; real footage is ~10%. The
            # encoded size is checked again per request (payload), and the channel grows if needed.
            self.request_bound = max(raw + raw // 8, self._source_bytes or 0) + 4096
        self.response_bound = max(wire.response_bytes(g, longest, self.out_height, self.out_width) for g in self.groups)
        self.stitchers = {t: Stitcher(self.plan, n) for t in self.tasks}
        self.joint_names: list[str] | None = None
        self.sent_bytes = 0
        self._payloads: dict[int, wire.Payload] = {}
        self._open = {win.index: len(self.groups) for win in self.plan}
        self._lock = threading.Lock()

    # -- requests

    def describe(self, key) -> str:
        win = self.plan[key[0]]
        part = f", tasks {','.join(self.groups[key[1]])}" if len(self.groups) > 1 else ""
        return f"window {win.index + 1}/{len(self.plan)} (frames {win.start}-{win.stop - 1}{part})"

    def payload(self, key) -> wire.Payload:
        """The request for a key. Encoding is CPU work: the drivers call this off the event loop /
        in worker threads. The window's encoded bytes are shared by its task groups and retries."""
        index, group = key
        with self._lock:
            body = self._payloads.get(index)
        if body is None:
            body = self._make_body(self.plan[index])
            with self._lock:
                self._payloads.setdefault(index, body)
        tasks = self.groups[group]
        p = wire.Payload(tuple(tasks), video=body.video, frames=body.frames, output_size=self.output_size)
        wire.check_fits(p.nbytes, f"{self.describe(key)}: the request")
        if self.info.max_request_bytes and p.nbytes > self.info.max_request_bytes:
            raise ShapeError(
                f"{self.describe(key)}: the request is {p.nbytes} bytes ({p.describe()}), above the "
                f"server's max_request_bytes={self.info.max_request_bytes}"
            )
        with self._lock:
            self.sent_bytes += p.nbytes
        return p

    def _make_body(self, win: ClipWindow) -> wire.Payload:
        frames = self.clip.frames[win.start:win.stop]
        if self.send == "frames":
            return wire.Payload((), frames=np.ascontiguousarray(frames))
        if self._source_bytes is not None:
            return wire.Payload((), video=self.clip.path.read_bytes())
        return wire.Payload((), video=wire.encode_window(frames, self.clip.fps))

    # -- answers

    def accept(self, key, outputs: dict[str, np.ndarray], names: list[str] | None) -> None:
        """Stitch one answer in (called from one thread: the driver's)."""
        index, group = key
        win = self.plan[index]
        for t in self.groups[group]:
            arr = wire.check_output(t, outputs[t], win.frames, self.out_height, self.out_width)
            if t in SPARSE_TASKS:
                if names is None or len(names) != arr.shape[1]:
                    raise ServerError(f"{t}: {arr.shape[1]} joints but joint_names lists {len(names or [])}")
                if self.joint_names is None:
                    self.joint_names = names
                elif names != self.joint_names:
                    raise ServerError("the servers disagree on joint_names; they must serve the same export")
            self.stitchers[t].add(win, arr, t)
        with self._lock:
            self._open[index] -= 1
            if self._open[index] == 0:
                self._payloads.pop(index, None)  # every group of this window is done: free its bytes

    def results(self) -> dict[str, dict[str, np.ndarray]]:
        return {t: task_result(t, stitched(t, self.stitchers[t]), self.joint_names if t in SPARSE_TASKS else None)
                for t in self.tasks}


class Progress:
    """Windows done out of all, as a tqdm bar on stderr (off when stderr is not a terminal), or a
    callback(done, total)."""

    def __init__(self, progress, total: int, desc: str = "windows"):
        self.total, self.done = total, 0
        self._bar = None
        self._callback = None
        if callable(progress):
            self._callback = progress
        elif progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="req", desc=desc, file=sys.stderr, leave=False,
                             disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def step(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        if self._callback is not None:
            self._callback(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def single_request_limits(payload: wire.Payload, info: wire.ServerInfo) -> tuple[int, int]:
    """(send, receive) message sizes for one request sent as is (ThfmClient.infer)."""
    if payload.frames is not None:
        n, h, w = payload.frames.shape[:3]
    else:
        from thfm_serve.video import probe_video

        meta = probe_video(payload.video)  # VideoError for bytes that are no video, before sending
        h, w = meta["height"], meta["width"]
        n = meta["frames"] or info.max_frames or info.window_frames
    return payload.nbytes, wire.response_bytes(payload.tasks, n, h, w)


def default_in_flight(urls: list[str]) -> int:
    return PER_SERVER_IN_FLIGHT * len(urls)
