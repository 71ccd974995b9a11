"""Pre- and post-processing shared by the in-process pipeline and the Triton python models.

Plain functions over numpy/torch arrays: the Triton model.py files call these, and the tests call
them without a server, so both paths produce the same arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import DENSE_TASKS, PIXEL_MULTIPLE, SPARSE_TASKS, VAE_TEMPORAL, check_resolution
from .errors import ShapeError, TaskError

# Output file name, key and layout per task; the server returns the same keys.
OUTPUT_KEYS = {
    "depth": "depth",  # [F, H, W] float32, relative depth
    "normals": "normals",  # [F, H, W, 3] float32, unit vectors
    "segmentation": "alpha",  # [F, H, W] float32 in [0, 1]
    "densepose": "iuv",  # [F, H, W, 3] float32 in [0, 1]
    "keypoints2d": "keypoints",  # [F, K, 2] float32, input pixels (x, y)
    "keypoints3d": "keypoints",  # [F, K, 3] float32, metres, root-relative
}


def snap_frames(n: int) -> int:
    """Smallest 4n+1 frame count that holds n frames (the Wan VAE's temporal grid)."""
    if n < 1:
        raise ShapeError("a clip needs at least one frame")
    return ((n - 1 + VAE_TEMPORAL - 1) // VAE_TEMPORAL) * VAE_TEMPORAL + 1


def snap_size(value: int) -> int:
    """Nearest multiple of 16 (VAE 8x times patch 2x), at least one latent patch."""
    return max(PIXEL_MULTIPLE, int(round(value / PIXEL_MULTIPLE)) * PIXEL_MULTIPLE)


@dataclass(frozen=True)
class Window:
    """Frames [start, stop) of the input go through the model as one clip of `length` (4n+1) frames;
    the results for input frames [keep_from, stop) are kept (earlier ones came from the previous window)."""

    start: int
    stop: int
    keep_from: int
    length: int


def plan_windows(num_frames: int, window: int) -> list[Window]:
    """Cover num_frames with model windows, without losing or duplicating a frame.

    A clip no longer than `window` is one window padded up to 4n+1 frames (the last frame repeated).
    Longer clips are cut into full windows; the last one is aligned to the end (overlapping the one
    before), and only its new frames are kept.
    """
    if window < 1 or (window - 1) % VAE_TEMPORAL:
        raise ShapeError(f"window {window} is not of the form 4n+1")
    if num_frames < 1:
        raise ShapeError("a clip needs at least one frame")
    if num_frames <= window:
        return [Window(0, num_frames, 0, snap_frames(num_frames))]
    out = []
    start = 0
    while start < num_frames:
        stop = start + window
        if stop >= num_frames:
            out.append(Window(num_frames - window, num_frames, start, window))
            break
        out.append(Window(start, stop, start, window))
        start = stop
    return out


def fit_clip(frames: np.ndarray, length: int, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [1, 3, length, height, width] in [-1, 1] (the Wan VAE's range).

    Frames are resized (bilinear, antialiased) to the model resolution and the last frame is repeated
    up to `length` frames (4n+1).
    """
    frames = validate_frames(frames)
    check_resolution(height, width)
    if frames.shape[0] > length:
        raise ShapeError(f"{frames.shape[0]} frames do not fit a window of {length}")
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [F, 3, H, W]
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[0] < length:
        x = torch.cat([x, x[-1:].expand(length - x.shape[0], -1, -1, -1)], dim=0)
    x = x.clamp(0, 1) * 2.0 - 1.0
    return x.permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def validate_frames(frames: np.ndarray) -> np.ndarray:
    """Check a frame array is uint8 [F, H, W, 3]; return it unchanged."""
    if not isinstance(frames, np.ndarray):
        raise ShapeError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ShapeError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ShapeError(f"frames must have shape [F, H, W, 3], got {list(frames.shape)}")
    if frames.shape[0] < 1:
        raise ShapeError("frames: zero frames")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ShapeError(f"frames: empty image size {frames.shape[1]}x{frames.shape[2]}")
    return frames


def resize_maps(maps: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, C, h, w] -> [F, C, height, width] (bilinear)."""
    x = torch.as_tensor(maps).float()
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def dense_output(task: str, maps: np.ndarray | torch.Tensor, height: int, width: int, depth_log_scale: float) -> np.ndarray:
    """Decoded map [F, 3, h, w] in [0, 1] -> the task's array at the input resolution.

    depth: the targets were squashed as d' = clip(a * log(d + 1), 0, 1), so d = exp(d'/a) - 1
    (relative depth); normals: [0,1] -> [-1,1], renormalised to unit length; segmentation: the
    channel mean is the alpha matte; densepose: the 3-channel IUV map as is.
    """
    if task not in DENSE_TASKS:
        raise TaskError(f"{task!r} is not a dense task")
    x = resize_maps(maps, height, width).clamp(0.0, 1.0)
    if task == "depth":
        return torch.expm1(x.mean(dim=1) / depth_log_scale).numpy().astype(np.float32)
    if task == "segmentation":
        return x.mean(dim=1).clamp(0.0, 1.0).numpy().astype(np.float32)
    chan_last = x.permute(0, 2, 3, 1)
    if task == "normals":
        n = chan_last * 2.0 - 1.0
        return (n / n.norm(dim=-1, keepdim=True).clamp_min(1e-6)).numpy().astype(np.float32)
    return chan_last.contiguous().numpy().astype(np.float32)  # densepose


def sparse_output(task: str, keypoints: np.ndarray | torch.Tensor, height: int, width: int) -> np.ndarray:
    """Core keypoints [F, K, C] -> the task's array: 2D normalised coords scaled to input pixels
    (x by width, y by height: the clip was stretched to the model grid, so the mapping is linear);
    3D keypoints are already metres, root-relative."""
    if task not in SPARSE_TASKS:
        raise TaskError(f"{task!r} is not a sparse task")
    k = torch.as_tensor(keypoints).float()
    if task == "keypoints2d":
        k = k * torch.tensor([width, height], dtype=torch.float32)
    return k.numpy().astype(np.float32)


def task_result(task: str, array: np.ndarray, joint_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays written to `<task>.npz` (and returned by the server)."""
    out = {OUTPUT_KEYS[task]: array}
    if task in SPARSE_TASKS:
        out["joint_names"] = np.asarray(joint_names or [], dtype=np.str_)
    return out
