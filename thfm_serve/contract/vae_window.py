"""Run a fixed-window VAE graph on shorter clips: pad to the window, run, crop.

The exported VAE graphs accept one frame count (the window; see specs.build_specs). This is exact
for any shorter clip because the Wan VAE is causal in time: its 3D convolutions are causal
(WanCausalConv3d pads only the past) and it walks the clip chunk by chunk (1 frame, then 4 at a
time) with a cache of earlier chunks, so latent t depends only on frames <= 4t and decoded frame f
only on latents <= (f + 3) // 4. Padding after the clip therefore cannot change the kept outputs.

Works on numpy arrays and torch tensors alike ([B, C, T, H, W], time on axis 2).
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ShapeError
from .geometry import latent_frames, video_frames


def pad_time(x: Any, length: int) -> Any:
    """Repeat the last time step of x [B, C, T, H, W] up to `length` steps (unchanged if T == length)."""
    t = x.shape[2]
    if t > length:
        raise ShapeError(f"{t} time steps do not fit a window of {length}")
    if t == length:
        return x
    last = x[:, :, t - 1 : t]
    if hasattr(x, "expand"):  # torch
        import torch

        return torch.cat([x, last.expand(-1, -1, length - t, -1, -1)], dim=2)
    import numpy as np

    return np.concatenate([x, np.repeat(last, length - t, axis=2)], axis=2)


def encode_in_window(run: Callable[[Any], Any], video: Any, window: int) -> Any:
    """video [B,3,T,H,W] with T = 4n+1 <= window -> latent [B,16,T',h,w] via a window-sized encoder."""
    frames = video.shape[2]
    lat = latent_frames(frames)  # ShapeError unless 4n+1
    latent_frames(window)
    return run(pad_time(video, window))[:, :, :lat]


def decode_in_window(run: Callable[[Any], Any], latent: Any, window: int) -> Any:
    """latent [B,16,T',h,w] with T' <= the window's T' -> maps [B,3,4(T'-1)+1,H,W] via a window-sized decoder."""
    lat = latent.shape[2]
    return run(pad_time(latent, latent_frames(window)))[:, :, :video_frames(lat)]
