"""How relative depth becomes a [0, 1] map the Wan VAE can carry, and back.

Depth is a dense target like the others: one 3-channel image in [0, 1]. Before the squash it is made
relative (divided by the clip's median depth on the person; `training.data.depth_to_map`), so the
person sits near 1 whatever the camera distance. Two squashes exist, named in the checkpoint's
``thfm/config.json`` (``depth_encoding``, with ``depth_log_scale`` as the gain a):

    log1p   d' = clip(a * log(1 + d), 0, 1)        the first checkpoints' code (a = 0.5)
    log     d' = clip(0.5 + a * log(d), 0, 1)      the person centred on 0.5

Why the second: with log1p at a = 0.5 the person's relief (depth 0.9 to 1.1 of the median) spans
0.025 of the map's range, about the error of a small VAE's round trip, so the decoded relief is
mostly noise. The centred code at a = 2 gives the same relief 0.4 of the range; what it gives up is
depth beyond e^(0.25) = 1.28x (or nearer than 0.78x) of the person, which clips to the map's ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ThfmError

DEPTH_ENCODINGS = ("log1p", "log")


@dataclass(frozen=True)
class DepthCode:
    """One squash of relative depth into [0, 1] and its inverse (numpy, float32)."""

    encoding: str
    scale: float

    def __post_init__(self) -> None:
        if self.encoding not in DEPTH_ENCODINGS:
            raise ThfmError(f"unknown depth encoding {self.encoding!r}; known: {list(DEPTH_ENCODINGS)}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ThfmError(f"depth scale must be a positive number, got {self.scale!r}")

    def encode(self, relative: np.ndarray) -> np.ndarray:
        """Relative depth (> 0) -> map values in [0, 1]."""
        rel = np.asarray(relative, np.float32)
        if self.encoding == "log1p":
            squashed = self.scale * np.log1p(rel)
        else:
            squashed = 0.5 + self.scale * np.log(np.maximum(rel, np.float32(1e-6)))
        return np.clip(squashed, 0.0, 1.0).astype(np.float32)

    def decode(self, values: np.ndarray) -> np.ndarray:
        """Map values in [0, 1] -> relative depth (the inverse of `encode` inside its range)."""
        x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
        if self.encoding == "log1p":
            return np.expm1(x / np.float32(self.scale)).astype(np.float32)
        return np.exp((x - np.float32(0.5)) / np.float32(self.scale)).astype(np.float32)
