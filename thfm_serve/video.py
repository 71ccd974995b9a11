"""Video decoding and encoding over PyAV.

One module serves three callers: the in-process pipeline (reads a path), the Triton preprocess
model (receives the encoded video as bytes) and the gRPC client (encodes frames to send a compact
mp4). All of them want the same thing from a decode: every frame of the first video stream as
uint8 RGB in the orientation a player would show, with its timestamp, or a VideoError whose
message names the problem and the input. No PyAV exception may reach a caller.

Rotation: phones store portrait video as landscape pixels plus a display matrix. FFmpeg's CLI
("autorotate") and every player apply that matrix, so we do too; otherwise a model sees people
lying on their side. The matrix is read from the decoded frame's side data (PyAV exposes the
stream-level matrix on each frame) and applied with numpy transposes/flips, matching the filters
ffmpeg's autorotate inserts, flips included.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import av
import av.sidedata.sidedata
import numpy as np

from .errors import ShapeError, ThfmError, VideoError

logger = logging.getLogger(__name__)

__all__ = ["Video", "read_video", "decode_video_bytes", "encode_video", "probe_video"]

# Errors PyAV raises. FFmpegError is PyAV's base for libav* failures; OSError / ValueError cover
# file-object problems and the odd metadata that does not decode as UTF-8.
_AV_ERRORS = (av.FFmpegError, OSError, ValueError)

# Demuxers that read a still image. FFmpeg happily opens a PNG or JPEG as a one-frame "video",
# which would silently run a video model on a photo; the user almost certainly passed the wrong
# file, so we refuse it. The *_pipe demuxers (png_pipe, jpeg_pipe, webp_pipe, bmp_pipe, ...)
# are image probes by construction; image2 is the sequence-of-images demuxer chosen by extension.
_IMAGE_DEMUXERS = frozenset({"image2", "image2pipe"})

_DISPLAYMATRIX = av.sidedata.sidedata.Type.DISPLAYMATRIX


@dataclass(frozen=True)
class Video:
    """A decoded video.

    frames: uint8 [F, H, W, 3] RGB, in displayed orientation (rotation metadata applied).
    fps: average frame rate; for variable frame rate the mean rate.
    timestamps: float64 [F], seconds of each frame (pts * time_base), in display order.
    source: the path, or "<bytes>" for decode_video_bytes.
    """

    frames: np.ndarray
    fps: float
    timestamps: np.ndarray
    source: str


# --------------------------------------------------------------------------------------------
# Opening


def _is_image_demuxer(name: str) -> bool:
    # A container format name may be a comma list ("mov,mp4,m4a,3gp,3g2,mj2").
    parts = name.split(",")
    return any(p in _IMAGE_DEMUXERS or p.endswith("_pipe") for p in parts)


def _source_name(path_or_bytes) -> str:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(path_or_bytes)


def _open(path_or_bytes, source: str):
    """Open a container and return (container, first video stream); VideoError on any failure."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        if not data:
            raise VideoError(f"{source}: video data is empty (0 bytes)")
        target = io.BytesIO(data)
    else:
        path = os.fspath(path_or_bytes)
        # Check up front: FFmpeg's own messages for these ("No such file or directory: ...") are
        # fine, but a directory opens as a confusing "Invalid data" error.
        if not os.path.exists(path):
            raise VideoError(f"{path}: file not found")
        if os.path.isdir(path):
            raise VideoError(f"{path}: is a directory, not a video file")
        if os.path.getsize(path) == 0:
            raise VideoError(f"{path}: file is empty (0 bytes)")
        target = path

    try:
        container = av.open(target, mode="r")
    except _AV_ERRORS as exc:
        if isinstance(exc, av.error.EOFError):
            raise VideoError(
                f"{source}: cannot be opened as a video: the data ends before the container "
                "header does (truncated file?)"
            ) from exc
        raise VideoError(f"{source}: cannot be opened as a video ({_reason(exc)})") from exc

    try:
        fmt = container.format.name
        if _is_image_demuxer(fmt):
            raise VideoError(
                f"{source}: is an image, not a video (detected format {fmt!r}); "
                "pass a video file (mp4, mov, mkv, webm, avi)"
            )
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError(
                f"{source}: has no video stream (streams found: {', '.join(kinds)})"
            )
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(f"{source}: no decoder available for its video codec")
        # Frame + slice threading; decoded output is identical to single-threaded decoding.
        stream.thread_type = "AUTO"
    except BaseException:
        container.close()
        raise
    return container, stream


