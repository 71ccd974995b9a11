"""What goes on the wire: request payloads, the entry model's parameters, and message-size budgets.

Requests follow thfm_serve.protocol: exactly one of INPUT_VIDEO (an encoded file, BYTES [1]) or
INPUT_FRAMES (UINT8 [F, H, W, 3]) plus INPUT_TASKS (BYTES [N]).

A window sent as video is encoded losslessly, so that the server decodes exactly the frames the
client decoded and the served result equals the in-process one on the same frames. Measured on
33 frames of juggle_720p.mp4 (raw 91 MB): libx264rgb at crf 0 (RGB 4:4:4, lossless) is 11% of raw
and decodes back bit-exact; ffv1 (bgr0) is 36% of raw; lossy libx264 at crf 18 is <1% but differs
by up to 44 levels per pixel. Hence libx264rgb crf 0 in mp4, which also takes odd frame sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from thfm_serve import protocol
from thfm_serve.config import DENSE_TASKS, SPARSE_TASKS, TASKS
from thfm_serve.errors import ServerError, ShapeError

# Lossless window encoding (see the module docstring for the measurements).
WINDOW_CODEC = "libx264rgb"
WINDOW_CRF = 0  # crf 0 with x264 = qp 0 = lossless
WINDOW_PIX_FMT = "rgb24"

SEND_MODES = ("video", "frames")

# gRPC's hard ceiling for one message (a signed 32-bit length).
GRPC_MAX_MESSAGE = 2**31 - 1
# Headroom over the tensor bytes for protobuf framing, tensor names and the task list.
_MESSAGE_SLACK = 1 << 20
# Floor for a channel's limits: config and error replies are small, and an oddly small limit
# helps nobody. gRPC's own default receive limit is 4 MiB.
_MIN_MESSAGE = 4 << 20
# Joint count assumed when sizing responses before the first reply tells the real one (SMPL has 24);
# keypoints are tiny next to dense maps, so a generous guess costs nothing.
_JOINTS_BUDGET = 256


@dataclass(frozen=True)
class ServerInfo:
    """The entry model's config parameters (protocol.PARAM_*) and the tasks it serves."""

    url: str
    model: str
    window_frames: int
    height: int
    width: int
    max_frames: int | None
    max_pixels: int | None
    max_request_bytes: int | None
    tasks: tuple[str, ...] = field(default=TASKS)
    max_response_bytes: int | None = None

    def same_model(self, other: "ServerInfo") -> list[str]:
        """The fields on which two servers disagree (they must serve the same export)."""
        keys = ("window_frames", "height", "width", "tasks")
        return [f"{k}: {getattr(self, k)} ({self.url}) vs {getattr(other, k)} ({other.url})"
                for k in keys if getattr(self, k) != getattr(other, k)]


def parse_model_config(url: str, model: str, config: dict) -> ServerInfo:
    """ServerInfo from get_model_config(as_json=True); ServerError when a needed parameter is absent."""
    cfg = config.get("config", config)
    params = cfg.get("parameters") or {}

    def param(name: str, required: bool) -> int | None:
        raw = (params.get(name) or {}).get("string_value")
        if raw is None or str(raw).strip() == "":
            if required:
                raise ServerError(
                    f"{url}: model {model!r} has no {name!r} parameter in its config; is this a THFM "
                    "model repository (written by `thfm export`)?"
                )
            return None
        try:
            value = int(str(raw).strip())
        except ValueError:
            raise ServerError(f"{url}: model {model!r} parameter {name!r} is {raw!r}, not an integer") from None
        return value if value > 0 else None

    outputs = {o.get("name") for o in cfg.get("output", [])}
    served = tuple(t for t in TASKS if protocol.OUTPUT_FOR_TASK[t] in outputs) or TASKS
    window = param(protocol.PARAM_WINDOW_FRAMES, True)
    return ServerInfo(
        url=url,
        model=model,
        window_frames=window,
        height=param(protocol.PARAM_HEIGHT, True),
        width=param(protocol.PARAM_WIDTH, True),
        max_frames=param(protocol.PARAM_MAX_FRAMES, False),
        max_pixels=param(protocol.PARAM_MAX_PIXELS, False),
        max_request_bytes=param(protocol.PARAM_MAX_REQUEST_BYTES, False),
        tasks=served,
        max_response_bytes=param(protocol.PARAM_MAX_RESPONSE_BYTES, False),
    )


@dataclass
class Payload:
    """One request's inputs: exactly one of video / frames, and the tasks."""

    tasks: tuple[str, ...]
    video: bytes | None = None
    frames: np.ndarray | None = None
    output_size: str = protocol.OUTPUT_SIZE_INPUT  # protocol.INPUT_OUTPUT_SIZE

    def __post_init__(self):
        if (self.video is None) == (self.frames is None):
            raise ValueError("a payload carries exactly one of video bytes or frames")
        if self.output_size not in protocol.OUTPUT_SIZES:
            raise ValueError(f"output_size must be one of {protocol.OUTPUT_SIZES}, got {self.output_size!r}")

    @property
    def nbytes(self) -> int:
        body = len(self.video) if self.video is not None else int(self.frames.nbytes)
        return body + sum(len(t) + 4 for t in self.tasks)

    def describe(self) -> str:
        if self.video is not None:
            return f"video {len(self.video)} bytes"
        return f"frames {list(self.frames.shape)}"


