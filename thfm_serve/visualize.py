"""Pictures of the results that people want to look at: one MP4 and one contact-sheet PNG per task.

Used by `thfm predict --pictures` on both paths (in-process and through Triton), so it takes the
same `{task: {key: array}}` results that `<task>.npz` holds, plus the input frames for overlays.

* depth: a colormap (inferno, near = bright), scaled by the clip's 2nd..98th percentiles so the
  colours mean the same depth in every frame (per-frame scaling would flicker);
* normals: the usual RGB coding (x, y, z in [-1, 1] -> [0, 255]);
* segmentation: the input frames composited with the alpha matte over a checkerboard, so both
  the matte's holes and its soft edges show;
* densepose: the IUV map as RGB;
* keypoints2d: the SMPL-24 skeleton drawn over the input frames;
* keypoints3d: a 3D skeleton plot (matplotlib, Agg) with axes fixed over the clip.

MP4s are H.264 4:2:0 (padded to even sizes) so that browsers and phones play them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .errors import ShapeError

logger = logging.getLogger(__name__)

# SMPL's kinematic tree (24 joints) as bones between joint names; the names come with every keypoint
# result (joint_names), so a checkpoint with another joint set still gets its points drawn, and its
# bones wherever the names match.
SMPL_BONES = (
    ("pelvis", "left_hip"), ("pelvis", "right_hip"), ("pelvis", "spine1"),
    ("left_hip", "left_knee"), ("right_hip", "right_knee"), ("spine1", "spine2"),
    ("left_knee", "left_ankle"), ("right_knee", "right_ankle"), ("spine2", "spine3"),
    ("left_ankle", "left_foot"), ("right_ankle", "right_foot"), ("spine3", "neck"),
    ("spine3", "left_collar"), ("spine3", "right_collar"), ("neck", "head"),
    ("left_collar", "left_shoulder"), ("right_collar", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("right_shoulder", "right_elbow"),
    ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
    ("left_wrist", "left_hand"), ("right_wrist", "right_hand"),
)
# Left limbs blue, right limbs orange, the spine/head green: the usual convention, and it makes a
# left/right swap visible at a glance.
_LEFT, _RIGHT, _CENTRE = (66, 135, 245), (245, 130, 48), (60, 200, 90)

PICTURE_TASKS = ("depth", "normals", "segmentation", "densepose", "keypoints2d", "keypoints3d")


def _side_colour(a: str, b: str) -> tuple[int, int, int]:
    names = a + b
    if "left" in names:
        return _LEFT
    if "right" in names:
        return _RIGHT
    return _CENTRE


def bones_for(joint_names) -> list[tuple[int, int, tuple[int, int, int]]]:
    """(i, j, colour) for each SMPL bone whose two joints are in joint_names."""
    index = {str(n): i for i, n in enumerate(joint_names)}
    return [(index[a], index[b], _side_colour(a, b)) for a, b in SMPL_BONES if a in index and b in index]


# --- dense maps -----------------------------------------------------------------------------------


def depth_to_rgb(depth: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """[F, H, W] relative depth -> uint8 [F, H, W, 3]; near is bright."""
    from matplotlib import colormaps

    depth = _check(depth, 3, "depth")
    finite = depth[np.isfinite(depth)]
    lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
    span = hi - lo if hi > lo else 1.0
    t = np.clip((hi - np.nan_to_num(depth, nan=hi)) / span, 0.0, 1.0)  # near (small depth) -> 1
    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return lut[(t * 255).round().astype(np.uint8)]


def normals_to_rgb(normals: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] unit normals -> uint8 RGB (x, y, z in [-1, 1] mapped to [0, 255])."""
    normals = _check(normals, 4, "normals")
    return (np.clip(np.nan_to_num(normals) * 0.5 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)


def densepose_to_rgb(iuv: np.ndarray) -> np.ndarray:
    """[F, H, W, 3] IUV in [0, 1] -> uint8 RGB."""
    iuv = _check(iuv, 4, "densepose")
    return (np.clip(np.nan_to_num(iuv), 0.0, 1.0) * 255).round().astype(np.uint8)


def checkerboard(height: int, width: int, square: int | None = None) -> np.ndarray:
    """uint8 [H, W, 3] grey checkerboard, the conventional 'transparent' background."""
    square = square or max(4, min(height, width) // 16)
    yy, xx = np.mgrid[0:height, 0:width]
    light = ((yy // square + xx // square) % 2).astype(bool)
    board = np.where(light, 200, 150).astype(np.uint8)
    return np.repeat(board[..., None], 3, axis=-1)


def alpha_over_checkerboard(alpha: np.ndarray, frames: np.ndarray | None = None) -> np.ndarray:
    """[F, H, W] matte in [0, 1] -> uint8 [F, H, W, 3]: the frames (white without frames) where the
    matte is 1, the checkerboard where it is 0."""
    alpha = _check(alpha, 3, "segmentation")
    f, h, w = alpha.shape
    a = np.clip(np.nan_to_num(alpha), 0.0, 1.0)[..., None]
    board = checkerboard(h, w).astype(np.float32)
    fg = np.full((h, w, 3), 255, np.float32) if frames is None else _match(frames, f, h, w).astype(np.float32)
    out = np.empty((f, h, w, 3), np.uint8)
    for i in range(f):  # per frame: keeps the float temporaries one frame big
        fi = fg if frames is None else fg[i]
        out[i] = (fi * a[i] + board * (1.0 - a[i])).round().astype(np.uint8)
    return out


# --- keypoints ------------------------------------------------------------------------------------


def draw_skeleton2d(frames: np.ndarray, keypoints: np.ndarray, joint_names) -> np.ndarray:
    """Draw the skeleton of keypoints [F, K, 2] (input pixels, x then y) over frames [F, H, W, 3]."""
    from PIL import Image, ImageDraw

    keypoints = _check(keypoints, 3, "keypoints2d")
    frames = _check(frames, 4, "frames")
    if keypoints.shape[0] != frames.shape[0]:
        raise ShapeError(f"keypoints2d has {keypoints.shape[0]} frames, the video {frames.shape[0]}")
    _, h, w, _ = frames.shape
    bones = bones_for(joint_names)
    # Line widths and dots scale with the picture so a 4K frame does not get hairlines.
    width = max(1, round(min(h, w) / 120))
    radius = max(1, round(min(h, w) / 100))
    out = np.empty_like(frames)
    for i in range(frames.shape[0]):
        img = Image.fromarray(frames[i])
        draw = ImageDraw.Draw(img)
        pts = keypoints[i]
        ok = np.isfinite(pts).all(axis=-1)
        for a, b, colour in bones:
            if ok[a] and ok[b]:
                draw.line([tuple(pts[a]), tuple(pts[b])], fill=colour, width=width)
        for j, (x, y) in enumerate(pts):
            if ok[j]:
                draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255),
                             outline=(0, 0, 0))
        out[i] = np.asarray(img)
    return out


def render_keypoints3d(keypoints: np.ndarray, joint_names, size: int = 384) -> np.ndarray:
    """3D skeleton plots of keypoints [F, K, 3] (metres, camera axes: x right, y down, z forward)
    -> uint8 [F, size, size, 3]. The axes are fixed over the clip so motion reads as motion."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display on servers; a no-op when already Agg
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    keypoints = _check(keypoints, 3, "keypoints3d")
    if keypoints.shape[-1] != 3:
        raise ShapeError(f"keypoints3d must be [F, K, 3], got {list(keypoints.shape)}")
    # Plot x right, z (depth) into the screen, -y up: camera coordinates have y pointing down.
    p = np.nan_to_num(keypoints.astype(np.float64))
    xyz = np.stack([p[..., 0], p[..., 2], -p[..., 1]], axis=-1)
    centre = (xyz.reshape(-1, 3).max(0) + xyz.reshape(-1, 3).min(0)) / 2
    half = max(float(np.abs(xyz.reshape(-1, 3) - centre).max()), 1e-3) * 1.05
    bones = bones_for(joint_names)

    dpi = 100
    fig = Figure(figsize=(size / dpi, size / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111, projection="3d")
    fig.subplots_adjust(0, 0, 1, 1)
    ax.set_xlim(centre[0] - half, centre[0] + half)
    ax.set_ylim(centre[1] - half, centre[1] + half)
    ax.set_zlim(centre[2] - half, centre[2] + half)
    ax.set_xlabel("x (m)")
    ax.set_ylabel("z (m)")
    ax.set_zlabel("up (m)")
    ax.view_init(elev=15, azim=-70)
    # Artists are created once and updated per frame: redrawing only changes their data, which is
    # several times faster than rebuilding the axes.
    lines = [ax.plot([], [], [], color=np.array(c) / 255.0, linewidth=2)[0] for _, _, c in bones]
    dots = ax.plot([], [], [], "o", color="black", markersize=3)[0]
    out = np.empty((len(xyz), size, size, 3), np.uint8)
    for i, pts in enumerate(xyz):
        for line, (a, b, _) in zip(lines, bones):
            line.set_data_3d(pts[[a, b], 0], pts[[a, b], 1], pts[[a, b], 2])
        dots.set_data_3d(pts[:, 0], pts[:, 1], pts[:, 2])
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        out[i] = rgba[:size, :size, :3]
    return out


# --- sheets and files -----------------------------------------------------------------------------


def contact_sheet(frames: np.ndarray, count: int = 8, columns: int = 4, tile_width: int = 320) -> np.ndarray:
    """Evenly spaced frames in a grid with their frame numbers -> uint8 [H, W, 3]."""
    from PIL import Image, ImageDraw

    frames = _check(frames, 4, "frames")
    n = frames.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    _, h, w, _ = frames.shape
    tw = min(tile_width, w)
    th = max(1, round(h * tw / w))
    cols = min(columns, len(idx))
    rows = -(-len(idx) // cols)
    gap = 4
    sheet = Image.new("RGB", (cols * tw + (cols + 1) * gap, rows * th + (rows + 1) * gap), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(idx):
        tile = Image.fromarray(frames[i]).resize((tw, th), Image.BILINEAR)
        x = gap + (k % cols) * (tw + gap)
        y = gap + (k // cols) * (th + gap)
        sheet.paste(tile, (x, y))
        label = f"{i}"
        draw.rectangle([x, y, x + 7 * len(label) + 6, y + 13], fill=(0, 0, 0))
        draw.text((x + 3, y + 1), label, fill=(255, 255, 255))
    return np.asarray(sheet)


def task_pictures(task: str, arrays: dict[str, np.ndarray], frames: np.ndarray | None) -> np.ndarray:
    """The frames [F, H, W, 3] uint8 that picture one task's result."""
    if task == "depth":
        return depth_to_rgb(arrays["depth"])
    if task == "normals":
        return normals_to_rgb(arrays["normals"])
    if task == "segmentation":
        return alpha_over_checkerboard(arrays["alpha"], frames)
    if task == "densepose":
        return densepose_to_rgb(arrays["iuv"])
    names = [str(n) for n in arrays.get("joint_names", [])]
    if task == "keypoints2d":
        if frames is None:
            raise ShapeError("keypoints2d pictures need the input frames to draw on")
        return draw_skeleton2d(frames, arrays["keypoints"], names)
    if task == "keypoints3d":
        return render_keypoints3d(arrays["keypoints"], names)
    raise ShapeError(f"no picture for task {task!r}")


def write_pictures(
    results: dict[str, dict[str, np.ndarray]],
    out_dir: str | Path,
    frames: np.ndarray | None = None,
    fps: float = 24.0,
) -> list[Path]:
    """Write `<task>.mp4` and `<task>.png` (contact sheet) per task into out_dir; returns the paths."""
    from PIL import Image

    from .video import encode_video

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fps = fps if fps and np.isfinite(fps) and fps > 0 else 24.0
    paths = []
    for task, arrays in results.items():
        pics = task_pictures(task, arrays, frames)
        mp4, png = out / f"{task}.mp4", out / f"{task}.png"
        encode_video(_even(pics), mp4, fps=fps, codec="libx264", crf=20)
        Image.fromarray(contact_sheet(pics)).save(png)
        paths += [mp4, png]
        logger.debug("pictures for %s: %s, %s", task, mp4, png)
        del pics
    return paths


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad to even height/width (edge pixels repeated): 4:2:0 H.264, which every player plays, needs
    even sizes, and encode_video would otherwise fall back to 4:4:4."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _match(frames: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
    frames = _check(frames, 4, "frames")
    if frames.shape[:3] != (f, h, w):
        raise ShapeError(f"frames {list(frames.shape[:3])} do not match the result {[f, h, w]}")
    return frames


def _check(a: np.ndarray, ndim: int, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim or a.shape[0] < 1:
        raise ShapeError(f"{name}: expected a {ndim}-d array with at least one frame, got shape {list(a.shape)}")
    return a