def _reason(exc: BaseException) -> str:
    # PyAV messages look like "[Errno 1094995529] Invalid data found when processing input:
    # '/path'"; keep the FFmpeg text without the errno and the repeated file name.
    msg = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(msg)


def _frames(container, stream, packets: list[int] | None = None) -> Iterator[av.VideoFrame]:
    """Decode only the first video stream; audio and other streams are never decoded.

    packets, when given, gets packets[0] += 1 per non-empty packet read, so that a caller can
    tell an empty video stream from one whose data could not be decoded.
    """
    for packet in container.demux(stream):
        # demux() ends with an empty packet that flushes the decoder (B-frame reordering).
        if packets is not None and packet.size:
            packets[0] += 1
        yield from packet.decode()


# --------------------------------------------------------------------------------------------
# Orientation


# The display matrix's 2x2 part, as R = [[a, c], [b, d]] acting on (column, row) column vectors:
# FFmpeg maps a source pixel (x, y) to (a*x + c*y, b*x + d*y). In these image coordinates (y
# down) a quarter turn counter-clockwise is _CCW90 and a mirror left-right is _HFLIP. Every
# quarter-turn/flip matrix is _HFLIP**f @ _CCW90**k (turn first, then mirror), so we find (k, f)
# and apply np.rot90(k) then a left-right flip. This reproduces what `ffmpeg` (autorotate) shows
# for all eight orientations, and reads iPhone portrait video (rotation -90) upright.
_CCW90 = np.array([[0, 1], [-1, 0]])
_HFLIP = np.array([[-1, 0], [0, 1]])
_ORIENTATIONS = {
    (k, f): np.linalg.matrix_power(_HFLIP, f) @ np.linalg.matrix_power(_CCW90, k)
    for k in range(4)
    for f in (0, 1)
}


def _orientation(frame: av.VideoFrame) -> tuple[int, bool]:
    """(k, hflip): show the decoded frame as np.rot90(arr, k), then mirrored left-right if hflip."""
    sd = frame.side_data.get(_DISPLAYMATRIX)
    if sd is None:
        return 0, False
    m = np.frombuffer(bytes(sd), dtype="<i4")
    # 16.16 fixed point. Normalise away any scale (as av_display_rotation_get does) so that only
    # the rotation/mirror part is compared.
    r = np.array([[m[0], m[3]], [m[1], m[4]]], dtype=np.float64)
    norms = np.hypot(r[:, 0], r[:, 1])
    if np.all(norms > 0):
        r = r / norms[:, None]
    for (k, f), cand in _ORIENTATIONS.items():
        if np.allclose(r, cand, atol=1e-3):
            return k, bool(f)
    # Not a quarter turn (never written by cameras). Rotating by an arbitrary angle would invent
    # pixels; snap to the nearest quarter turn instead.
    k = int(round(frame.rotation / 90.0)) % 4
    logger.warning(
        "display matrix %s is not a quarter-turn rotation; using the nearest one (%d degrees)",
        m.tolist(), k * 90,
    )
    return k, False


def _orient(arr: np.ndarray, k: int, hflip: bool) -> np.ndarray:
    if k:
        arr = np.rot90(arr, k)  # a view; the copy happens when it is stored into the output
    if hflip:
        arr = arr[:, ::-1]
    return arr


def _rotation_degrees(k: int) -> int:
    """Counter-clockwise degrees in (-180, 180], the convention of av.VideoFrame.rotation."""
    return {0: 0, 1: 90, 2: 180, 3: -90}[k]


# --------------------------------------------------------------------------------------------
# Decoding


def _declared_frames(stream) -> int | None:
    n = int(stream.frames or 0)
    return n if n > 0 else None


def _stream_fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return None


def _frame_time(frame: av.VideoFrame) -> float | None:
    if frame.pts is None or frame.time_base is None:
        return None
    return float(frame.pts * frame.time_base)


def _decode(path_or_bytes, max_frames: int | None, max_pixels: int | None) -> Video:
    source = _source_name(path_or_bytes)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")

    container, stream = _open(path_or_bytes, source)
    with container:
        declared = _declared_frames(stream)
        # Check the size from the header before decoding anything; rechecked on the first frame,
        # whose size is authoritative.
        if max_pixels is not None and stream.width and stream.height:
            _check_pixels(source, stream.width, stream.height, max_pixels)

        buf: np.ndarray | None = None
        times: list[float | None] = []
        n = 0
        size = None  # (decoded width, decoded height) of the first frame
        k, hflip = 0, False
        rescaled = 0
        packets = [0]
        try:
            for frame in _frames(container, stream, packets):
                if buf is None:
                    size = (frame.width, frame.height)
                    if max_pixels is not None:
                        _check_pixels(source, frame.width, frame.height, max_pixels)
                    k, hflip = _orientation(frame)
                    if k or hflip:
                        logger.debug(
                            "%s: display matrix: rotating %d degrees ccw%s",
                            source, _rotation_degrees(k), ", mirroring" if hflip else "",
                        )
                    h, w = (frame.width, frame.height) if k % 2 else (frame.height, frame.width)
                    # Preallocate to the declared count (exact for mp4/mov), so the result is
                    # written once instead of listed then stacked (which doubles peak memory).
                    cap = declared or 16
                    if max_frames is not None:
                        cap = min(cap, max_frames)
                    buf = np.empty((cap, h, w, 3), dtype=np.uint8)
                if max_frames is not None and n >= max_frames:
                    # Stop right away: decoding the rest would only cost time and memory.
                    total = (
                        f"{declared} frames (declared by the container)"
                        if declared and declared > max_frames
                        else f"more than {max_frames} frames"
                    )
                    raise ShapeError(
                        f"{source}: video has {total}, above the limit max_frames={max_frames}"
                    )
                if (frame.width, frame.height) != size:
                    # Mid-stream resolution change (rare; some streams/concatenations). The limit
                    # holds for every frame, not only the first: a stream can open with a tiny frame
                    # and switch to huge ones (concatenated MPEG-TS), and each of those would be
                    # decoded and converted at full size before being scaled down.
                    if max_pixels is not None:
                        _check_pixels(source, frame.width, frame.height, max_pixels, index=n)
                    # Scale back to the first frame's size so the output stays one array.
                    if not rescaled:
                        logger.warning(
                            "%s: frame %d is %dx%d, first frame was %dx%d; rescaling to the first",
                            source, n, frame.width, frame.height, size[0], size[1],
                        )
                    rescaled += 1
                    rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                else:
                    rgb = frame.to_ndarray(format="rgb24")
                if n == buf.shape[0]:
                    # More frames than declared (or no count declared): grow geometrically.
                    cap = max(16, n * 2)
                    if max_frames is not None:
                        cap = max(n + 1, min(cap, max_frames))
                    grown = np.empty((cap,) + buf.shape[1:], dtype=np.uint8)
                    grown[:n] = buf[:n]
                    buf = grown
                buf[n] = _orient(rgb, k, hflip)
                times.append(_frame_time(frame))
                n += 1
        except _AV_ERRORS as exc:
            if n == 0:
                raise VideoError(f"{source}: cannot decode any video frame ({_reason(exc)})") from exc
            # A truncated or damaged file: the frames before the damage are still good, and
            # losing the whole request over a broken tail helps nobody. Say so loudly.
            logger.warning(
                "%s: decoding stopped after %d frame(s) (%s); returning the frames decoded so far",
                source, n, _reason(exc),
            )

        if n == 0:
            if packets[0]:
                raise VideoError(
                    f"{source}: none of its {packets[0]} video packet(s) decoded to a frame "
                    "(truncated or damaged file?)"
                )
            if declared:
                raise VideoError(
                    f"{source}: the container declares {declared} frames but none could be read "
                    "(truncated or damaged file?)"
                )
            # An incomplete first packet is dropped by the demuxer, so a file cut inside its first
            # frame looks exactly like an empty stream.
            raise VideoError(
                f"{source}: video stream contains no frames (empty, or the file is truncated)"
            )
        stream_fps = _stream_fps(stream)
        timestamps = _fill_timestamps(times, stream_fps)
        fps = _mean_fps(timestamps, stream_fps)
        _warn_if_short(source, container, stream, n, declared, timestamps, fps)
    frames = buf if n == buf.shape[0] else buf[:n].copy()
    return Video(frames=frames, fps=float(fps), timestamps=timestamps, source=source)


def _warn_if_short(source, container, stream, n, declared, timestamps, fps) -> None:
    """Warn when fewer frames came out than the header promises: a cut-off file (an interrupted
    download or upload) hits end-of-file silently, without any decode error."""
    if declared is not None:
        # Exact for mp4/mov/avi (mp4 edit lists can rarely make it high; this is only a warning).
        if n < declared:
            logger.warning(
                "%s: container declares %d frames but only %d decoded (truncated file?)",
                source, declared, n,
            )
        return
    # mkv/webm carry no frame count, only a duration. Use the stream's own duration, or the
    # container's when the video is its only stream (an audio track may legitimately run longer).
    end = None
    if stream.duration is not None and stream.time_base is not None:
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        end = start + float(stream.duration * stream.time_base)
    elif container.duration is not None and len(container.streams) == 1:
        start = container.start_time / av.time_base if container.start_time is not None else 0.0
        end = start + container.duration / av.time_base
    if end is None or not fps:
        return
    decoded_end = float(timestamps[-1]) + 1.0 / fps
    if decoded_end < end - max(2.0 / fps, 0.1):
        logger.warning(
            "%s: decoded frames end at %.3f s but the container says the video lasts until "
            "%.3f s (truncated file?); returning the %d frame(s) decoded",
            source, decoded_end, end, n,
        )


def _check_pixels(source: str, width: int, height: int, max_pixels: int, index: int | None = None) -> None:
    pixels = int(width) * int(height)
    if pixels > max_pixels:
        if index is None:
            what = f"frame size {width}x{height} = {pixels} pixels is"
        else:
            what = f"frame {index} is {width}x{height} = {pixels} pixels (the stream changes size mid-way),"
        raise ShapeError(f"{source}: {what} above the limit max_pixels={max_pixels}")


def _fill_timestamps(times: list[float | None], fps: float | None) -> np.ndarray:
    """Timestamps as float64; frames without a pts (some raw/avi streams) get one from the rate."""
    out = np.empty(len(times), dtype=np.float64)
    step = 1.0 / fps if fps else 0.0
    missing = 0
    prev = None
    for i, t in enumerate(times):
        if t is None:
            missing += 1
            t = (prev + step) if prev is not None else i * step
        out[i] = t
        prev = t
    if missing:
        logger.debug("%d frame(s) had no pts; timestamps filled from the frame rate", missing)
    return out


def _mean_fps(ts: np.ndarray, stream_fps: float | None) -> float:
    """The mean frame rate of the decoded frames.

    The container's rate is exact for constant frame rate (24000/1001, not 23.9760...), so keep
    it when the timestamps agree with it. They disagree for variable frame rate: mkv/webm report
    the nominal rate and mp4 divides by a duration that includes a guessed last-frame duration;
    then the timestamps are the truth: (frames - 1) intervals over the first-to-last span.
    """
    measured = None
    if len(ts) >= 2 and ts[-1] > ts[0]:
        measured = float((len(ts) - 1) / (ts[-1] - ts[0]))
    if stream_fps and (measured is None or abs(measured - stream_fps) <= 0.01 * stream_fps):
        return float(stream_fps)
    if measured is not None:
        return measured
    logger.warning("frame rate unknown (no rate in the stream, fewer than 2 timestamps); using 0")
    return 0.0


def read_video(
    path: str | os.PathLike, max_frames: int | None = None, max_pixels: int | None = None
) -> Video:
    """Decode every frame of the first video stream of a file.

    Raises VideoError when the file is missing, unreadable, an image, audio-only or has no
    frames; ShapeError when it has more than max_frames frames or more than max_pixels pixels
    per frame (decoding stops as soon as a limit is passed).
    """
    return _decode(path, max_frames, max_pixels)


def decode_video_bytes(
    data: bytes, max_frames: int | None = None, max_pixels: int | None = None
) -> Video:
    """Like read_video, for an encoded video held in memory; source is "<bytes>".

    data may also be a uint8 numpy array (how a Triton tensor of raw bytes arrives).
    """
    if isinstance(data, np.ndarray) and data.dtype == np.uint8:
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_video_bytes expects bytes, got {type(data).__name__}")
    return _decode(bytes(data), max_frames, max_pixels)


# --------------------------------------------------------------------------------------------
# Probing


def declared_geometry(data: bytes) -> tuple[int | None, int, int] | None:
    """(frames declared by the container or None, height, width) from the headers alone, nothing
    decoded; None when the headers do not say (or the data does not open: decoding reports that).

    Width and height are the coded ones: rotation metadata swaps them but not their product, which
    is all a size budget needs.
    """
    try:
        container, stream = _open(data, "<bytes>")
    except ThfmError:
        return None
    with container:
        if not stream.width or not stream.height:
            return None
        return _declared_frames(stream), int(stream.height), int(stream.width)


