"""How big a response will be, decided from the request before any model work.

Outputs come back float32 at the input's frames and, by default, the input's resolution, so a small
encoded video can ask for a very large answer: 600 frames of 640x360 as normals are 1.66 GB, and one
81-frame window of 1080p depth is over 0.6 GB. No request limit on frames, pixels or bytes bounds
that, so the response gets its own limit, `max_response_bytes`, checked against the exact size
computed here (frames x output pixels x channels x 4 bytes per task, plus the keypoints).

A request can ask for its dense outputs at the model grid instead of the input size (input
OUTPUT_SIZE = "model"): a 1080p clip through a 480x832 grid then answers about 5x smaller, and the
maps are what the model actually resolved (the input-size ones are those, resized).

Numpy only: this runs in the entry and preprocess models and in the client, none of which need torch.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .contract.params import DEFAULT_MAX_RESPONSE_BYTES, MAX_RESPONSE_CEILING  # noqa: F401 (their home is the limits)
from .contract.protocol import INPUT_OUTPUT_SIZE, OUTPUT_SIZE_INPUT, OUTPUT_SIZE_MODEL, OUTPUT_SIZES
from .contract.tasks import DENSE_TASKS, SPARSE_TASKS
from .errors import ShapeError

# Channels per pixel of each dense output (contract.tasks.OUTPUT_KEYS layouts) and coordinates per
# joint of each sparse one.
DENSE_CHANNELS = {"depth": 1, "normals": 3, "segmentation": 1, "densepose": 3}
SPARSE_COORDS = {"keypoints2d": 2, "keypoints3d": 3}
# joint_names travels as BYTES: 4 bytes of length plus the name; 64 bytes a name is generous.
_JOINT_NAME_BYTES = 64
_FLOAT_BYTES = np.dtype(np.float32).itemsize  # every output is float32


def task_bytes(task: str, frames: int, height: int, width: int, joints: int) -> int:
    """Bytes of one task's float32 output for `frames` frames (dense maps at height x width)."""
    if task in DENSE_CHANNELS:
        return _FLOAT_BYTES * int(frames) * int(height) * int(width) * DENSE_CHANNELS[task]
    if task in SPARSE_COORDS:
        return _FLOAT_BYTES * int(frames) * int(joints) * SPARSE_COORDS[task]
    raise ShapeError(f"unknown task {task!r}")


def response_bytes(tasks: Iterable[str], frames: int, height: int, width: int, joints: int) -> int:
    """The size of a response: every task's output plus the joint names when a keypoint task is in it."""
    tasks = list(tasks)
    total = sum(task_bytes(t, frames, height, width, joints) for t in tasks)
    if any(t in SPARSE_TASKS for t in tasks):
        total += int(joints) * _JOINT_NAME_BYTES
    return total


def read_output_size(value: np.ndarray | None) -> str:
    """The OUTPUT_SIZE input (BYTES [1], or absent) -> one of OUTPUT_SIZES."""
    if value is None:
        return OUTPUT_SIZE_INPUT
    items = np.asarray(value, dtype=np.object_).reshape(-1)
    if items.size != 1:
        raise ShapeError(f"{INPUT_OUTPUT_SIZE!r} must be one BYTES element, one of {', '.join(OUTPUT_SIZES)}; "
                         f"got {items.size} elements")
    raw = items[0]
    text = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    if text not in OUTPUT_SIZES:
        raise ShapeError(f"{INPUT_OUTPUT_SIZE!r} is {text[:40]!r}; choose {' or '.join(repr(s) for s in OUTPUT_SIZES)}")
    return text


def output_resolution(output_size: str, input_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the dense outputs for an OUTPUT_SIZES choice."""
    if output_size == OUTPUT_SIZE_INPUT:
        return int(input_hw[0]), int(input_hw[1])
    if output_size == OUTPUT_SIZE_MODEL:
        return int(grid_hw[0]), int(grid_hw[1])
    raise ShapeError(f"output size {output_size!r}; choose one of {', '.join(OUTPUT_SIZES)}")


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 1 << 20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"


def check_response(tasks: Sequence[str], frames: int, output_hw: tuple[int, int], joints: int,
                   max_response_bytes: int, *, grid_hw: tuple[int, int] | None = None,
                   window: int | None = None, fixed_tasks: str | None = None) -> int:
    """The response's size in bytes; ShapeError, saying how big it would be and what to change, when it
    is above max_response_bytes.

    grid_hw and window only feed the advice: the size the answer would have at the model grid, and
    the frames per request a client would have to cut the clip into. fixed_tasks names the model to
    use instead when the caller's tasks are not the client's choice (an ensemble computes all of its own).
    """
    height, width = output_hw
    total = response_bytes(tasks, frames, height, width, joints)
    if total <= max_response_bytes:
        return total
    per_task = ", ".join(f"{t} {_size(task_bytes(t, frames, height, width, joints))}" for t in tasks)
    advice = []
    per_frame = response_bytes(tasks, 1, height, width, joints)
    fit = max_response_bytes // per_frame if per_frame else 0
    if fit >= 1:
        cut = f"at most {fit} frames per request"
        if window:
            cut += f" (the client cuts clips into windows of {window})"
        advice.append(cut)
    if grid_hw is not None and any(t in DENSE_TASKS for t in tasks):
        at_grid = response_bytes(tasks, frames, grid_hw[0], grid_hw[1], joints)
        if at_grid < total:  # the model grid is smaller than the input
            advice.append(f"{INPUT_OUTPUT_SIZE}={OUTPUT_SIZE_MODEL!r} ({grid_hw[1]}x{grid_hw[0]}: {_size(at_grid)})")
    if fixed_tasks:
        advice.append(f"the tasks you need from the {fixed_tasks!r} model (which also takes {INPUT_OUTPUT_SIZE})")
    elif len(tasks) > 1:
        advice.append("fewer tasks per request")
    raise ShapeError(
        f"the response would be {total} bytes ({_size(total)}: {frames} frames at {width}x{height}; {per_task}), "
        f"above the limit max_response_bytes={max_response_bytes} ({_size(max_response_bytes)}); "
        f"ask for {', or '.join(advice) if advice else 'a smaller clip'}")


def check_declared_video(video: np.ndarray | None, tasks: Sequence[str], output_size: str, grid_hw: tuple[int, int],
                         joints: int, limits, window: int | None = None) -> None:
    """The response check from the video's headers, before anything is decoded: a container that
    declares its frame count (mp4, mov) is refused at once when its answer would be too big. Videos
    that do not declare it, or whose headers break another limit (decoding reports those), are
    checked after decoding, still before any model work.
    """
    if video is None:
        return
    arr = np.asarray(video)
    data = arr.reshape(-1)[0] if arr.dtype == np.object_ and arr.size == 1 else None
    if not isinstance(data, (bytes, bytearray)) or not data or len(data) > limits.max_request_bytes:
        return  # read_clip names those problems
    from .video import declared_geometry

    geometry = declared_geometry(bytes(data))
    if geometry is None or geometry[0] is None:
        return
    frames, height, width = geometry
    if frames > limits.max_frames or height * width > limits.max_pixels:
        return
    check_response(tasks, frames, output_resolution(output_size, (height, width), grid_hw), joints,
                   limits.max_response_bytes, grid_hw=grid_hw, window=window)
