"""Calibration clips for int8: the user's videos, or procedurally generated people.

INT8 scales come from the activation ranges the core sees, so calibration inputs should look like
serving inputs: Wan latents of videos of people, with each task's prompt embedding. With
``--calibration VIDEO...`` the clips are windows of those videos (decoded by thfm_serve.video). Without
it the default is ``procedural_clips``, the project's one clip generator (thfm_serve.clipgen): a
walking figure over a textured, lit background, whose latent statistics are image-like.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thfm_serve.clipgen import RECIPE
from thfm_serve.clipgen import walking_clips as procedural_clips  # noqa: F401 - calibration's name for them
from thfm_serve.contract.geometry import PIXEL_MULTIPLE
from thfm_serve.contract.protocol import CORE
from thfm_serve.errors import ThfmError, VideoError

logger = logging.getLogger(__name__)

# The default calibration clips come from the project's one clip generator (thfm_serve.clipgen).
PROCEDURAL_RECIPE = RECIPE
# Generated clips per submodel when --calibration-clips is not given. The core's calibration forwards
# (one row per task and clip) were the largest part of a 1.3B int8 export on CPU; on the trained small
# checkpoint 2 clips instead of 4 changed its task drift against fp32 by -10 to +30 %, of a drift
# under a tenth of the model's own error against ground truth (export/RESULTS.md). The int8 VAE keeps 4: its
# drift bounds are fatal and close on Wan2.1's width.
CORE_CLIPS = 2
VAE_CLIPS = 4

# The core's CPU int8 recipe takes only MinMax ranges of its linears' inputs and outputs, per channel
# of a token, so the calibration forwards need the clips' content more than their token count: on the
# Wan2.1-1.3B-shaped core, 2 clips at 17x128x128 gave every linear's range within -8/+11 % of 1 clip at
# 17x256x256 (median ratio 1.00) and the same task drift, for a quarter of the tokens (10 s a row
# against 33 s on the avx2-fma class). Halved below 128x128 the clips lose the person: the trained
# small model exported at 192x192 and calibrated at 96x96 drifted twice as far on the matte (alpha
# MSE 8.5e-4 against 4.4e-4; export/RESULTS.md). So a grid is halved only where its half keeps at
# least this many pixels (calibration_grid).
CALIBRATION_MIN_PIXELS = 128 * 128


def default_clips(model: str) -> int:
    """Generated calibration clips for `model` ("core", "vae_encoder", "vae_decoder")."""
    return CORE_CLIPS if model == CORE else VAE_CLIPS


@dataclass(frozen=True)
class CalibrationSet:
    clips: list[np.ndarray]  # uint8 [F, H, W, 3] each, at the export shape
    source: str  # PROCEDURAL_RECIPE, or "videos"
    fingerprint: str  # identifies the inputs (int8 manifests are stale when it changes)
    files: list[str]


def video_clips(paths: list[str | Path], frames: int, height: int, width: int, per_video: int = 2) -> list[np.ndarray]:
    """Up to `per_video` windows of `frames` frames from each video, fitted to height x width
    (thfm_serve.processing.fit_clip: resized, last frame repeated when a video is shorter)."""
    from thfm_serve.processing import fit_clip
    from thfm_serve.video import read_video

    clips = []
    for path in paths:
        try:
            video = read_video(path)
        except VideoError as e:
            raise ThfmError(f"calibration video {path}: {e}") from None
        total = video.frames.shape[0]
        starts = np.linspace(0, max(0, total - frames), num=min(per_video, max(1, total // frames) or 1)).astype(int)
        for s in sorted(set(int(v) for v in starts)):
            clip = fit_clip(video.frames[s : s + frames], frames, height, width)  # [1,3,F,H,W] in [-1,1]
            arr = ((clip[0].permute(1, 2, 3, 0).numpy() + 1.0) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
            clips.append(arr)
        logger.info("calibration: %s gave %d window(s)", path, len(starts))
    return clips


def calibration_grid(height: int, width: int) -> tuple[int, int]:
    """(height, width) at which the core's CPU int8 calibration clips are made and encoded: half the
    export grid's side (rounded down to the model's x16 grid) where that half has at least
    CALIBRATION_MIN_PIXELS pixels, else the export grid itself."""
    half = tuple(max(PIXEL_MULTIPLE, side // 2 // PIXEL_MULTIPLE * PIXEL_MULTIPLE) for side in (height, width))
    return half if half[0] * half[1] >= CALIBRATION_MIN_PIXELS else (height, width)


def calibration_set(paths: list[str | Path] | None, frames: int, height: int, width: int,
                    count: int = CORE_CLIPS, seed: int = 0) -> CalibrationSet:
    if paths:
        missing = [str(p) for p in paths if not Path(p).is_file()]
        if missing:
            raise ThfmError(f"calibration videos not found: {', '.join(missing)}")
        h = hashlib.sha256()
        for p in paths:
            h.update(hashlib.file_digest(open(p, "rb"), "sha256").digest())
        clips = video_clips(paths, frames, height, width)
        return CalibrationSet(clips, "videos", f"videos:{h.hexdigest()[:16]}", [str(p) for p in paths])
    logger.info("calibration: no --calibration videos; using %d procedural clips (%s)", count, PROCEDURAL_RECIPE)
    clips = procedural_clips(count, frames, height, width, seed)
    return CalibrationSet(clips, PROCEDURAL_RECIPE, f"{PROCEDURAL_RECIPE}:n{count}:s{seed}", [])


def task_texts(ck: Any, tasks: list[str] | None = None) -> np.ndarray:
    """The checkpoint's task prompt embeddings [tasks, L, D] float32: one core row per task, as served."""
    return np.stack([ck.task_embedding(t).numpy() for t in (tasks or ck.tasks)]).astype(np.float32)


def clip_latent(encoder: Any, clip: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
    """A uint8 clip [F, H, W, 3] fitted to frames x height x width and encoded by the Wan VAE encoder
    (thfm_serve.model.VaeEncoder): the core's latent input [1, 16, T', H/8, W/8]."""
    import torch

    from thfm_serve.processing import fit_clip

    with torch.no_grad():
        return encoder(fit_clip(clip, frames, height, width)).numpy()
