"""Stand-ins for THFM's networks whose right answer is known, for checking the pre/post-processing
(resize to the model grid and back, rotation, frame order, windows, keypoint coordinates) against the
synthetic renderer's ground truth.

The networks (VAE encoder, core, VAE decoder) are replaced by:
- dense tasks: identity. The input video *is* a ground-truth map encoded as the model's decoder
  would produce it (alpha as grey, (n + 1) / 2 for normals, the log-squashed depth, IUV), so the
  engine's output must equal the ground truth up to resampling;
- keypoints: a blob finder. The video shows one Gaussian blob per colour channel, centred on three
  ground-truth joints; the stand-in reports each channel's intensity centroid on the model grid, in
  the normalised coordinates the real keypoint heads emit ((column + 0.5) / width), as the 2D joint,
  and (x, y, channel) as the 3D joint, so that frame order shows in the 3D output too.

A mistake in the shared processing (a transposed resize, a half-pixel offset, a rotation the wrong
way, frames stitched out of order) moves these outputs away from the ground truth.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from thfm_serve.config import SMPL_JOINTS

# The joints the keypoint video marks, one per colour channel (R, G, B).
MARKED = ("neck", "left_wrist", "right_knee")
MARKED_IDX = [SMPL_JOINTS.index(n) for n in MARKED]
BLOB_SIGMA = 2.0  # pixels


# --- the stand-in networks (torch, in-process) --------------------------------------------------


def centroids(clip: torch.Tensor) -> torch.Tensor:
    """clip [N, 3, T, H, W] in [-1, 1] -> [N, T, 3, 2] normalised (x, y) intensity centroids per
    channel, pixel centres at (j + 0.5) / W."""
    w = ((clip + 1) / 2).clamp_min(0).permute(0, 2, 1, 3, 4)  # [N, T, 3, H, W]
    h, wd = w.shape[-2:]
    xs = (torch.arange(wd, dtype=w.dtype) + 0.5) / wd
    ys = (torch.arange(h, dtype=w.dtype) + 0.5) / h
    total = w.sum(dim=(-1, -2)).clamp_min(1e-9)
    cx = (w * xs).sum(dim=(-1, -2)) / total
    cy = (w * ys[:, None]).sum(dim=(-1, -2)) / total
    return torch.stack([cx, cy], -1)


class OracleEncoder(torch.nn.Module):
    def forward(self, clip):  # [1, 3, T, H, W] -> the "latent" is the clip itself
        return clip


class OracleCore(torch.nn.Module):
    def __init__(self, num_joints: int = len(SMPL_JOINTS)):
        super().__init__()
        self.num_joints = num_joints

    def forward(self, latent, text):
        n, _, t = latent.shape[:3]
        c = centroids(latent)  # [N, T, 3, 2]
        kp2d = torch.zeros(n, t, self.num_joints, 2)
        kp3d = torch.zeros(n, t, self.num_joints, 3)
        kp2d[:, :, MARKED_IDX] = c
        kp3d[:, :, MARKED_IDX, :2] = c
        kp3d[:, :, MARKED_IDX, 2] = torch.arange(3, dtype=torch.float32)
        return latent, kp2d, kp3d


class OracleDecoder(torch.nn.Module):
    def forward(self, pred):  # [n, 3, T, H, W] in [-1, 1] -> maps in [0, 1]
        return (pred + 1) / 2


def oracle_pipeline(pipe):
    """A ThfmPipeline with its networks swapped for the stand-ins (everything else untouched)."""
    pipe.encoder, pipe.core, pipe.decoder = OracleEncoder(), OracleCore(pipe.cfg.num_joints), OracleDecoder()
    return pipe


# --- videos that encode the ground truth --------------------------------------------------------


def encode_map(task: str, clip, depth_log_scale: float, depth_unit: float) -> np.ndarray:
    """The ground-truth map of `task` as uint8 frames [F, H, W, 3], encoded as the model's decoder
    output would be (processing.dense_output inverts these)."""
    if task == "segmentation":
        m = np.repeat(clip.alpha[..., None], 3, -1)
    elif task == "normals":
        m = (clip.normals + 1) / 2
    elif task == "depth":
        m = np.repeat(np.clip(depth_log_scale * np.log1p(clip.depth / depth_unit), 0, 1)[..., None], 3, -1)
    elif task == "densepose":
        m = clip.iuv
    else:
        raise ValueError(task)
    return np.round(np.clip(m, 0, 1) * 255).astype(np.uint8)


def blob_frames(clip) -> np.ndarray:
    """uint8 [F, H, W, 3]: black, with a Gaussian blob per channel on the MARKED joints' 2D positions."""
    f, h, w = clip.alpha.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, the renderer's convention
    out = np.zeros((f, h, w, 3))
    for c, j in enumerate(MARKED_IDX):
        x, y = clip.keypoints2d[:, j, 0], clip.keypoints2d[:, j, 1]
        d2 = (xs[None] - x[:, None, None]) ** 2 + (ys[None] - y[:, None, None]) ** 2
        out[..., c] = np.exp(-d2 / (2 * BLOB_SIGMA**2))
    return np.round(out * 255).astype(np.uint8)


def write_video(frames: np.ndarray, path: str | Path, fps: float = 24.0, rotation: int = 0,
                pts_ms: list[int] | None = None) -> None:
    """Lossless H.264 in RGB (libx264rgb, qp 0: no colour conversion that would leak one channel's
    blob into another) of frames as a player should show them. rotation: the
    display matrix in counter-clockwise degrees (the stored pixels are turned the other way, as a
    phone stores them); pts_ms: per-frame timestamps in milliseconds (variable frame rate)."""
    stored = np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2)))
    container = av.open(str(path), mode="w")
    try:
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = stored.shape[1:3]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0"}
        tb = Fraction(1, 1000)
        if pts_ms is not None:
            stream.codec_context.time_base = tb
        if rotation:
            stream.set_display_rotation(rotation)
        for i, rgb in enumerate(stored):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = int(pts_ms[i]), tb
            else:
                frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


# --- comparisons --------------------------------------------------------------------------------


def interior(part: np.ndarray, radius: int = 1) -> np.ndarray:
    """Pixels whose (2r+1)^2 neighbourhood holds one part label (resampling blends across edges)."""
    f, h, w = part.shape
    pad = np.pad(part, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    same = np.ones(part.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= pad[:, dy:dy + h, dx:dx + w] == part
    return same
