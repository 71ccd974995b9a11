"""Tiny synthetic clips for tests, written with PyAV (no ffmpeg binary needed).

Each frame shows a recognisable pattern so orientation, colour order and frame order can be
checked after a lossy round trip: a dark background, a static red block in the top-left corner
(orientation) and a green block that moves one step right per frame (frame order). Blocks are
aligned to 8 pixels so that codecs reproduce them almost exactly.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

BLOCK = 8


def encoder_available(name: str) -> bool:
    """Whether PyAV's bundled FFmpeg has an *encoder* of this name (codecs_available also lists
    decoder-only codecs)."""
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
