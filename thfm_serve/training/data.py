"""Clips with ground truth -> model-grid inputs and training targets.

The data layout is the synthetic renderer's (`thfm synth`), which is also what `thfm predict` writes,
so a prediction folder and a ground-truth folder compare file by file::

    DIR/<clip>/video.mp4
    DIR/<clip>/depth.npz          depth      [F, H, W]     metric depth (non-finite or <= 0: no surface)
    DIR/<clip>/normals.npz        normals    [F, H, W, 3]  camera-frame unit normals
    DIR/<clip>/segmentation.npz   alpha      [F, H, W]     soft foreground in [0, 1]
    DIR/<clip>/densepose.npz      iuv        [F, H, W, 3]  part index and surface UV in [0, 1]
    DIR/<clip>/keypoints2d.npz    keypoints  [F, K, 2]     pixels (x, y); optional visibility [F, K]
    DIR/<clip>/keypoints3d.npz    keypoints  [F, K, 3]     metres, root-relative
    DIR/<clip>/camera.json        intrinsics (not needed for training)

A clip may lack some task files; it then trains only the tasks it has. Every dense target becomes a
3-channel image in [0, 1] (THFM's recipe): depth median-normalised over the clip's foreground and
squashed into [0, 1] by the checkpoint's depth code (`contract.depth`; `processing.dense_output` inverts it),
normals mapped from [-1, 1] to [0, 1], the matte repeated over three channels, dense pose as is.
Keypoints2d are normalised to [0, 1] image coordinates (the core's sigmoid range), 3D keypoints stay
in metres.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DENSE_TASKS, SPARSE_TASKS, TASKS
from ..errors import ShapeError, ThfmError
from ..contract.depth import DepthCode
from ..contract.tasks import OUTPUT_KEYS
from ..contract.windows import plan_windows
from ..processing import fit_clip

logger = logging.getLogger(__name__)

VIDEO_FILE = "video.mp4"


class DataError(ThfmError):
    """A training or validation directory that does not hold usable clips."""


@dataclass
class Sample:
    """One model window of one clip, on the model grid (T = the model's 4n+1 frames)."""

    clip: str
    start: int  # first input frame of the window
    # Pixels are held in float16 (half the memory of a training set; targets are 8-bit-ish images).
    video: torch.Tensor  # [3, T, H, W] in [-1, 1]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # dense task -> [3, T, H, W] in [0, 1]
    keypoints2d: torch.Tensor | None = None  # [T, K, 2] normalised (x / width, y / height)
    visibility: torch.Tensor | None = None  # [T, K] weight of each joint in the 2D loss (1 visible, 0.5 occluded)
    keypoints3d: torch.Tensor | None = None  # [T, K, 3] metres, root-relative

    @property
    def tasks(self) -> list[str]:
        out = [t for t in DENSE_TASKS if t in self.maps]
        if self.keypoints2d is not None:
            out.append("keypoints2d")
        if self.keypoints3d is not None:
            out.append("keypoints3d")
        return out


def find_clips(root: str | Path) -> list[Path]:
    """Clip folders (those holding video.mp4) under root, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    clips = sorted(p.parent for p in root.glob(f"*/{VIDEO_FILE}"))
    if not clips:
        raise DataError(f"{root} holds no clips (expected {root}/<clip>/{VIDEO_FILE} with <task>.npz ground truth)")
    return clips


def load_ground_truth(clip_dir: Path, num_frames: int) -> dict[str, dict[str, np.ndarray]]:
    """{task: arrays} for every task file present, checked against the video's frame count."""
    out = {}
    for task in TASKS:
        path = clip_dir / f"{task}.npz"
        if not path.is_file():
            continue
        with np.load(path, allow_pickle=False) as z:
            key = OUTPUT_KEYS[task]
            if key not in z:
                raise DataError(f"{path} has no {key!r} array (keys: {sorted(z.files)})")
            arrays = {k: z[k] for k in z.files if k != "joint_names"}
        if arrays[key].shape[0] != num_frames:
            raise DataError(f"{path}: {arrays[key].shape[0]} frames, but the video has {num_frames}")
        out[task] = arrays
    return out


def depth_to_map(depth: np.ndarray, alpha: np.ndarray | None, code: DepthCode) -> np.ndarray:
    """Metric depth [F, H, W] -> squashed relative depth in [0, 1].

    Median-normalised over the clip (over the person where a matte says where it is, else over every
    surface pixel), so one scale holds for the whole clip; pixels without a surface map to 1 (far).
    """
    depth = depth.astype(np.float32)
    valid = np.isfinite(depth) & (depth > 0)
    if not valid.any():
        raise DataError("depth ground truth has no valid (finite, positive) pixel")
    ref = valid & (alpha > 0.5) if alpha is not None else valid
    if not ref.any():
        ref = valid
    median = float(np.median(depth[ref]))
    rel = np.where(valid, depth / median, 1.0)
    return np.where(valid, code.encode(rel), 1.0).astype(np.float32)


def task_maps(gt: dict[str, dict[str, np.ndarray]], depth: DepthCode) -> dict[str, np.ndarray]:
    """Dense ground truth -> {task: [F, H, W, 3] float32 in [0, 1]} (THFM's 3-channel targets)."""
    out = {}
    alpha = gt["segmentation"]["alpha"].astype(np.float32) if "segmentation" in gt else None
    if "depth" in gt:
        d = depth_to_map(gt["depth"]["depth"], alpha, depth)
        out["depth"] = np.repeat(d[..., None], 3, axis=-1)
    if "normals" in gt:
        n = np.nan_to_num(gt["normals"]["normals"].astype(np.float32))
        if n.ndim != 4 or n.shape[-1] != 3:
            raise DataError(f"normals ground truth must be [F, H, W, 3], got {list(n.shape)}")
        out["normals"] = np.clip((n + 1.0) * 0.5, 0.0, 1.0)
    if alpha is not None:
        out["segmentation"] = np.repeat(np.clip(alpha, 0.0, 1.0)[..., None], 3, axis=-1)
    if "densepose" in gt:
        iuv = gt["densepose"]["iuv"].astype(np.float32)
        if iuv.ndim != 4 or iuv.shape[-1] != 3:
            raise DataError(f"densepose ground truth must be [F, H, W, 3], got {list(iuv.shape)}")
        out["densepose"] = np.clip(iuv, 0.0, 1.0)
    return out


def fit_maps(maps: np.ndarray, length: int, height: int, width: int) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [3, length, height, width]: resized like the frames (`fit_clip`),
    the last frame repeated up to the window length."""
    x = torch.from_numpy(np.ascontiguousarray(maps)).permute(0, 3, 1, 2).float()  # [F, 3, H, W]
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[0] < length:
        x = torch.cat([x, x[-1:].expand(length - x.shape[0], -1, -1, -1)], dim=0)
    return x.clamp(0.0, 1.0).permute(1, 0, 2, 3).contiguous()


def _pad_frames(x: np.ndarray, length: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if t.shape[0] < length:
        t = torch.cat([t, t[-1:].expand(length - t.shape[0], *t.shape[1:])], dim=0)
    return t


def load_clip(clip_dir: Path, window: int, height: int, width: int, num_joints: int,
              depth: DepthCode) -> list[Sample]:
    """Every model window of one clip (the windows `plan_windows` gives the in-process pipeline)."""
    from ..video import read_video

    video = read_video(clip_dir / VIDEO_FILE)
    frames = video.frames  # [F, H, W, 3] uint8
    num_frames, in_h, in_w = frames.shape[:3]
    gt = load_ground_truth(clip_dir, num_frames)
    if not gt:
        raise DataError(f"{clip_dir} has a video but no <task>.npz ground truth")
    maps = task_maps(gt, depth)
    for task in SPARSE_TASKS:
        if task in gt:
            k = gt[task]["keypoints"]
            coords = 2 if task == "keypoints2d" else 3
            if k.ndim != 3 or k.shape[1:] != (num_joints, coords):
                raise DataError(
                    f"{clip_dir / (task + '.npz')}: keypoints of shape {list(k.shape)}, the checkpoint expects "
                    f"[F, {num_joints}, {coords}]"
                )
    samples = []
    for win in plan_windows(num_frames, window):
        sl = slice(win.start, win.stop)
        s = Sample(clip=clip_dir.name, start=win.start,
                   video=fit_clip(frames[sl], win.length, height, width)[0].half())
        for task, m in maps.items():
            s.maps[task] = fit_maps(m[sl], win.length, height, width).half()
        if "keypoints2d" in gt:
            k2 = gt["keypoints2d"]["keypoints"][sl].astype(np.float32) / np.array([in_w, in_h], np.float32)
            s.keypoints2d = _pad_frames(k2, win.length)
            vis = gt["keypoints2d"].get("visibility")
            vis = np.ones(k2.shape[:2], np.float32) if vis is None else vis[sl].astype(np.float32)
            # An occluded joint still has a well-defined position, so it trains at half weight;
            # joints outside the picture cannot be reached by the sigmoid head and do not count.
            inside = np.all((k2 >= 0.0) & (k2 <= 1.0), axis=-1)
            s.visibility = _pad_frames((0.5 + 0.5 * vis) * inside, win.length)
        if "keypoints3d" in gt:
            s.keypoints3d = _pad_frames(gt["keypoints3d"]["keypoints"][sl].astype(np.float32), win.length)
        samples.append(s)
    return samples


def load_samples(root: str | Path, window: int, height: int, width: int, num_joints: int,
                 depth: DepthCode, max_clips: int | None = None, workers: int = 1) -> list[Sample]:
    """All windows of all clips under root (or of the first max_clips clips), in clip order.

    `workers` > 1 reads clips in that many threads (video decoding, npz inflation and resizing mostly
    release the GIL): a GPU host otherwise waits on one core (1,200 clips at 192x192 took about 2
    minutes on one core of a 16-core host). The windows are the same, in the same order, either way."""
    if window < 1 or (window - 1) % 4:
        raise ShapeError(f"window {window} is not of the form 4n+1")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    clips = find_clips(root)[:max_clips]

    def one(clip: Path) -> list[Sample]:
        out = load_clip(clip, window, height, width, num_joints, depth)
        _return_freed_memory()
        return out

    samples: list[Sample] = []
    if workers == 1:
        for clip in clips:
            samples.extend(one(clip))
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="load-clip") as pool:
            for windows in pool.map(one, clips):  # map keeps the clips' order
                samples.extend(windows)
    logger.info("%s: %d clips, %d windows of %d frames at %dx%d", root, len(clips), len(samples), window, height, width)
    return samples


def _find_malloc_trim():
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


_MALLOC_TRIM = _find_malloc_trim()


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    Each clip's float32 temporaries are freed once its fp16 windows exist, but glibc raises its mmap
    threshold after the first large free, so later temporaries land on the heap between the kept
    windows and their pages are never returned: 500 clips at 128x128 held 4.2 GB of windows in a
    15.5 GB process. Trimming after every clip keeps the process near what it holds."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
