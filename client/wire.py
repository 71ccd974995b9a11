"""What goes on the wire: request payloads, the entry model's parameters, and message-size budgets.

Requests follow thfm_serve.contract.protocol: exactly one of INPUT_VIDEO (an encoded file, BYTES [1]) or
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

from thfm_serve.contract import protocol
from thfm_serve.contract.params import GRPC_MAX_MESSAGE, MESSAGE_SLACK, model_parameters, read_params
from thfm_serve.contract.tasks import SPARSE_TASKS, TASKS, frame_shape
from thfm_serve.errors import ServerError, ShapeError, ThfmError

# Lossless window encoding (see the module docstring for the measurements).
WINDOW_CODEC = "libx264rgb"
WINDOW_CRF = 0  # crf 0 with x264 = qp 0 = lossless
WINDOW_PIX_FMT = "rgb24"

SEND_MODES = ("video", "frames")

# gRPC's ceiling for one message and the headroom over the tensor bytes (framing, names, task list).
GRPC_MAX_MESSAGE, _MESSAGE_SLACK = GRPC_MAX_MESSAGE, MESSAGE_SLACK
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
    overlap: int | None = None  # frames neighbouring windows share (None: the policy's default)
    max_response_bytes: int | None = None

    def same_model(self, other: "ServerInfo") -> list[str]:
        """The fields on which two servers disagree (they must serve the same export)."""
        keys = ("window_frames", "height", "width", "overlap", "tasks")
        return [f"{k}: {getattr(self, k)} ({self.url}) vs {getattr(other, k)} ({other.url})"
                for k in keys if getattr(self, k) != getattr(other, k)]


def parse_model_config(url: str, model: str, config: dict) -> ServerInfo:
    """ServerInfo from get_model_config(as_json=True) through the contract's one parser
    (contract.params.read_params); ServerError when a needed parameter is absent or bad. A limit
    that is absent or not positive is None (not known to the client)."""
    cfg = config.get("config", config)
    try:
        p = read_params(model_parameters(cfg))
    except ThfmError as e:
        raise ServerError(f"{url}: model {model!r}: {e}; is this a THFM model repository (written by "
                          "`thfm export`)?") from None
    outputs = {o.get("name") for o in cfg.get("output", [])}
    served = tuple(t for t in TASKS if protocol.OUTPUT_FOR_TASK[t] in outputs) or TASKS

    def known(value: int | None) -> int | None:
        return value if value is not None and value > 0 else None

    return ServerInfo(
        url=url,
        model=model,
        window_frames=p.window,
        height=p.height,
        width=p.width,
        max_frames=known(p.max_frames),
        max_pixels=known(p.max_pixels),
        max_request_bytes=known(p.max_request_bytes),
        tasks=served,
        overlap=p.overlap,
        max_response_bytes=known(p.max_response_bytes),
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
    """float32 elements per frame in a task's output (contract.tasks layouts)."""
    return int(np.prod(frame_shape(task, height, width, joints)))


def response_bytes(tasks, frames: int, height: int, width: int) -> int:
    """Upper bound of one response's size: every task's float32 output plus the joint names."""
    body = sum(np.dtype(np.float32).itemsize * frames * output_elements(t, height, width) for t in tasks)
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
    # K (the joints) is checked against joint_names by the caller: take it from the answer.
    joints = arr.shape[1] if arr.ndim >= 2 else 0
    want = [frames, *frame_shape(task, height, width, joints)]
    if list(arr.shape) != want:
        if task in SPARSE_TASKS:
            want[1] = "K"
        raise ServerError(f"the server returned {task} with shape {list(arr.shape)}, expected {want}")
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr
