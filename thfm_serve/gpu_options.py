"""Serving options of a ``--target gpu`` repository that have no meaning on CPU.

The Wan VAE runs in Triton's onnxruntime backend with the CUDA execution provider; its
``config.pbtxt`` carries the provider options below as model parameters (the onnxruntime backend
reads ``cudnn_conv_algo_search``, ``arena_extend_strategy`` and ``gpu_mem_limit`` from there):

- cuDNN convolution algorithm search: EXHAUSTIVE. The Wan VAE is a stack of 3D convolutions at one
  fixed window and resolution per repository (the model grid), so the one-off search at the first
  call of each shape is paid once and the fastest algorithm is used from then on (onnxruntime's
  default is also EXHAUSTIVE; it is written out so that a change of default cannot slip in).
- arena extend strategy: kSameAsRequested. The default kNextPowerOfTwo rounds each arena growth up
  to a power of two, which for the VAE's GB-sized activations reserves up to twice what is used.
- gpu_mem_limit: the arena's cap, so the VAE leaves room for the TensorRT core on the same GPU.

The VAE batch is capped (``vae_batch_cap``) so that one call holds at most the pixels of one
default clip (81 frames at 480x832, the clip THFM was trained and benchmarked on): a full-resolution
Wan VAE window is the largest activation in the whole path, and six of them (one per task) do not
fit next to the core on one GPU. Smaller model grids keep a larger batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from .contract.protocol import CORE, PLAN_FILE
from .errors import ThfmError

# The default clip (model-recipe: 81 frames at 480x832) is what one VAE call may hold.
DEFAULT_CLIP_PIXELS = 81 * 480 * 832

_CONV_SEARCH = {"exhaustive": "0", "heuristic": "1", "default": "2"}
_ARENA = {"next_power_of_two": "0", "same_as_requested": "1"}


@dataclass(frozen=True)
class VaeGpuOptions:
    conv_algo_search: str = "exhaustive"
    arena_extend_strategy: str = "same_as_requested"
    gpu_mem_limit_bytes: int = 32 << 30  # 32 GiB: a window at the default clip with headroom; the core takes the rest

    def validate(self) -> "VaeGpuOptions":
        if self.conv_algo_search not in _CONV_SEARCH:
            raise ThfmError(f"VAE conv algorithm search {self.conv_algo_search!r}: choose from {', '.join(_CONV_SEARCH)}")
        if self.arena_extend_strategy not in _ARENA:
            raise ThfmError(f"VAE arena strategy {self.arena_extend_strategy!r}: choose from {', '.join(_ARENA)}")
        if int(self.gpu_mem_limit_bytes) < 1 << 30:
            raise ThfmError(f"VAE gpu_mem_limit {self.gpu_mem_limit_bytes} bytes is below 1 GiB")
        return self

    def to_params(self) -> dict[str, str]:
        """The onnxruntime backend's CUDA execution provider parameters (config.pbtxt `parameters`)."""
        self.validate()
        return {"cudnn_conv_algo_search": _CONV_SEARCH[self.conv_algo_search],
                "arena_extend_strategy": _ARENA[self.arena_extend_strategy],
                "gpu_mem_limit": str(int(self.gpu_mem_limit_bytes))}


def vae_batch_cap(window: int, height: int, width: int, max_batch: int, budget: int = DEFAULT_CLIP_PIXELS) -> int:
    """Rows per VAE call: as many windows as fit in `budget` pixels (on a GPU one default clip's), at
    least 1, at most the spec's max batch."""
    if min(window, height, width, max_batch, budget) < 1:
        raise ThfmError(f"VAE batch cap of a {window}x{height}x{width} window, max batch {max_batch}, budget {budget} "
                        "pixels: sizes must be positive")
    return max(1, min(int(max_batch), int(budget) // (window * height * width)))


# --- version binding: a TensorRT plan runs only in the TensorRT that built it -----------------------

def same_engine_version(built: str, serving: str) -> bool:
    """A plan runs only on the TensorRT it was built with: major.minor.patch must agree (the build
    number after them may differ, as between NVIDIA's containers and wheels of one release)."""
    def head(v: str) -> tuple[str, ...]:
        return tuple(str(v).split(".")[:3])

    return head(built) == head(serving)


def serving_tensorrt_version() -> str | None:
    """The TensorRT version of the image a repository is served from, where it can be read:
    THFM_SERVING_TENSORRT (set it when checking from outside the image), TRT_VERSION (set in
    NVIDIA's TensorRT and Triton containers), or the tensorrt module if importable; else None."""
    for var in ("THFM_SERVING_TENSORRT", "TRT_VERSION"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return None


def plan_version_problem(engine_manifest: Mapping[str, Any] | None, serving: str | None) -> str | None:
    """Why a plan cannot be served by TensorRT `serving` (None when it can or nothing is known):
    TensorRT deserialises only plans built by its own version."""
    built = ((engine_manifest or {}).get("key") or {}).get("tensorrt_version")
    if not built or not serving or same_engine_version(built, serving):
        return None
    return (f"{CORE}/1/{PLAN_FILE} was built with TensorRT {built} but the serving image has TensorRT {serving}; "
            "rebuild it inside the image of the same release (model_repository/README.md names the container pair)")
