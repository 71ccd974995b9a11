"""Tiny clips with exact ground truth in the renderer's layout, for the training tests.

A "person" here is an ellipsoid blob that moves across a plain backdrop: its matte, depth (the blob's
front surface in front of a plane), normals, dense-pose-like IUV and 24 keypoints fixed to the blob
are computed in closed form, so the loader and the training loop can be tested without the full
renderer. Every clip is a function of its seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from thfm_serve.config import SMPL_JOINTS
from thfm_serve.video import encode_video

K = len(SMPL_JOINTS)
# Joints at fixed offsets inside the blob, as fractions of its radii (x right, y down).
_OFFSETS = np.stack([np.linspace(-0.6, 0.6, K), 0.8 * np.sin(np.linspace(0, 3 * np.pi, K))], axis=1).astype(np.float32)


def blob_clip(seed: int, frames: int = 9, height: int = 64, width: int = 64) -> dict[str, np.ndarray]:
    """Frames and ground truth arrays of one clip (the keys `thfm predict` writes)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    rx, ry = width * rng.uniform(0.15, 0.22), height * rng.uniform(0.3, 0.4)
    x0, vx = width * rng.uniform(0.3, 0.4), width * rng.uniform(0.01, 0.03)
    cy = height * 0.5
    body = rng.uniform(60, 255, 3)
    backdrop = rng.uniform(0, 80, 3)
    focal = float(width)
    out = {k: [] for k in ("frames", "depth", "normals", "alpha", "iuv", "kp2d", "kp3d")}
    for f in range(frames):
        cx = x0 + vx * f
        u, v = (xx - cx) / rx, (yy - cy) / ry
        r2 = u**2 + v**2
        alpha = np.clip((1.0 - r2) * rx / 2.0, 0.0, 1.0)  # a soft edge about two pixels wide
        inside = r2 < 1.0
        bulge = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))
        depth = np.where(inside, 3.0 - 0.4 * bulge, 5.0).astype(np.float32)
        n = np.stack([u, v, -bulge], axis=-1)
        n = np.where(inside[..., None], n / np.linalg.norm(n, axis=-1, keepdims=True).clip(1e-6), [0.0, 0.0, -1.0])
        iuv = np.where(inside[..., None], np.stack([np.full_like(u, 1 / 24), (u + 1) / 2, (v + 1) / 2], -1), 0.0)
        shade = (0.5 + 0.5 * bulge)[..., None]
        img = alpha[..., None] * body * shade + (1 - alpha[..., None]) * backdrop
        kp2d = np.stack([cx + _OFFSETS[:, 0] * rx, cy + _OFFSETS[:, 1] * ry], axis=1)
        kp3d = np.concatenate([(kp2d - [width / 2, height / 2]) * 3.0 / focal, np.full((K, 1), 3.0)], axis=1)
        out["frames"].append(img.clip(0, 255).astype(np.uint8))
        out["depth"].append(depth)
        out["normals"].append(n.astype(np.float32))
        out["alpha"].append(alpha.astype(np.float32))
        out["iuv"].append(iuv.astype(np.float32))
        out["kp2d"].append(kp2d.astype(np.float32))
        out["kp3d"].append((kp3d - kp3d[:1]).astype(np.float32))
    return {k: np.stack(v) for k, v in out.items()}


def write_blob_set(root: str | Path, clips: int, seed: int = 0, frames: int = 9, height: int = 64,
                   width: int = 64) -> Path:
    """ROOT/<clip>/video.mp4 + <task>.npz + camera.json, as the renderer lays them out."""
    root = Path(root)
    names = np.asarray(SMPL_JOINTS, dtype=np.str_)
    for i in range(clips):
        d = root / f"clip_{i:04d}"
        d.mkdir(parents=True, exist_ok=True)
        c = blob_clip(seed * 1000 + i, frames, height, width)
        encode_video(c["frames"], d / "video.mp4", fps=24.0, crf=10)
        np.savez(d / "depth.npz", depth=c["depth"])
        np.savez(d / "normals.npz", normals=c["normals"])
        np.savez(d / "segmentation.npz", alpha=c["alpha"])
        np.savez(d / "densepose.npz", iuv=c["iuv"])
        np.savez(d / "keypoints2d.npz", keypoints=c["kp2d"], visibility=np.ones(c["kp2d"].shape[:2], np.float32),
                 joint_names=names)
        np.savez(d / "keypoints3d.npz", keypoints=c["kp3d"], joint_names=names)
        (d / "camera.json").write_text(json.dumps({"fx": float(width), "fy": float(width), "cx": width / 2,
                                                   "cy": height / 2}))
    return root
