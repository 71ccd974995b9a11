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

from pathlib import Path

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
    from thfm_serve.clipgen import make_clip

    stored = np.ascontiguousarray(np.rot90(frames, k=-(rotation // 90), axes=(1, 2)))
    make_clip(path, codec="libx264rgb", pix_fmt="rgb24", fps=fps, rotation=rotation or None, pts=pts_ms,
              options={"qp": "0"}, source=stored)


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


# --- the same stand-ins as ONNX graphs, for a real tritonserver ---------------------------------
# The served models exchange a latent [B, 16, T', H/8, W/8], far too small to carry a clip, so the
# served stand-ins measure what they need on the model grid inside the "encoder" and pack those few
# numbers into the latent: per frame, the three channel centroids (keypoints) and the first and
# second moments of channel 0 (the matte). The "decoder" draws a Gaussian with those moments, whose
# centre of mass is the matte's, at the model grid; the "core" unpacks the centroids into the
# marked joints. Everything between these graphs is the engine's own processing.

FEATURES = 12  # per frame: 3 x (cx, cy), then mass, mean x, mean y, var xx, var yy, cov xy


def _features(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] in [-1, 1] -> [B, T, FEATURES], normalised coordinates."""
    w = ((video + 1) / 2).clamp_min(0).permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W]
    h, wd = w.shape[-2:]
    xs = ((torch.arange(wd, dtype=torch.float32) + 0.5) / wd).reshape(1, 1, 1, 1, wd)
    ys = ((torch.arange(h, dtype=torch.float32) + 0.5) / h).reshape(1, 1, 1, h, 1)
    mass = w.sum(dim=(-1, -2)).clamp_min(1e-9)  # [B, T, 3]
    cx = (w * xs).sum(dim=(-1, -2)) / mass
    cy = (w * ys).sum(dim=(-1, -2)) / mass
    a, m0 = w[:, :, 0], mass[:, :, 0]
    dx, dy = xs[:, :, 0] - cx[:, :, 0, None, None], ys[:, :, 0] - cy[:, :, 0, None, None]
    vxx = (a * dx * dx).sum(dim=(-1, -2)) / m0
    vyy = (a * dy * dy).sum(dim=(-1, -2)) / m0
    vxy = (a * dx * dy).sum(dim=(-1, -2)) / m0
    cents = torch.stack([cx, cy], -1).flatten(2)  # [B, T, 6]
    return torch.cat([cents, torch.stack([m0 / (h * wd), cx[:, :, 0], cy[:, :, 0], vxx, vyy, vxy], -1)], -1)


class PackingEncoder(torch.nn.Module):
    """Frame t's features go to latent frame ceil(t / 4), as the Wan VAE maps frames to latent frames
    (frame 0 alone, then groups of 4), so that cropping the latent in time keeps the right frames."""

    def __init__(self, latent_shape: tuple[int, int, int, int]):
        super().__init__()
        self.latent_shape = latent_shape  # (16, T', h, w)

    def forward(self, video):
        f = _features(video)  # [B, T, FEATURES]
        b, lt, slot = f.shape[0], self.latent_shape[1], int(np.prod(self.latent_shape)) // self.latent_shape[1]
        first = torch.cat([f[:, :1].flatten(1), torch.zeros(b, slot - FEATURES)], 1)
        rest = f[:, 1:].reshape(b, lt - 1, 4 * FEATURES)
        rest = torch.cat([rest, torch.zeros(b, lt - 1, slot - 4 * FEATURES)], 2)
        packed = torch.cat([first[:, None], rest], 1)  # [B, T', slot]
        c, _, h, w = self.latent_shape
        return packed.reshape(b, lt, c, h, w).permute(0, 2, 1, 3, 4)


def _unpack(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, T', h, w] -> [B, 4 (T' - 1) + 1, FEATURES]."""
    b, lt = latent.shape[0], latent.shape[2]
    x = latent.permute(0, 2, 1, 3, 4).reshape(b, lt, -1)
    return torch.cat([x[:, :1, :FEATURES], x[:, 1:, : 4 * FEATURES].reshape(b, -1, FEATURES)], 1)


class PackedCore(torch.nn.Module):
    def __init__(self, num_joints: int):
        super().__init__()
        sel2 = torch.zeros(6, num_joints * 2)
        sel3 = torch.zeros(6, num_joints * 3)
        bias3 = torch.zeros(num_joints * 3)
        for c, j in enumerate(MARKED_IDX):
            sel2[2 * c, 2 * j] = sel2[2 * c + 1, 2 * j + 1] = 1.0
            sel3[2 * c, 3 * j] = sel3[2 * c + 1, 3 * j + 1] = 1.0
            bias3[3 * j + 2] = float(c)
        self.register_buffer("sel2", sel2)
        self.register_buffer("sel3", sel3)
        self.register_buffer("bias3", bias3)

    def forward(self, latent, text):
        c = _unpack(latent)[..., :6]  # [B, T, 6]
        kp2d = (c @ self.sel2).reshape(c.shape[0], c.shape[1], -1, 2)
        kp3d = (c @ self.sel3 + self.bias3).reshape(c.shape[0], c.shape[1], -1, 3)
        return latent + 0.0 * text.sum(), kp2d, kp3d  # the text input is part of the contract


class GaussianDecoder(torch.nn.Module):
    def __init__(self, height: int, width: int):
        super().__init__()
        self.height, self.width = height, width

    def forward(self, latent):
        f = _unpack(latent)  # [B, T, FEATURES]
        mx, my = f[..., 7, None, None], f[..., 8, None, None]
        vxx, vyy, vxy = f[..., 9, None, None], f[..., 10, None, None], f[..., 11, None, None]
        xs = ((torch.arange(self.width, dtype=torch.float32) + 0.5) / self.width).reshape(1, 1, 1, -1)
        ys = ((torch.arange(self.height, dtype=torch.float32) + 0.5) / self.height).reshape(1, 1, -1, 1)
        dx, dy = xs - mx, ys - my
        # Half the matte's spread, so the blob stays inside the frame and its centre of mass is its mean.
        det = (vxx * vyy - vxy * vxy).clamp_min(1e-12) * 0.25
        q = (0.5 * vyy * dx * dx - vxy * dx * dy + 0.5 * vxx * dy * dy) / det
        g = torch.exp(-0.5 * q)  # [B, T, H, W]
        return g.unsqueeze(1).expand(-1, 3, -1, -1, -1)


def export_standins(repo: Path, window: int, height: int, width: int, num_joints: int) -> None:
    """Replace the repository's vae_encoder, core and vae_decoder graphs with the stand-ins."""
    import torch.onnx

    from thfm_serve.config import latent_frames

    lt = latent_frames(window)
    import onnx

    latent = torch.zeros(1, 16, lt, height // 8, width // 8)
    # The text input keeps the exported core's shape (the checkpoint's text_len x text_dim).
    core_graph = onnx.load(str(repo / "core" / "1" / "model.onnx"), load_external_data=False)
    dims = [d.dim_value for d in core_graph.graph.input[1].type.tensor_type.shape.dim]
    text_shape = (1, dims[1], dims[2])
    jobs = [
        ("vae_encoder", PackingEncoder((16, lt, height // 8, width // 8)), (torch.zeros(1, 3, window, height, width),),
         ["video"], ["latent"]),
        ("core", PackedCore(num_joints), (latent, torch.zeros(text_shape)), ["latent", "text"],
         ["pred_latent", "kp2d", "kp3d"]),
        ("vae_decoder", GaussianDecoder(height, width), (latent,), ["latent"], ["maps"]),
    ]
    for name, module, args, ins, outs in jobs:
        folder = repo / name / "1"
        for old in folder.glob("model.onnx*"):
            old.unlink()
        # batch, and (latent or keypoint) frames, vary as they do for the real graphs
        axes = {n: {0: "batch"} for n in ins + outs}
        for n in ("pred_latent", "kp2d", "kp3d") if name == "core" else ():
            axes[n][1 if n != "pred_latent" else 2] = "time"
        if name == "core":
            axes["latent"][2] = "time"
        torch.onnx.export(module.eval(), args, str(folder / "model.onnx"), input_names=ins, output_names=outs,
                          dynamic_axes=axes, opset_version=17, dynamo=False)
