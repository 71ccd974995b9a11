"""A picture of a rendered clip and its ground truth: one row per chosen frame, one column per task
(video, depth, normals, matte, dense pose, 2D skeleton, 3D skeleton), drawn with the same
functions `thfm predict --pictures` uses, so ground truth and predictions look alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .scene import SynthClip

COLUMNS = ("video", "depth", "normals", "segmentation", "densepose", "keypoints2d", "keypoints3d")


def preview_sheet(clip: SynthClip, rows: int = 3) -> np.ndarray:
    """uint8 [rows * H, 7 * W, 3]: evenly spaced frames of the clip and their ground truth."""
    from PIL import Image

    from ..visualize import task_pictures

    f, h, w = clip.alpha.shape
    pick = np.unique(np.linspace(0, f - 1, min(rows, f)).round().astype(int))
    results = clip.results()
    tiles = {"video": clip.frames[pick]}
    for task in COLUMNS[1:]:
        arrays = {k: v[pick] if k != "joint_names" else v for k, v in results[task].items()}
        pics = task_pictures(task, arrays, clip.frames[pick])
        if pics.shape[1:3] != (h, w):  # the 3D plot has its own square size
            pics = np.stack([np.asarray(Image.fromarray(p).resize((w, h), Image.BILINEAR)) for p in pics])
        tiles[task] = pics
    return np.concatenate([np.concatenate([tiles[c][i] for c in COLUMNS], axis=1) for i in range(len(pick))], axis=0)


def write_preview(clip: SynthClip, path: str | Path, rows: int = 3) -> Path:
    from PIL import Image

    Image.fromarray(preview_sheet(clip, rows)).save(path, optimize=True)
    return Path(path)
