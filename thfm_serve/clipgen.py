"""The one synthetic clip generator: a person-like figure walking over a textured, lit background,
and a test pattern whose markers survive lossy encoding (orientation, colour order, frame order).

A jointed figure (head, torso, limbs as shaded capsules) walks and swings its arms, with random
clothing colours, size, position, speed and camera pan, over a background of gradients, sinusoid
texture, a floor plane and boxes, with a little sensor noise. It is not a real video, but it has
what random noise lacks for a perception model: a person-shaped foreground, coherent motion across
frames, smooth shading and edges, so latent statistics are image-like and a video encoder does real
work. The same seed gives the same pixels.

Used for int8 calibration (export/calibration.py), the demo clip (scripts/demo.sh through
`python -m thfm_serve.client.democlip`), perf_analyzer's input data (`thfm perf`) and the
benchmarks. The test pattern (`pattern`, written by `make_clip` with any codec, rotation metadata,
variable frame rate or an audio track) is what the tests decode and check. numpy and PyAV only: no torch.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ShapeError

# Bump when the generator's pixels change: int8 manifests key on it (export/calibration.py).
RECIPE = "procedural-walkers-v1"

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


def walking_clips(count: int, frames: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """`count` uint8 clips [frames, height, width, 3] of a walking figure; same seed, same clips."""
    if frames < 1 or height < 1 or width < 1:
        raise ShapeError(f"a generated clip needs at least 1 frame of 1x1 pixels, got {frames}x{height}x{width}")
    rng = np.random.default_rng(seed)
    return [_clip(rng, frames, height, width) for _ in range(count)]


def walking_clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """One clip of walking_clips: uint8 [frames, height, width, 3]."""
    return walking_clips(1, frames, height, width, seed)[0]


# --- the test pattern ---------------------------------------------------------------------------
# Each frame: a dark background, a static red block in the top-left corner (orientation) and a green
# block that moves one step right per frame (frame order). Blocks are aligned to 8 pixels so that
# codecs reproduce them almost exactly.

BLOCK = 8



def encoder_available(name: str) -> bool:
    """Whether PyAV's bundled FFmpeg has an *encoder* of this name (codecs_available also lists
    decoder-only codecs)."""
    import av

    try:
        av.Codec(name, "w")
    except Exception:
        return False
    return True


def green_column(i: int, width: int) -> int:
    """Left column of the moving green block in frame i (before any rotation)."""
    span = max(1, (width - 2 * BLOCK) // BLOCK)
    return BLOCK * (1 + i % span)


def pattern(i: int, height: int, width: int) -> np.ndarray:
    """Frame i of the test pattern, uint8 [height, width, 3] RGB, as stored (not rotated)."""
    img = np.full((height, width, 3), 24, dtype=np.uint8)
    img[: 2 * BLOCK, : 2 * BLOCK] = (230, 30, 30)  # red, top-left: orientation marker
    x = green_column(i, width)
    top = (height // 2 // BLOCK) * BLOCK
    img[top : top + BLOCK, x : x + BLOCK] = (30, 230, 30)  # green, moves right: frame order
    return img


def make_clip(
    path: str | Path,
    frames: int = 8,
    height: int = 48,
    width: int = 64,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    fps: float = 24,
    audio: bool = False,
    rotation: float | tuple[float, bool, bool] | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction = Fraction(1, 1000),
    options: dict[str, str] | None = None,
    source: np.ndarray | None = None,
) -> np.ndarray:
    """Write a clip of the test pattern (or of `source`, uint8 [F, H, W, 3] as stored) and return its
    source frames [F, H, W, 3].

    rotation: counter-clockwise degrees, or (degrees, hflip, vflip), written as the display
    matrix (what phones write). pts: per-frame timestamps in units of time_base, for variable
    frame rate; by default frame i is at i / fps. audio: add an AAC (mp4/mov/mkv) or Opus (webm)
    sine track.
    """
    import av

    path = Path(path)
    if source is not None:
        src = np.ascontiguousarray(source, dtype=np.uint8)
        frames, height, width = src.shape[:3]
    else:
        src = np.stack([pattern(i, height, width) for i in range(frames)]) if frames else None
    container = av.open(str(path), mode="w")
    try:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        opts = dict(options or {})
        if codec == "libx265":
            opts.setdefault("x265-params", "log-level=error")
        if codec.startswith("libvpx"):
            # Fast settings: the default 'good' deadline makes even tiny clips take a while.
            opts.setdefault("deadline", "realtime")
            opts.setdefault("cpu-used", "8")
        stream.options = opts
        if pts is not None:
            assert len(pts) == frames
            stream.codec_context.time_base = time_base
        if rotation is not None:
            deg, hflip, vflip = rotation if isinstance(rotation, tuple) else (rotation, False, False)
            stream.set_display_rotation(deg, hflip=hflip, vflip=vflip)
        astream = None
        if audio:
            acodec = "libopus" if path.suffix == ".webm" else "aac"
            astream = container.add_stream(acodec, rate=48000, layout="mono")
        container.start_encoding()  # writes the header even when no frame follows

        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(src[i], format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[i]), time_base
            else:
                frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

        if astream is not None:
            duration = (frames or 1) / float(fps)
            n = int(duration * 48000)
            t = np.arange(n) / 48000.0
            samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            chunk = astream.codec_context.frame_size or 960
            for start in range(0, n, chunk):
                part = samples[start : start + chunk]
                if len(part) < chunk:
                    part = np.pad(part, (0, chunk - len(part)))
                aframe = av.AudioFrame.from_ndarray(part[None, :], format="flt", layout="mono")
                aframe.sample_rate, aframe.pts = 48000, start
                aframe.time_base = Fraction(1, 48000)
                for packet in astream.encode(aframe):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    finally:
        container.close()
    return src


def make_audio_only(path: str | Path, seconds: float = 0.2) -> None:
    """A WAV (or any audio container by extension) with a sine tone and no video stream."""
    import av

    container = av.open(str(path), mode="w")
    try:
        stream = container.add_stream("pcm_s16le", rate=16000, layout="mono")
        n = int(seconds * 16000)
        tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(tone[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
