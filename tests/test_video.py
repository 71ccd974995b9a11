"""Tests for thfm_serve.video: decoding over PyAV, rotation, limits and every user error.

Clips are generated in tmp_path by thfm_serve.clipgen's test pattern (tiny, a few frames, 64x48), so the whole
file runs in a few seconds. The real samples in ../shared/samples are optional.
"""

from __future__ import annotations

import logging
from pathlib import Path

import av
import numpy as np
import pytest

from thfm_serve import video as video_mod
from thfm_serve.errors import ShapeError, VideoError
from thfm_serve.video import Video, decode_video_bytes, encode_video, probe_video, read_video
from thfm_serve.clipgen import BLOCK, encoder_available, green_column, make_audio_only, make_clip, pattern

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"


def needs(*encoders: str):
    missing = [e for e in encoders if not encoder_available(e)]
    return pytest.mark.skipif(
        bool(missing), reason=f"PyAV's bundled FFmpeg has no encoder {', '.join(missing)}"
    )


def assert_like(decoded: np.ndarray, expected: np.ndarray, tol: float = 6.0) -> None:
    """Same shape, and close after lossy coding (mean absolute error in 0..255 units)."""
    assert decoded.dtype == np.uint8
    assert decoded.shape == expected.shape
    err = np.abs(decoded.astype(np.int16) - expected.astype(np.int16)).mean()
    assert err < tol, f"mean abs error {err:.2f} >= {tol}"


def green_columns(frames: np.ndarray) -> list[int]:
    """Left column of the green block in each (unrotated) frame."""
    out = []
    for f in frames.astype(np.int16):
        mask = (f[..., 1] > 150) & (f[..., 0] < 100)
        cols = np.nonzero(mask.any(axis=0))[0]
        out.append(int(cols.min()))
    return out


# --------------------------------------------------------------------------------------------
# Containers and codecs

CASES = [
    # (extension, encoder, pix_fmt, canonical codec name reported by probe)
    ("mp4", "libx264", "yuv420p", "h264"),
    ("mov", "libx264", "yuv420p", "h264"),
    ("mkv", "libx264", "yuv420p", "h264"),
    ("mp4", "libx265", "yuv420p", "hevc"),
    ("mkv", "libx265", "yuv420p", "hevc"),
    ("avi", "mpeg4", "yuv420p", "mpeg4"),
    ("mp4", "mpeg4", "yuv420p", "mpeg4"),
    ("mov", "prores_ks", "yuv422p10le", "prores"),
    ("webm", "libvpx-vp9", "yuv420p", "vp9"),
    ("mkv", "libvpx-vp9", "yuv420p", "vp9"),
]


@pytest.mark.parametrize(
    "ext,encoder,pix_fmt,codec",
    [pytest.param(*c, marks=needs(c[1]), id=f"{c[0]}-{c[1]}") for c in CASES],
)
def test_container_codec_roundtrip(tmp_path, ext, encoder, pix_fmt, codec):
    path = tmp_path / f"clip.{ext}"
    src = make_clip(path, frames=6, codec=encoder, pix_fmt=pix_fmt, fps=24)
    v = read_video(path)
    assert isinstance(v, Video)
    assert v.frames.shape == (6, 48, 64, 3) and v.frames.dtype == np.uint8
    assert_like(v.frames, src)
    assert green_columns(v.frames) == [green_column(i, 64) for i in range(6)]  # frame order
    assert v.fps == pytest.approx(24.0)
    assert v.timestamps.dtype == np.float64
    np.testing.assert_allclose(v.timestamps, np.arange(6) / 24.0, atol=1e-3)  # mkv stores ms
    assert v.source == str(path)

    info = probe_video(path)
    assert (info["width"], info["height"], info["codec"]) == (64, 48, codec)
    assert info["fps"] == pytest.approx(24.0)
    assert info["rotation"] == 0
    # mp4/mov/avi declare a frame count; mkv/webm do not.
    assert info["frames"] == (6 if ext in ("mp4", "mov", "avi") else None)


@pytest.mark.parametrize(
    "ext,encoder,pix_fmt",
    [
        pytest.param("mp4", "libx264", "yuv420p10le", marks=needs("libx264"), id="h264-10bit"),
        pytest.param("mkv", "libx265", "yuv420p10le", marks=needs("libx265"), id="hevc-10bit"),
        pytest.param("mov", "prores_ks", "yuv422p10le", marks=needs("prores_ks"), id="prores-10bit"),
    ],
)
def test_10bit_source_decodes_to_uint8(tmp_path, ext, encoder, pix_fmt):
    path = tmp_path / f"deep.{ext}"
    src = make_clip(path, frames=4, codec=encoder, pix_fmt=pix_fmt)
    assert probe_video(path)["pix_fmt"] == pix_fmt
    v = read_video(path)
    assert v.frames.dtype == np.uint8
    assert_like(v.frames, src)


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
def test_variable_frame_rate_keeps_every_frame_and_its_time(tmp_path, ext):
    pts_ms = [0, 40, 50, 130, 140, 300, 310]
    path = tmp_path / f"vfr.{ext}"
    src = make_clip(path, frames=len(pts_ms), pts=pts_ms)
    v = read_video(path)
    assert v.frames.shape[0] == len(pts_ms)  # no resampling to a constant rate
    np.testing.assert_allclose(v.timestamps, np.array(pts_ms) / 1000.0, atol=1e-6)
    # The mean rate over the decoded span, not the container's nominal 24 fps.
    assert v.fps == pytest.approx((len(pts_ms) - 1) / 0.310)
    assert_like(v.frames, src)


def test_ntsc_rate_is_kept_exact(tmp_path):
    path = tmp_path / "ntsc.mp4"
    make_clip(path, frames=5, fps=30000 / 1001)
    assert read_video(path).fps == pytest.approx(30000 / 1001, rel=1e-9)


@pytest.mark.parametrize("ext", ["mp4", "mkv", pytest.param("webm", marks=needs("libvpx-vp9", "libopus"))])
def test_audio_stream_is_ignored(tmp_path, ext):
    path = tmp_path / f"av.{ext}"
    codec = "libvpx-vp9" if ext == "webm" else "libx264"
    src = make_clip(path, frames=5, codec=codec, audio=True)
    with av.open(str(path)) as c:  # the file really has both
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
    v = read_video(path)
    assert v.frames.shape[0] == 5
    assert_like(v.frames, src)
    assert probe_video(path)["has_audio"] is True


def test_single_frame_video(tmp_path):
    path = tmp_path / "one.mp4"
    src = make_clip(path, frames=1)
    v = read_video(path)
    assert v.frames.shape == (1, 48, 64, 3)
    assert v.timestamps.tolist() == [0.0]
    assert v.fps == pytest.approx(24.0)
    assert_like(v.frames, src)


# --------------------------------------------------------------------------------------------
# Rotation


