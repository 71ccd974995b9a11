"""Calibration clips for int8: the user's videos, or procedurally generated people.

INT8 scales come from the activation ranges the core sees, so calibration inputs should look like
serving inputs: Wan latents of videos of people, with each task's prompt embedding. With
``--calibration VIDEO...`` the clips are windows of those videos (decoded by thfm_serve.video). Without
it the default is ``procedural_clips``: a jointed figure (head, torso, limbs as shaded capsules) that
walks and swings its arms over a textured, lit background, with random clothing colours, size,
position, speed and camera pan. It is not a real video, but it has what random noise lacks for a
perception model: a person-shaped foreground, coherent motion across frames, smooth shading and
edges, so the latent statistics are image-like.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thfm_serve.errors import ThfmError, VideoError

logger = logging.getLogger(__name__)

PROCEDURAL_RECIPE = "procedural-walkers-v1"  # bump when procedural_clips changes (int8 manifests key on it)
DEFAULT_CLIPS = 4

# Skeleton: joint -> (parent, offset in body heights, drawn radius in body heights).
_BONES = (
    ("neck", "pelvis", (0.0, -0.30), 0.055),
    ("head", "neck", (0.0, -0.10), 0.065),
    ("l_shoulder", "neck", (-0.09, 0.02), 0.04),
    ("r_shoulder", "neck", (0.09, 0.02), 0.04),
    ("l_elbow", "l_shoulder", (0.0, 0.15), 0.032),
    ("r_elbow", "r_shoulder", (0.0, 0.15), 0.032),
    ("l_wrist", "l_elbow", (0.0, 0.14), 0.026),
    ("r_wrist", "r_elbow", (0.0, 0.14), 0.026),
    ("l_hip", "pelvis", (-0.06, 0.0), 0.05),
    ("r_hip", "pelvis", (0.06, 0.0), 0.05),
    ("l_knee", "l_hip", (0.0, 0.23), 0.042),
    ("r_knee", "r_hip", (0.0, 0.23), 0.042),
    ("l_ankle", "l_knee", (0.0, 0.23), 0.034),
    ("r_ankle", "r_knee", (0.0, 0.23), 0.034),
)


@dataclass(frozen=True)
class CalibrationSet:
    clips: list[np.ndarray]  # uint8 [F, H, W, 3] each, at the export shape
    source: str  # PROCEDURAL_RECIPE, or "videos"
    fingerprint: str  # identifies the inputs (int8 manifests are stale when it changes)
    files: list[str]


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _pose(t: float, phase: float, swing: float) -> dict[str, np.ndarray]:
    """2D joint positions (body-height units, pelvis at origin) of a walking pose at time t."""
    angles = {  # bone angle relative to its parent's frame: sinusoidal gait
        "l_elbow": swing * np.sin(t + phase), "r_elbow": -swing * np.sin(t + phase),
        "l_wrist": -0.2 + 0.2 * np.sin(t + phase), "r_wrist": 0.2 - 0.2 * np.sin(t + phase),
        "l_knee": -0.6 * swing * np.sin(t + phase), "r_knee": 0.6 * swing * np.sin(t + phase),
        "l_ankle": 0.4 * max(0.0, np.sin(t + phase + 1.0)), "r_ankle": 0.4 * max(0.0, -np.sin(t + phase + 1.0)),
        "neck": 0.05 * np.sin(2 * t), "head": 0.1 * np.sin(t),
    }
    pos = {"pelvis": np.zeros(2)}
    acc = {"pelvis": 0.0}
    for joint, parent, offset, _ in _BONES:
        a = acc[parent] + angles.get(joint, 0.0)
        acc[joint] = a
        pos[joint] = pos[parent] + _rotate(np.asarray(offset, dtype=np.float64), a)
    return pos


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    grad = rng.uniform(-0.3, 0.3, size=(2, 3)).astype(np.float32)
    img = base + (yy / height)[..., None] * grad[0] + (xx / width)[..., None] * grad[1]
    # Low-frequency texture: a few random sinusoids (walls, floor tiles, foliage-like variation).
    for _ in range(4):
        fy, fx = rng.uniform(0.5, 6.0, size=2)
        ph = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.02, 0.08)
        img += amp * np.sin(2 * np.pi * (fy * yy / height + fx * xx / width) + ph)[..., None]
    horizon = int(height * rng.uniform(0.55, 0.8))  # a floor plane, darker
    img[horizon:] *= 0.75
    for _ in range(3):  # a few boxes (furniture, doors)
        h0, w0 = int(rng.integers(0, height)), int(rng.integers(0, width))
        img[h0 : h0 + int(rng.integers(height // 8, height // 3)), w0 : w0 + int(rng.integers(width // 10, width // 4))] = \
            rng.uniform(0.1, 0.9, size=3)
    return np.clip(img, 0.0, 1.0)


def _clip(rng: np.random.Generator, frames: int, height: int, width: int) -> np.ndarray:
    bg = _background(rng, 2 * height, 2 * width)  # twice the frame: the camera pans over it
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    body_h = rng.uniform(0.5, 0.9) * height
    start = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.45, 0.6) * height])
    velocity = np.array([rng.uniform(-0.02, 0.02) * width, 0.0])
    pan = rng.uniform(-0.01, 0.01, size=2) * np.array([width, height])
    phase, swing, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.6)
    skin = rng.uniform([0.45, 0.3, 0.2], [0.95, 0.8, 0.7])
    shirt, trousers = rng.uniform(0, 1, size=3), rng.uniform(0, 1, size=3)
    light = _rotate(np.array([1.0, 0.0]), rng.uniform(0, 2 * np.pi))
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        oy, ox = (np.array([height, width]) * 0.5 + pan[::-1] * f).astype(int) % np.array([height, width])
        img = bg[oy : oy + height, ox : ox + width].copy()
        pose = _pose(speed * f, phase, swing)
        centre = start + velocity * f
        for joint, parent, _, radius in _BONES:
            a = centre + pose[parent] * body_h
            b = centre + pose[joint] * body_h
            r = radius * body_h
            ab = b - a
            t = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
            dx, dy = xx - (a[0] + t * ab[0]), yy - (a[1] + t * ab[1])
            dist = np.sqrt(dx * dx + dy * dy)
            inside = dist < r
            if not inside.any():
                continue
            # Cylinder shading: brighter on the side facing the light, soft towards the silhouette.
            facing = (dx * light[0] + dy * light[1]) / max(r, 1e-6)
            shade = np.clip(0.75 + 0.35 * facing - 0.25 * (dist / r) ** 2, 0.2, 1.2)
            colour = skin if joint in ("head", "l_wrist", "r_wrist") else (
                trousers if joint.endswith(("hip", "knee", "ankle")) else shirt)
            img[inside] = np.clip(colour[None, :] * shade[inside][:, None], 0.0, 1.0)
        noise = rng.normal(0.0, 0.01, size=img.shape)  # sensor noise
        out[f] = (np.clip(img + noise, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out


def procedural_clips(count: int, frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """`count` uint8 clips [frames, height, width, 3] of a walking figure; same seed, same clips."""
    rng = np.random.default_rng(seed)
    return [_clip(rng, frames, height, width) for _ in range(count)]


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


def calibration_set(paths: list[str | Path] | None, frames: int, height: int, width: int,
                    count: int = DEFAULT_CLIPS, seed: int = 0) -> CalibrationSet:
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