def encode_window(frames: np.ndarray, fps: float = 24.0) -> bytes:
    """Frames [F, H, W, 3] -> a lossless mp4 (decodes back to exactly these frames)."""
    from thfm_serve.video import encode_video

    fps = fps if fps and np.isfinite(fps) and fps > 0 else 24.0
    return encode_video(np.ascontiguousarray(frames), None, fps, WINDOW_CODEC, WINDOW_CRF, pix_fmt=WINDOW_PIX_FMT)


def output_elements(task: str, height: int, width: int, joints: int = _JOINTS_BUDGET) -> int:
    """float32 elements per frame in a task's output (processing.OUTPUT_KEYS layouts)."""
    if task in ("depth", "segmentation"):
        return height * width
    if task in ("normals", "densepose"):
        return height * width * 3
    if task == "keypoints2d":
        return joints * 2
    if task == "keypoints3d":
        return joints * 3
    raise ValueError(f"unknown task {task!r}")


def response_bytes(tasks, frames: int, height: int, width: int) -> int:
    """Upper bound of one response's size: every task's float32 output plus the joint names."""
    body = sum(4 * frames * output_elements(t, height, width) for t in tasks)
    if any(t in SPARSE_TASKS for t in tasks):
        body += _JOINTS_BUDGET * 64
    return body


def message_limit(nbytes: int) -> int:
    """A channel limit that fits a message of nbytes (with framing slack); ServerError past gRPC's cap."""
    need = int(nbytes) + max(_MESSAGE_SLACK, int(nbytes) // 64)
    return max(_MIN_MESSAGE, min(need, GRPC_MAX_MESSAGE))


def check_fits(nbytes: int, what: str) -> None:
    if int(nbytes) + _MESSAGE_SLACK > GRPC_MAX_MESSAGE:
        raise ShapeError(
            f"{what} would be {nbytes / 2**30:.2f} GiB, above gRPC's 2 GiB message limit"
        )


def group_tasks(tasks, frames: int, height: int, width: int,
                max_response_bytes: int | None = None) -> list[tuple[str, ...]]:
    """Split the tasks over several requests per window when one response would pass gRPC's 2 GiB
    limit (dense maps at the input resolution: normals of 81 frames of 1080p are 2.0 GB) or the
    server's max_response_bytes.

    Greedy in task order; dense tasks are the big ones. Each group costs one more encoder+core pass
    on the server, so one group is used whenever it fits.
    """
    budget = GRPC_MAX_MESSAGE - 2 * _MESSAGE_SLACK
    if max_response_bytes:
        budget = min(budget, int(max_response_bytes))
    groups: list[list[str]] = []
    size = 0
    for t in tasks:
        one = response_bytes([t], frames, height, width)
        if one > budget:
            limit = (f"the server's max_response_bytes={max_response_bytes}" if budget == max_response_bytes
                     else "gRPC's 2 GiB message limit")
            raise ShapeError(
                f"the {t} result for one window ({frames} frames of {width}x{height}) would be "
                f"{one / 2**30:.2f} GiB, above {limit}; ask for the outputs at the model grid "
                f"(output_size={protocol.OUTPUT_SIZE_MODEL!r}, `--output-size model`) or downscale the video"
            )
        if groups and size + one <= budget:
            groups[-1].append(t)
            size += one
        else:
            groups.append([t])
            size = one
    return [tuple(g) for g in groups]


def tasks_tensor(tasks) -> np.ndarray:
    return np.array([t.encode() for t in tasks], dtype=np.object_)


def decode_names(arr) -> list[str]:
    """BYTES tensor -> list of str."""
    out = []
    for v in np.asarray(arr).reshape(-1):
        out.append(v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else str(v))
    return out


def check_output(task: str, arr: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
    """The task's array as the protocol promises it (float32, [frames, ...layout]); ServerError if not."""
    arr = np.asarray(arr)
    if task in DENSE_TASKS:
        trailing = (height, width) if task in ("depth", "segmentation") else (height, width, 3)
    else:
        trailing = None  # [K, 2|3]; K is checked against joint_names by the caller
    ok = arr.ndim >= 1 and arr.shape[0] == frames
    if trailing is not None:
        ok = ok and arr.shape[1:] == trailing
    else:
        ok = ok and arr.ndim == 3 and arr.shape[2] == (2 if task == "keypoints2d" else 3)
    if not ok:
        want = [frames, *trailing] if trailing else [frames, "K", 2 if task == "keypoints2d" else 3]
        raise ServerError(f"the server returned {task} with shape {list(arr.shape)}, expected {want}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr

