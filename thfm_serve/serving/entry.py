"""The entry model's algorithm: any set of tasks on one clip, with the exported models behind a call."""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import numpy as np

from ..config import ThfmConfig
from ..contract import protocol
from ..contract.params import Grid
from ..contract.protocol import CORE_IN, CORE_OUT, DECODER_IN, DECODER_OUT, ENCODER_IN, ENCODER_OUT
from ..contract.vae_window import decode_in_window, encode_in_window
from ..errors import ThfmError
from .sessions import OnnxModel

logger = logging.getLogger(__name__)


def names_tensor(names: Sequence[str]) -> np.ndarray:
    """A BYTES tensor (numpy object array of UTF-8 bytes)."""
    return np.array([n.encode("utf-8") for n in names], dtype=np.object_)


# call(model name, {input name: array}, [output names]) -> {output name: array}; raises
# ModelCallError when the called model answers with an error.
ModelCall = Callable[[str, Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]]


class ModelCallError(RuntimeError):
    """A model called by the entry model answered with an error.

    Not a ThfmError: the entry model fits every request to the grid the graphs were exported for
    before calling them, so a failure there is the server's fault (reported as an internal error,
    with the called model's message), not the request's.
    """


def run_entry(frames: np.ndarray, tasks: Sequence[str], grid: Grid, cfg: ThfmConfig,
              embeddings: Mapping[str, np.ndarray], call: ModelCall,
              output_hw: tuple[int, int] | None = None,
              vae_max_batch: int | None = None, pipelined: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """What ThfmPipeline.run does, with the exported models behind `call`: {task: {key: array}}.

    The same window loop (processing.run_clip) and windowing policy (the grid's window and overlap);
    the VAE graphs take one frame count, so a clip shorter than the window is padded to it and
    cropped back (contract.vae_window: exact, the Wan VAE is causal in time). The dense rows are
    decoded in calls of at most `vae_max_batch` rows (the VAE's max_batch_size; None: one call).
    Dense maps come out at output_hw (default: the input's size); keypoints are in input pixels.
    pipelined: the next window's encoder and core calls are made while this window's decoder calls
    run (the entry model's `window_pipeline`); `call` is then used from two threads at once.
    """
    from ..processing import run_clip

    text = np.stack([embeddings[t] for t in tasks])  # [N, L, D]

    def encode(clip: np.ndarray) -> np.ndarray:
        def run(x):
            return call(protocol.VAE_ENCODER, {ENCODER_IN: x}, [ENCODER_OUT])[ENCODER_OUT]

        return encode_in_window(run, clip, grid.window)

    def core(latent: np.ndarray, txt: np.ndarray):
        out = call(protocol.CORE, {CORE_IN[0]: latent, CORE_IN[1]: txt}, list(CORE_OUT))
        return tuple(out[n] for n in CORE_OUT)

    def decode(latent: np.ndarray) -> np.ndarray:
        def run(x):
            step = vae_max_batch or len(x)
            return np.concatenate([call(protocol.VAE_DECODER, {DECODER_IN: x[i : i + step]}, [DECODER_OUT])[DECODER_OUT]
                                   for i in range(0, len(x), step)], axis=0)

        return decode_in_window(run, latent, grid.window)

    return run_clip(frames, tasks, text, grid.height, grid.width, grid.window, grid.window_overlap,
                    cfg.depth_code, cfg.joint_names, encode, core, decode, output_hw, pipelined=pipelined)


def entry_outputs(results: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """{task: {key: array}} -> the entry model's output tensors (protocol names)."""
    from ..contract.tasks import OUTPUT_KEYS

    out = {}
    for task, arrays in results.items():
        out[protocol.OUTPUT_FOR_TASK[task]] = np.ascontiguousarray(arrays[OUTPUT_KEYS[task]], dtype=np.float32)
        if "joint_names" in arrays:
            out[protocol.OUTPUT_JOINT_NAMES] = names_tensor([str(n) for n in arrays["joint_names"]])
    return out


def local_call(models: Mapping[str, OnnxModel]) -> ModelCall:
    """A ModelCall over in-process onnxruntime models (tests, and running a repository without a server)."""

    def call(name: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        if name not in models:
            raise ModelCallError(f"no model {name!r}")
        result = models[name].run_many([inputs])[0]
        if isinstance(result, ThfmError):
            raise ModelCallError(f"model {name!r} failed: {result}")
        return {k: result[k] for k in outputs}

    return call

