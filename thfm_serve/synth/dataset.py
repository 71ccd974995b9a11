"""Writing rendered clips to disk and reading them back.

Layout (one folder per clip, the files `thfm predict` writes, so a prediction folder and a
ground-truth folder compare file by file):

    DIR/<clip>/video.mp4          the rendered frames (H.264)
    DIR/<clip>/<task>.npz         ground truth per task, keys from processing.OUTPUT_KEYS
    DIR/<clip>/camera.json        intrinsics, per-frame extrinsics, conventions, scene summary
    DIR/index.json                the set's parameters and clip names

Clip i of a set with seed S is rendered from SeedSequence([S, i]), so a clip does not depend on how
many clips the set has or on how many worker processes render it, and files are byte-identical
across runs (the npz writer fixes the zip timestamps numpy would take from the clock).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import ThfmError
from .scene import SynthClip, render_clip

logger = logging.getLogger(__name__)

VIDEO_NAME = "video.mp4"
CAMERA_NAME = "camera.json"
INDEX_NAME = "index.json"
CRF = 12  # near-lossless H.264: the video is a model input, its ground truth is exact


def clip_name(index: int) -> str:
    return f"clip_{index:05d}"


def clip_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, index])


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed's format with a fixed timestamp in the zip entries, so equal arrays give
    equal bytes, and deflate level 1: float maps shrink little more at higher levels, which cost
    several times the time."""
    with zipfile.ZipFile(path, "w") as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)


PREVIEW_NAME = "preview.png"


def write_clip(clip: SynthClip, out_dir: str | Path, preview: bool = False) -> Path:
    """Write one clip's video, ground truth and camera into out_dir (and preview.png: the frames next
    to their ground truth, with preview=True)."""
    from ..video import encode_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encode_video(clip.frames, out / VIDEO_NAME, fps=clip.fps, crf=CRF)
    for task, arrays in clip.results().items():
        save_npz(out / f"{task}.npz", arrays)
    (out / CAMERA_NAME).write_text(json.dumps(clip.camera, indent=1, sort_keys=True) + "\n")
    if preview:
        from .preview import write_preview

        write_preview(clip, out / PREVIEW_NAME)
    return out


def load_backgrounds(folder: str | Path | None, size: int = 256) -> list[np.ndarray]:
    """Images (png, jpg) from a folder as float [h, w, 3] in [0, 1], shrunk to at most size pixels."""
    if folder is None:
        return []
    from PIL import Image

    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not paths:
        raise ThfmError(f"--backgrounds {folder}: no png/jpg/webp/bmp images in it")
    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((size, size))
                images.append(np.asarray(im, dtype=np.float64) / 255.0)
        except OSError as e:
            raise ThfmError(f"background image {p} cannot be read: {e}") from None
    return images


def _render_one(args) -> tuple[str, float]:
    out, seed, index, kwargs, preview = args
    t0 = time.perf_counter()
    clip = render_clip(clip_seed(seed, index), **kwargs)
    write_clip(clip, Path(out) / clip_name(index), preview)
    return clip_name(index), time.perf_counter() - t0


def write_set(out_dir: str | Path, clips: int, frames: int = 17, height: int = 128, width: int = 128,
              seed: int = 0, fps: float = 24.0, samples: int = 3, backgrounds: str | Path | None = None,
              motions: tuple[str, ...] | None = None, workers: int = 1, preview: bool = False) -> list[Path]:
    """Render and write `clips` clips; returns their folders. workers > 1 renders in processes;
    preview adds each clip's preview.png."""
    if clips < 1:
        raise ThfmError(f"--clips must be at least 1, got {clips}")
    if frames < 1 or height < 8 or width < 8:
        raise ThfmError(f"clips need at least 1 frame of 8x8 pixels, got {frames} frames of {height}x{width}")
    if seed < 0:
        raise ThfmError(f"--seed must be non-negative, got {seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(frames=frames, height=height, width=width, fps=fps, samples=samples,
                  backgrounds=load_backgrounds(backgrounds), motions=motions)
    jobs = [(str(out), seed, i, kwargs, preview) for i in range(clips)]
    t0 = time.perf_counter()
    if workers > 1:
        # One numpy thread per process: the work is many small array operations.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(workers) as pool:
            done = list(pool.map(_render_one, jobs, chunksize=max(1, clips // (workers * 8))))
    else:
        done = [_render_one(j) for j in jobs]
    wall = time.perf_counter() - t0
    index = {"clips": [name for name, _ in done], "frames": frames, "height": height, "width": width,
             "fps": fps, "seed": seed, "samples": samples, "motions": list(motions) if motions else None}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
    logger.info("rendered %d clips of %d frames at %dx%d in %.1f s (%.2f clips/s, %d worker%s)",
                clips, frames, height, width, wall, clips / wall, workers, "" if workers == 1 else "s")
    return [out / name for name, _ in done]


def read_clip(folder: str | Path) -> dict:
    """One clip folder back in memory: {"frames": uint8 [F, H, W, 3] decoded from video.mp4, "fps",
    "camera": camera.json, and each task's arrays under its name (the `<task>.npz` contents)}."""
    from ..config import TASKS
    from ..video import read_video

    folder = Path(folder)
    if not (folder / VIDEO_NAME).exists():
        raise ThfmError(f"{folder} has no {VIDEO_NAME}")
    video = read_video(folder / VIDEO_NAME)
    out: dict = {"frames": video.frames, "fps": video.fps}
    if (folder / CAMERA_NAME).exists():
        out["camera"] = json.loads((folder / CAMERA_NAME).read_text())
    for task in TASKS:
        path = folder / f"{task}.npz"
        if path.exists():
            with np.load(path) as z:
                out[task] = {k: z[k] for k in z.files}
    return out


def list_clips(root: str | Path) -> list[Path]:
    """The clip folders under root (those holding a video or any task file), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise ThfmError(f"{root} is not a directory")
    return sorted(p for p in root.iterdir() if p.is_dir() and (any(p.glob("*.npz")) or (p / VIDEO_NAME).exists()))
