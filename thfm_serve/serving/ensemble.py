"""The ensembles' python steps: preprocess (clip -> full windows, geometry, task embeddings) and
postprocess_dense / postprocess_sparse (windows -> the input's frames and size)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..contract import protocol
from ..contract.depth import DepthCode
from ..contract.params import Grid
from ..contract.protocol import CLIP, GEOMETRY, MAPS_PREFIX, TEXT_PREFIX
from ..contract.windows import Stitcher, plan_windows, stitched
from ..errors import ShapeError
from .entry import names_tensor


def fit_full_windows(frames: np.ndarray, grid: Grid, max_windows: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> float32 [num_windows, 3, window, height, width] in [-1, 1].

    Windows follow the one windowing policy (contract.windows.plan_windows, with the grid's overlap),
    but every one is fitted to the full window (the one frame count the exported VAE graphs take;
    see the package docstring for what that means for clips shorter than a window).
    """
    from ..processing import fit_clip

    windows = plan_windows(frames.shape[0], grid.window, grid.window_overlap)
    if len(windows) > max_windows:
        most = (max_windows - 1) * (grid.window - grid.window_overlap) + grid.window
        raise ShapeError(
            f"{frames.shape[0]} frames need {len(windows)} windows of {grid.window}; the ensembles take at most "
            f"{max_windows} ({most} frames) per request: send longer clips to the "
            f"{protocol.ENTRY_MODEL!r} model")
    clips = [fit_clip(frames[w.start : w.stop], grid.window, grid.height, grid.width) for w in windows]
    return np.concatenate([c.numpy() for c in clips], axis=0)


def preprocess(frames: np.ndarray, grid: Grid, embeddings: Mapping[str, np.ndarray], max_windows: int,
               wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """The preprocess model's outputs that were asked for (`wanted` output names)."""
    wanted = set(wanted)
    clip = fit_full_windows(frames, grid, max_windows)  # [W, 3, T, H, W]
    out: dict[str, np.ndarray] = {CLIP: clip, GEOMETRY: np.asarray(frames.shape[:3], dtype=np.int64)}
    for task, emb in embeddings.items():
        name = TEXT_PREFIX + task
        if name in wanted:
            # The core takes one text row per batch row, and the ensemble's batch rows are windows.
            out[name] = np.ascontiguousarray(np.broadcast_to(emb, (clip.shape[0], *emb.shape)))
    return {k: v for k, v in out.items() if k in wanted}


def _geometry(geometry: np.ndarray) -> tuple[int, int, int]:
    g = np.asarray(geometry).reshape(-1)
    if g.size != 3 or (g < 1).any():
        raise ShapeError(f"{GEOMETRY!r} must be [frames, height, width], positive, got {g.tolist()}")
    return int(g[0]), int(g[1]), int(g[2])


def _stitch(windows_array: np.ndarray, num_frames: int, window: int, overlap: int | None,
            to_output: Callable[[np.ndarray], np.ndarray], name: str) -> np.ndarray:
    """Per window of plan_windows(num_frames, window, overlap), that window's row ([W, T, ...] with
    time on axis 1) cut to its frames, mapped by to_output and stitched in input order."""
    plan = plan_windows(num_frames, window, overlap)
    if windows_array.shape[0] != len(plan):
        raise ShapeError(f"{len(plan)} windows expected for {num_frames} frames, got {windows_array.shape[0]}")
    stitcher = Stitcher(plan, num_frames)
    for i, win in enumerate(plan):
        stitcher.add(win, to_output(windows_array[i, : win.frames]), name)
    return stitched(name, stitcher)


def postprocess_dense(geometry: np.ndarray, maps: Mapping[str, np.ndarray], window: int,
                      depth: DepthCode, overlap: int | None = None) -> dict[str, np.ndarray]:
    """maps_<task> [W, 3, T, h, w] (full windows) -> {task output name: array at the input's frames and size}."""
    from ..processing import dense_output

    num_frames, in_h, in_w = _geometry(geometry)
    out = {}
    for task, m in maps.items():
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 5 or m.shape[1] != 3:
            raise ShapeError(f"{MAPS_PREFIX}{task} must be [windows, 3, frames, height, width], got {list(m.shape)}")
        out[protocol.OUTPUT_FOR_TASK[task]] = _stitch(  # each window's part: [f, 3, h, w]
            m.transpose(0, 2, 1, 3, 4), num_frames, window, overlap,
            lambda p, task=task: dense_output(task, p, in_h, in_w, depth), task)
    return out


def postprocess_sparse(geometry: np.ndarray, keypoints: Mapping[str, np.ndarray], window: int,
                       joint_names: Sequence[str], overlap: int | None = None) -> dict[str, np.ndarray]:
    """{task: core keypoints [W, T, K, C]} -> {task output name: [F, K, C]} plus joint_names."""
    from ..processing import sparse_output

    num_frames, in_h, in_w = _geometry(geometry)
    out = {}
    for task, kp in keypoints.items():
        kp = np.asarray(kp, dtype=np.float32)
        out[protocol.OUTPUT_FOR_TASK[task]] = _stitch(
            kp, num_frames, window, overlap, lambda p, task=task: sparse_output(task, p, in_h, in_w), task)
    out[protocol.OUTPUT_JOINT_NAMES] = names_tensor(joint_names)
    return out