def probe_video(path_or_bytes) -> dict:
    """Cheap metadata without decoding the whole video (one frame is decoded, for rotation).

    Returns a dict: width, height (displayed, i.e. after rotation), frames (count declared by
    the container, or None when it does not say, as in mkv/webm), fps, codec (e.g. "h264"),
    rotation (counter-clockwise degrees in (-180, 180] applied for display; iPhone portrait is
    -90), hflip (mirrored left-right after the rotation; rare), pix_fmt, duration (seconds
    or None), format (container) and has_audio.
    """
    source = _source_name(path_or_bytes)
    container, stream = _open(path_or_bytes, source)
    with container:
        try:
            # The display matrix reaches us only on decoded frames, so decode the first one.
            frame = next(_frames(container, stream), None)
        except _AV_ERRORS as exc:
            raise VideoError(f"{source}: cannot decode any video frame ({_reason(exc)})") from exc
        if frame is None:
            raise VideoError(
                f"{source}: video stream contains no frames (empty, or the file is truncated)"
            )
        k, hflip = _orientation(frame)
        width, height = frame.width, frame.height
        if k % 2:
            width, height = height, width
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        return {
            "width": int(width),
            "height": int(height),
            "frames": _declared_frames(stream),
            "fps": _stream_fps(stream),
            "codec": stream.codec_context.codec.canonical_name,
            "rotation": _rotation_degrees(k),
            "hflip": hflip,
            "pix_fmt": stream.codec_context.pix_fmt,
            "duration": duration,
            "format": container.format.name,
            "has_audio": bool(container.streams.audio),
        }


# --------------------------------------------------------------------------------------------
# Encoding


def _pick_pix_fmt(codec: av.Codec, width: int, height: int) -> str:
    formats = [f.name for f in (codec.video_formats or ())]
    if not formats:
        return "yuv420p"
    even = width % 2 == 0 and height % 2 == 0
    # 4:2:0 is what every player and decoder accepts, but it needs even sizes (chroma is half
    # resolution); for odd sizes fall back to 4:4:4, then to whatever the encoder offers first
    # (ProRes only does 10-bit 4:2:2/4:4:4).
    for name in (("yuv420p",) if even else ()) + ("yuv444p",):
        if name in formats:
            return name
    return formats[0]


def encode_video(
    frames: np.ndarray,
    path_or_none,
    fps: float = 24.0,
    codec: str = "libx264",
    crf: int = 18,
    *,
    pix_fmt: str | None = None,
) -> bytes | None:
    """Encode uint8 RGB frames [F, H, W, 3] with PyAV.

    With a path, writes the file (container chosen by its extension: .mp4, .mov, .mkv, .webm,
    .avi) and returns None. With None, returns the bytes of an mp4. crf sets the quality for
    encoders that have a crf option (x264, x265, vpx); mpeg4 gets a comparable fixed quantiser;
    others (ProRes) ignore it. pix_fmt overrides the automatic choice (yuv420p when the size is
    even).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ShapeError(
            f"encode_video expects uint8 frames [F>=1, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps}")
    _, height, width, _ = frames.shape
    target = io.BytesIO() if path_or_none is None else os.fspath(path_or_none)
    where = "<bytes>" if path_or_none is None else target

    try:
        enc = av.Codec(codec, "w")
    except _AV_ERRORS as exc:
        raise VideoError(f"encoder {codec!r} is not available in PyAV's FFmpeg ({_reason(exc)})") from exc
    pix_fmt = pix_fmt or _pick_pix_fmt(enc, width, height)

    # A fraction keeps NTSC rates exact (29.97 -> 2997/100, 30000/1001 stays 30000/1001).
    rate = Fraction(fps).limit_denominator(1001)
    options: dict[str, str] = {}
    try:
        container = av.open(target, mode="w", format="mp4" if path_or_none is None else None)
    except _AV_ERRORS as exc:
        raise VideoError(f"{where}: cannot create the output container ({_reason(exc)})") from exc
    try:
        with container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            private = {o.name for o in stream.codec_context.supported_options.private}
            if "crf" in private:
                options["crf"] = str(crf)
                if codec.startswith("libvpx"):
                    # vpx treats crf as a cap on top of a target bitrate unless the bitrate is 0.
                    options["b"] = "0"
                if codec == "libx265":
                    # x265 logs its whole configuration to stderr at info level.
                    options["x265-params"] = "log-level=error"
            elif codec == "mpeg4":
                # No crf: use a fixed quantiser (2 best .. 31 worst); crf 18 -> q 3.
                stream.codec_context.qscale = True
                stream.codec_context.global_quality = 118 * max(2, min(31, round(crf / 6)))
            stream.options = options
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts = i
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed (B-)frames
                container.mux(packet)
    except _AV_ERRORS as exc:
        raise VideoError(f"{where}: encoding with {codec} ({pix_fmt}) failed ({_reason(exc)})") from exc
    if path_or_none is None:
        return target.getvalue()
    return None
