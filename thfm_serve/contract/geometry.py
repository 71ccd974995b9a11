"""The clip geometry rules of the Wan2.1 VAE and transformer, one function each.

The Wan VAE compresses 4x in time, causally: a clip of T = 4n+1 frames becomes T' = n+1 latent
frames (the first frame alone, then groups of 4). It compresses 8x in space, and the transformer
patchifies latents 1x2x2, so heights and widths are multiples of 8*2 = 16 pixels. Every other
module asks these functions instead of writing 4, 8 or 16 itself.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError

VAE_TEMPORAL = 4  # AutoencoderKLWan: temporal compression (temperal_downsample has two True stages)
VAE_SPATIAL = 8  # AutoencoderKLWan: spatial compression (three 2x downsamples)
PATCH_SPATIAL = 2  # WanTransformer3DModel patch_size (1, 2, 2)
PIXEL_MULTIPLE = VAE_SPATIAL * PATCH_SPATIAL  # pixels per transformer patch side: 16
LATENT_CHANNELS = 16  # Wan2.1's VAE latent channels (AutoencoderKLWan z_dim); the 2.2 VAE would be 48


def latent_frames(frames: int) -> int:
    """T frames (4n+1) -> T' = (T-1)/4 + 1 latent frames; ShapeError unless T is 4n+1."""
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise ShapeError(f"frame count {frames} is not of the form 4n+1 (1, 5, 9, ...)")
    return (frames - 1) // VAE_TEMPORAL + 1


def video_frames(latent: int) -> int:
    """T' latent frames -> T = 4(T'-1)+1 video frames (the inverse of latent_frames)."""
    if latent < 1:
        raise ShapeError(f"latent frame count {latent} must be at least 1")
    return VAE_TEMPORAL * (latent - 1) + 1


def snap_frames(n: int) -> int:
    """Smallest 4n+1 frame count that holds n frames (the Wan VAE's temporal grid)."""
    if n < 1:
        raise ShapeError("a clip needs at least one frame")
    return ((n - 1 + VAE_TEMPORAL - 1) // VAE_TEMPORAL) * VAE_TEMPORAL + 1


def check_resolution(height: int, width: int) -> None:
    """ShapeError unless height and width are positive multiples of 16 (one transformer patch)."""
    if height < PIXEL_MULTIPLE or width < PIXEL_MULTIPLE:
        raise ShapeError(
            f"resolution {height}x{width} is too small: one latent patch needs at least "
            f"{PIXEL_MULTIPLE}x{PIXEL_MULTIPLE} pixels"
        )
    if height % PIXEL_MULTIPLE or width % PIXEL_MULTIPLE:
        raise ShapeError(f"resolution {height}x{width} is not a multiple of {PIXEL_MULTIPLE}")


def snap_size(value: int) -> int:
    """Nearest multiple of 16 (VAE 8x times patch 2x), at least one latent patch."""
    return max(PIXEL_MULTIPLE, int(round(value / PIXEL_MULTIPLE)) * PIXEL_MULTIPLE)


def latent_size(pixels: int) -> int:
    """Pixels -> latent cells along one side (the VAE's 8x)."""
    return pixels // VAE_SPATIAL


def patches(pixels: int) -> int:
    """Pixels (a multiple of 16) -> transformer patches along one side."""
    return pixels // PIXEL_MULTIPLE


def patch_pixels(patch_count: int) -> int:
    """Transformer patches along one side -> pixels (the inverse of patches)."""
    return patch_count * PIXEL_MULTIPLE


def video_tokens(frames: int, height: int, width: int) -> int:
    """Transformer video tokens of a clip: T' * (H/16) * (W/16)."""
    return latent_frames(frames) * patches(height) * patches(width)


def validate_frames(frames: np.ndarray) -> np.ndarray:
    """Check a frame array is uint8 [F, H, W, 3]; return it unchanged."""
    if not isinstance(frames, np.ndarray):
        raise ShapeError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise ShapeError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ShapeError(f"frames must have shape [F, H, W, 3], got {list(frames.shape)}")
    if frames.shape[0] < 1:
        raise ShapeError("frames: zero frames")
    if frames.shape[1] < 1 or frames.shape[2] < 1:
        raise ShapeError(f"frames: empty image size {frames.shape[1]}x{frames.shape[2]}")
    return frames
