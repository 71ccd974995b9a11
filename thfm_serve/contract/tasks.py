"""Task names and the layout of each task's output (files, in-process results and served tensors).

Dense tasks are decoded by the Wan VAE; sparse tasks come from the learnable per-frame tokens.
"""

from __future__ import annotations

import numpy as np

from ..errors import TaskError

# Task names, in the order the engine reports them.
DENSE_TASKS = ("depth", "normals", "segmentation", "densepose")
SPARSE_TASKS = ("keypoints2d", "keypoints3d")
TASKS = DENSE_TASKS + SPARSE_TASKS

# Output file name, key and layout per task; the server returns the same arrays.
OUTPUT_KEYS = {
    "depth": "depth",  # [F, H, W] float32, relative depth
    "normals": "normals",  # [F, H, W, 3] float32, unit vectors
    "segmentation": "alpha",  # [F, H, W] float32 in [0, 1]
    "densepose": "iuv",  # [F, H, W, 3] float32 in [0, 1]
    "keypoints2d": "keypoints",  # [F, K, 2] float32, input pixels (x, y)
    "keypoints3d": "keypoints",  # [F, K, 3] float32, metres, root-relative
}
JOINT_NAMES_KEY = "joint_names"  # sparse tasks' .npz also hold the joint names


def frame_shape(task: str, height: int, width: int, joints: int) -> tuple[int, ...]:
    """A task's output per frame: what follows the frame axis in OUTPUT_KEYS' layouts."""
    if task in ("depth", "segmentation"):
        return (height, width)
    if task in ("normals", "densepose"):
        return (height, width, 3)
    if task == "keypoints2d":
        return (joints, 2)
    if task == "keypoints3d":
        return (joints, 3)
    raise TaskError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def parse_tasks(spec: str | list[str] | tuple[str, ...], available: list[str] | tuple[str, ...] = TASKS) -> list[str]:
    """'depth,keypoints2d' or ['depth', ...] or 'all' -> ordered, de-duplicated task list."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise TaskError(f"no task given; choose from {', '.join(available)} (or 'all')")
    out: list[str] = []
    for t in items:
        if t == "all":
            continue
        if t not in TASKS:
            raise TaskError(f"unknown task {t!r}; choose from {', '.join(TASKS)} (or 'all')")
        if t not in available:
            raise TaskError(f"task {t!r} is not provided by this checkpoint (it has {', '.join(available)})")
        if t not in out:
            out.append(t)
    # 'all' may be repeated or sit next to task names (each still checked above): it means every task.
    return list(available) if "all" in items else out


def task_result(task: str, array: np.ndarray, joint_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays written to `<task>.npz` (and returned by the server)."""
    out = {OUTPUT_KEYS[task]: array}
    if task in SPARSE_TASKS:
        out[JOINT_NAMES_KEY] = np.asarray(joint_names or [], dtype=np.str_)
    return out