def displayed(src: np.ndarray, deg: int, hflip: bool, vflip: bool) -> np.ndarray:
    """What a player shows: PyAV's set_display_rotation is `deg` counter-clockwise, then mirrors."""
    out = np.rot90(src, k=deg // 90, axes=(1, 2))
    if hflip:
        out = out[:, :, ::-1]
    if vflip:
        out = out[:, ::-1]
    return out


@pytest.mark.parametrize(
    "deg,hflip,vflip",
    [(90, False, False), (-90, False, False), (270, False, False), (180, False, False),
     (0, True, False), (0, False, True), (90, True, False), (270, False, True)],
)
def test_rotation_metadata_is_applied(tmp_path, deg, hflip, vflip):
    path = tmp_path / "rot.mp4"
    src = make_clip(path, frames=3, height=48, width=64, rotation=(deg, hflip, vflip))
    v = read_video(path)
    expected = displayed(src, deg, hflip, vflip)
    quarter = deg % 180 == 90
    assert v.frames.shape == ((3, 64, 48, 3) if quarter else (3, 48, 64, 3))
    assert_like(v.frames, expected)
    assert v.frames.flags["C_CONTIGUOUS"]

    info = probe_video(path)
    assert (info["width"], info["height"]) == ((48, 64) if quarter else (64, 48))


def test_portrait_phone_video_reads_upright(tmp_path):
    # Phones record portrait as landscape pixels with "rotate 90 clockwise" (-90 ccw).
    path = tmp_path / "portrait.mov"
    src = make_clip(path, frames=2, height=48, width=64, rotation=-90)
    v = read_video(path)
    assert v.frames.shape[1:3] == (64, 48)
    # The red orientation marker (stored top-left) is displayed top-right after a clockwise turn.
    red = (v.frames[0, ..., 0] > 150) & (v.frames[0, ..., 1] < 100)
    rows, cols = np.nonzero(red)
    assert rows.max() < 2 * BLOCK + 2 and cols.min() > 48 - 2 * BLOCK - 2
    assert_like(v.frames, np.rot90(src, k=-1, axes=(1, 2)))
    assert probe_video(path)["rotation"] == -90


# --------------------------------------------------------------------------------------------
# Bytes API and encoding


def test_bytes_api_equals_path_api(tmp_path):
    path = tmp_path / "clip.mp4"
    make_clip(path, frames=5, rotation=90, audio=True)
    a = read_video(path)
    b = decode_video_bytes(path.read_bytes())
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert a.fps == b.fps
    assert b.source == "<bytes>"
    assert probe_video(path.read_bytes()) == probe_video(path)


def test_encode_video_to_bytes_and_file(tmp_path):
    src = np.stack([pattern(i, 48, 64) for i in range(5)])
    data = encode_video(src, None, fps=12.0)
    assert isinstance(data, bytes) and data[4:8] == b"ftyp"  # an mp4
    v = decode_video_bytes(data)
    assert_like(v.frames, src)
    assert v.fps == pytest.approx(12.0)

    out = tmp_path / "out.mkv"
    assert encode_video(src, out, fps=25.0) is None
    assert probe_video(out)["format"] == "matroska,webm"
    assert_like(read_video(out).frames, src)


@pytest.mark.parametrize(
    "codec,ext",
    [pytest.param(c, e, marks=needs(c), id=c) for c, e in
     [("mpeg4", "avi"), ("libx265", "mp4"), ("libvpx-vp9", "webm"), ("prores_ks", "mov")]],
)
def test_encode_video_other_codecs(tmp_path, codec, ext):
    src = np.stack([pattern(i, 48, 64) for i in range(3)])
    out = tmp_path / f"out.{ext}"
    encode_video(src, out, codec=codec)
    assert_like(read_video(out).frames, src)


def test_encode_video_odd_size_and_bad_input(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (2, 47, 63, 3), dtype=np.uint8)
    v = decode_video_bytes(encode_video(src, None))
    assert v.frames.shape == (2, 47, 63, 3)  # 4:4:4 keeps odd sizes instead of failing
    with pytest.raises(ShapeError, match=r"uint8 frames \[F>=1, H, W, 3\]"):
        encode_video(src.astype(np.float32), None)
    with pytest.raises(ShapeError):
        encode_video(src[0], None)  # missing the frame axis
    with pytest.raises(VideoError, match="encoder 'no_such_codec' is not available"):
        encode_video(src, None, codec="no_such_codec")


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match=r"nope\.mp4: file not found"):
        read_video(path)
    with pytest.raises(VideoError, match="file not found"):
        probe_video(path)


def test_directory_and_empty_inputs(tmp_path):
    with pytest.raises(VideoError, match="is a directory"):
        read_video(tmp_path)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=r"empty\.mp4: file is empty"):
        read_video(empty)
    with pytest.raises(VideoError, match=r"<bytes>: video data is empty"):
        decode_video_bytes(b"")


def test_random_bytes(tmp_path):
    junk = np.random.default_rng(0).bytes(8192)
    path = tmp_path / "junk.mp4"
    path.write_bytes(junk)
    with pytest.raises(VideoError, match=r"junk\.mp4: cannot be opened as a video"):
        read_video(path)
    with pytest.raises(VideoError, match=r"<bytes>: cannot be opened as a video"):
        decode_video_bytes(junk)


def test_truncated_mp4_cannot_be_opened(tmp_path):
    # PyAV writes the mp4 index (moov) at the end; without it nothing can be decoded.
    path = tmp_path / "cut.mp4"
    make_clip(path, frames=10)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"cut\.mp4: cannot be opened as a video"):
        read_video(path)


