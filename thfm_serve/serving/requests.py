"""Checking a request before any work: the clip (video bytes or frames, against the limits), the
task list, and the outputs asked for. Everything a user can get wrong raises a ThfmError naming it."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ..contract import protocol
from ..contract.params import Limits
from ..contract.tasks import SPARSE_TASKS
from ..errors import ShapeError, TaskError

# Task list bounds: six tasks exist, so a longer list is a mistake or an attack. Unbounded, a 1 MB
# task name came back inside the error message and broke the client's gRPC metadata limit (16 KiB).
MAX_TASK_NAMES = 64

MAX_TASK_NAME_BYTES = 64


def read_clip(video: np.ndarray | None, frames: np.ndarray | None, limits: Limits) -> np.ndarray:
    """The request's clip as uint8 [F, H, W, 3]: decoded from `video` (BYTES [1]) or taken from `frames`.

    Exactly one of the two; the payload is checked against max_request_bytes before decoding, the
    frame count and frame size against max_frames/max_pixels (while decoding, for video: a long
    video stops decoding as soon as it passes the limit).
    """
    if (video is None) == (frames is None):
        which = "both" if video is not None else "neither"
        raise ShapeError(f"send exactly one of {protocol.INPUT_VIDEO!r} (an encoded video, BYTES [1]) or "
                         f"{protocol.INPUT_FRAMES!r} (UINT8 [F, H, W, 3]); got {which}")
    if video is not None:
        return _decode_video(video, limits)
    return _check_frames(frames, limits)


def _decode_video(video: np.ndarray, limits: Limits) -> np.ndarray:
    from ..video import decode_video_bytes

    arr = np.asarray(video)
    if arr.dtype != np.object_ or arr.size != 1:
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} must be one BYTES element (the encoded file), got "
                         f"{arr.dtype} {list(arr.shape)}")
    data = arr.reshape(-1)[0]
    if isinstance(data, str):
        data = data.encode("latin-1")
    if not isinstance(data, (bytes, bytearray)):
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} must hold bytes, got {type(data).__name__}")
    if len(data) > limits.max_request_bytes:
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} is {len(data)} bytes, above the limit "
                         f"{protocol.PARAM_MAX_REQUEST_BYTES}={limits.max_request_bytes}")
    if not data:
        raise ShapeError(f"{protocol.INPUT_VIDEO!r} is empty")
    return decode_video_bytes(bytes(data), max_frames=limits.max_frames, max_pixels=limits.max_pixels).frames


def _check_frames(frames: np.ndarray, limits: Limits) -> np.ndarray:
    from ..contract.geometry import validate_frames

    frames = validate_frames(np.asarray(frames))
    if frames.nbytes > limits.max_request_bytes:
        raise ShapeError(f"{protocol.INPUT_FRAMES!r} is {frames.nbytes} bytes, above the limit "
                         f"{protocol.PARAM_MAX_REQUEST_BYTES}={limits.max_request_bytes}; send encoded video instead")
    n, h, w = frames.shape[:3]
    if n > limits.max_frames:
        raise ShapeError(f"{protocol.INPUT_FRAMES!r} has {n} frames, above the limit "
                         f"{protocol.PARAM_MAX_FRAMES}={limits.max_frames}")
    if h * w > limits.max_pixels:
        raise ShapeError(f"{protocol.INPUT_FRAMES!r} frame size {w}x{h} = {h * w} pixels is above the limit "
                         f"{protocol.PARAM_MAX_PIXELS}={limits.max_pixels}")
    return frames


def read_tasks(tasks: np.ndarray | None, available: Sequence[str]) -> list[str]:
    """BYTES [N] task names -> ordered, de-duplicated task list (TaskError on an unknown one).

    At most MAX_TASK_NAMES names of at most MAX_TASK_NAME_BYTES bytes each: error messages quote a
    bad name, and they travel back as gRPC metadata, which clients cap at 16 KiB.
    """
    from ..contract.tasks import parse_tasks

    if tasks is None:
        raise TaskError(f"missing input {protocol.INPUT_TASKS!r}: name the tasks, from {', '.join(available)}")
    items = np.asarray(tasks, dtype=np.object_).reshape(-1)
    if items.size > MAX_TASK_NAMES:
        raise TaskError(f"{protocol.INPUT_TASKS!r} has {items.size} task names, above the limit of "
                        f"{MAX_TASK_NAMES}; choose from {', '.join(available)} (or 'all')")
    names = []
    for item in items:
        raw = bytes(item) if isinstance(item, (bytes, bytearray)) else str(item).encode("utf-8", "replace")
        if len(raw) > MAX_TASK_NAME_BYTES:
            raise TaskError(f"task name of {len(raw)} bytes ({raw[:24]!r}...) is longer than "
                            f"{MAX_TASK_NAME_BYTES} bytes; choose from {', '.join(available)}")
        try:
            names.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise TaskError(f"task name {raw[:40]!r} is not UTF-8") from None
    return parse_tasks(names, list(available))


def check_requested_outputs(wanted: Iterable[str] | None, tasks: Sequence[str], all_outputs: Iterable[str]) -> None:
    """TaskError when a request names outputs its tasks do not produce.

    Triton hands a model every output when the client names none, so "all of them" means no choice
    was made; an explicit list must be covered by the tasks (Triton itself rejects unknown names).
    """
    if wanted is None:
        return
    wanted, all_outputs = set(wanted), set(all_outputs)
    if not wanted or (all_outputs and wanted >= all_outputs):
        return
    produced = {protocol.OUTPUT_FOR_TASK[t] for t in tasks}
    if any(t in SPARSE_TASKS for t in tasks):
        produced.add(protocol.OUTPUT_JOINT_NAMES)
    missing = sorted(wanted - produced)
    if missing:
        raise TaskError(f"outputs {missing} were requested but the request's tasks ({', '.join(tasks)}) do not "
                        f"produce them: add their tasks to {protocol.INPUT_TASKS!r}")

