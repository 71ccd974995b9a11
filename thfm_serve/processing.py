"""Pre- and post-processing shared by the in-process pipeline and the Triton python models (torch).

Plain functions over numpy/torch arrays: the Triton model.py files call these, and the tests call
them without a server, so both paths produce the same arrays.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .contract.depth import DepthCode
from .contract.geometry import check_resolution, validate_frames
from .contract.tasks import DENSE_TASKS, SPARSE_TASKS, task_result
from .contract.windows import run_windows
from .errors import ShapeError, TaskError

logger = logging.getLogger(__name__)


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


def resize_maps(maps: np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[F, C, h, w] -> [F, C, height, width] (bilinear)."""
    x = torch.as_tensor(maps).float()
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def dense_output(task: str, maps: np.ndarray | torch.Tensor, height: int, width: int, depth: DepthCode) -> np.ndarray:
    """Decoded map [F, 3, h, w] in [0, 1] -> the task's array at the input resolution.

    depth: the channel mean un-squashed by the checkpoint's code (relative depth); normals: [0,1] ->
    [-1,1], renormalised to unit length; segmentation: the channel mean is the alpha matte; densepose:
    the 3-channel IUV map as is.
    """
    if task not in DENSE_TASKS:
        raise TaskError(f"{task!r} is not a dense task")
    x = resize_maps(maps, height, width).clamp(0.0, 1.0)
    if task == "depth":
        return depth.decode(x.mean(dim=1).numpy())
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


# encode(clip [1, 3, T, H, W]) -> latent [1, 16, T', h, w]; core(latent [N, ...], text [N, L, D]) ->
# (pred_latent [N, 16, T', h, w], kp2d [N, T, K, 2], kp3d [N, T, K, 3]); decode(latent [n, ...]) ->
# maps [n, 3, T, h, w]. numpy in and out, whichever engine runs them (PyTorch, onnxruntime, BLS).
Encode = Callable[[np.ndarray], np.ndarray]
Core = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
Decode = Callable[[np.ndarray], np.ndarray]


def run_clip(frames: np.ndarray, tasks: Sequence[str], text: np.ndarray, height: int, width: int, window: int,
             overlap: int | None, depth: DepthCode, joint_names: Sequence[str], encode: Encode, core: Core,
             decode: Decode, output_hw: tuple[int, int] | None = None,
             pipelined: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Every requested task on a clip: frames uint8 [F, H, W, 3] -> {task: {key: array}} at the input's
    frames; dense maps at output_hw (default: the input's resolution; budget.output_resolution), keypoints
    in input pixels either way. The in-process pipeline and the served entry model both run this.

    Per window of the one windowing policy (contract.windows): the clip is fitted to the model grid
    and encoded once, the core runs once with one batch row per task (text [N, L, D], one row per
    task), and the dense rows are decoded in one call; each task's window result is mapped back to
    the input's resolution and stitched (cross-faded over the overlap) in frame order. pipelined:
    the next window's fitting, encoding and core run while this one's rows are decoded and mapped
    back (contract.windows.run_windows); the same results, in less time only where those
    stages do not share the same cores.
    """
    num_frames, in_h, in_w = frames.shape[:3]
    out_h, out_w = output_hw or (in_h, in_w)
    dense_idx = [j for j, t in enumerate(tasks) if t in DENSE_TASKS]

    def front(win, part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        clip = fit_clip(part, win.length, height, width).numpy()  # [1, 3, T, H, W]
        latent = encode(clip)  # [1, 16, T', h, w]
        return core(np.repeat(latent, len(tasks), axis=0), text)

    def back(win, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
        pred, kp2d, kp3d = state
        if dense_idx:
            maps = decode(np.ascontiguousarray(pred[dense_idx]))  # [n_dense, 3, T, h, w]
        out = {}
        for j, t in enumerate(tasks):
            if t in DENSE_TASKS:
                m = maps[dense_idx.index(j)].transpose(1, 0, 2, 3)[: win.frames]  # [f, 3, h, w]
                out[t] = dense_output(t, m, out_h, out_w, depth)
            else:
                kp = (kp2d if t == "keypoints2d" else kp3d)[j][: win.frames]
                out[t] = sparse_output(t, kp, in_h, in_w)
        return out

    arrays = run_windows(frames, tasks, window, overlap, front, back, logger.debug, pipelined=pipelined)
    joints = list(joint_names)
    return {t: task_result(t, arrays[t], joints if t in SPARSE_TASKS else None) for t in tasks}