def test_truncated_stream_returns_frames_so_far_with_warning(tmp_path, caplog):
    path = tmp_path / "cut.mkv"
    src = make_clip(path, frames=24)
    data = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="thfm_serve.video"):
        # The first (key) frame is most of this tiny file: cut late enough to keep it.
        v = decode_video_bytes(data[: len(data) * 4 // 5])
    assert 0 < v.frames.shape[0] < 24
    assert_like(v.frames, src[: v.frames.shape[0]])
    assert "truncated file?" in caplog.text


def test_decode_error_after_some_frames_returns_them(tmp_path, caplog, monkeypatch):
    # Real decoders conceal most damage, so inject the error: two frames, then InvalidDataError.
    path = tmp_path / "clip.mp4"
    src = make_clip(path, frames=6)
    real = video_mod._frames

    def failing(*args):
        for i, frame in enumerate(real(*args)):
            if i == 2:
                raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
            yield frame

    monkeypatch.setattr(video_mod, "_frames", failing)
    with caplog.at_level(logging.WARNING, logger="thfm_serve.video"):
        v = read_video(path)
    assert v.frames.shape[0] == 2
    assert_like(v.frames, src[:2])
    assert "decoding stopped after 2 frame(s)" in caplog.text


def test_decode_error_before_any_frame(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    make_clip(path, frames=3)

    def failing(*args):
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        yield  # pragma: no cover

    monkeypatch.setattr(video_mod, "_frames", failing)
    with pytest.raises(VideoError, match=r"clip\.mp4: cannot decode any video frame \(Invalid data"):
        read_video(path)


def test_truncated_before_first_frame(tmp_path):
    path = tmp_path / "cut.mkv"
    make_clip(path, frames=24)
    data = path.read_bytes()
    # Cut inside the first frame: the demuxer drops the partial packet, so nothing is left.
    with pytest.raises(VideoError, match=r"<bytes>: video stream contains no frames.*truncated"):
        decode_video_bytes(data[: len(data) // 3])


def test_zero_frame_video(tmp_path):
    # A video track with no frames (next to an audio track, so the muxer keeps the track).
    path = tmp_path / "empty.mkv"
    make_clip(path, frames=0, audio=True)
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1
    with pytest.raises(VideoError, match=r"empty\.mkv: video stream contains no frames"):
        read_video(path)
    with pytest.raises(VideoError, match="contains no frames"):
        probe_video(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_file_is_rejected(tmp_path, fmt):
    from PIL import Image

    path = tmp_path / f"still.{fmt.lower()}"
    Image.fromarray(pattern(0, 48, 64)).save(path, format=fmt)
    with pytest.raises(VideoError, match=r"still\.\w+: is an image, not a video"):
        read_video(path)
    with pytest.raises(VideoError, match=r"<bytes>: is an image, not a video"):
        decode_video_bytes(path.read_bytes())
    # Also when the name lies about it.
    disguised = tmp_path / "still_image.mp4"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(VideoError, match="is an image, not a video"):
        probe_video(disguised)


def test_audio_only_file(tmp_path):
    path = tmp_path / "tone.wav"
    make_audio_only(path)
    with pytest.raises(VideoError, match=r"tone\.wav: has no video stream \(streams found: audio\)"):
        read_video(path)


def test_max_frames(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    make_clip(path, frames=10)
    assert read_video(path, max_frames=10).frames.shape[0] == 10  # the limit itself is fine

    decoded = []
    real = video_mod._frames

    def counting(*args):
        for frame in real(*args):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(video_mod, "_frames", counting)
    with pytest.raises(ShapeError, match=r"clip\.mp4: video has 10 frames .*max_frames=4"):
        read_video(path, max_frames=4)
    assert len(decoded) == 5  # stopped at the first frame over the limit

    # mkv declares no count: the message says "more than".
    mkv = tmp_path / "clip.mkv"
    make_clip(mkv, frames=6)
    with pytest.raises(ShapeError, match=r"<bytes>: video has more than 3 frames.*max_frames=3"):
        decode_video_bytes(mkv.read_bytes(), max_frames=3)


def test_max_pixels(tmp_path):
    path = tmp_path / "clip.mp4"
    make_clip(path, frames=2, height=48, width=64)
    assert read_video(path, max_pixels=64 * 48).frames.shape[0] == 2
    with pytest.raises(ShapeError, match=r"clip\.mp4: frame size 64x48 = 3072 pixels .*max_pixels=3000"):
        read_video(path, max_pixels=3000)


@pytest.mark.parametrize("seed", range(4))
def test_no_av_exception_escapes_for_damaged_data(tmp_path, seed):
    # A valid container header followed by garbage, or frames with flipped bytes: whatever
    # FFmpeg makes of it, the caller sees a Video or a VideoError, never an av exception.
    path = tmp_path / "clip.mkv"
    make_clip(path, frames=8)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    if seed % 2:
        cut = len(data) * 3 // 5
        data[cut:] = rng.bytes(len(data) - cut)
    else:
        for i in rng.integers(len(data) // 2, len(data), 60):
            data[i] ^= 0xFF
    try:
        v = decode_video_bytes(bytes(data))
    except VideoError as exc:
        assert str(exc).startswith("<bytes>: ")
    else:
        assert v.frames.dtype == np.uint8 and v.frames.shape[0] >= 1


# --------------------------------------------------------------------------------------------
# Real footage (optional: ../shared/samples is not part of a fresh clone)

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"no sample folder at {SAMPLES}")


@needs_samples
def test_real_samples_probe_and_limits():
    juggle = SAMPLES / "juggle_720p.mp4"
    bedroom = SAMPLES / "bedroom_540p.mp4"
    if not (juggle.is_file() and bedroom.is_file()):
        pytest.skip("sample videos missing")
    info = probe_video(juggle)
    assert (info["width"], info["height"], info["frames"], info["codec"]) == (1280, 720, 247, "h264")
    assert info["fps"] == pytest.approx(24.0)
    info = probe_video(bedroom)
    assert (info["width"], info["height"], info["frames"]) == (960, 540, 200)

    # max_frames stops after 9 decoded frames, so this is fast despite 247 frames of 720p.
    with pytest.raises(ShapeError, match=r"video has 247 frames .*max_frames=8"):
        read_video(juggle, max_frames=8)
    with pytest.raises(ShapeError, match=r"1280x720 = 921600 pixels"):
        read_video(juggle, max_pixels=960 * 540)


@needs_samples
def test_real_sample_full_decode():
    bedroom = SAMPLES / "bedroom_540p.mp4"
    if not bedroom.is_file():
        pytest.skip("sample video missing")
    v = read_video(bedroom, max_frames=200, max_pixels=960 * 540)
    assert v.frames.shape == (probe_video(bedroom)["frames"], 540, 960, 3)
    assert v.fps == pytest.approx(30.0)
    assert np.all(np.diff(v.timestamps) > 0)
    assert v.frames.std() > 10  # real content, not a blank decode


@needs_samples
def test_real_sample_image_is_rejected():
    png = SAMPLES / "astronaut.png"
    if not png.is_file():
        pytest.skip("astronaut.png missing")
    with pytest.raises(VideoError, match="is an image, not a video"):
        read_video(png)


def _size_changing_stream(tmp_path, small: int = 3, big: int = 4) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Two MPEG-TS segments back to back (what `cat a.ts b.ts` makes): 16x16 frames, then 160x128."""
    a = np.full((small, 16, 16, 3), 80, np.uint8)
    b = np.full((big, 128, 160, 3), 160, np.uint8)
    encode_video(a, tmp_path / "a.ts")
    encode_video(b, tmp_path / "b.ts")
    return (tmp_path / "a.ts").read_bytes() + (tmp_path / "b.ts").read_bytes(), a, b


def test_every_frame_is_checked_against_max_pixels(tmp_path):
    data, a, b = _size_changing_stream(tmp_path)
    # Without a limit both segments decode; the big frames are scaled to the first frame's size.
    video = decode_video_bytes(data)
    assert video.frames.shape == (len(a) + len(b), 16, 16, 3)
    # The first frame (16x16) and the header are within the limit; frame 3 (160x128) is not.
    with pytest.raises(ShapeError, match=r"<bytes>: frame 3 is 160x128 = 20480 pixels \(the stream changes size "
                                         r"mid-way\), above the limit max_pixels=9216"):
        decode_video_bytes(data, max_pixels=96 * 96)
    # A limit that holds the big frames lets the stream through.
    assert decode_video_bytes(data, max_pixels=160 * 128).frames.shape[0] == len(a) + len(b)


def test_frame_limit_counts_every_segment(tmp_path):
    data, a, b = _size_changing_stream(tmp_path, small=2, big=5)
    with pytest.raises(ShapeError, match=r"more than 4 frames, above the limit max_frames=4"):
        decode_video_bytes(data, max_frames=4)
