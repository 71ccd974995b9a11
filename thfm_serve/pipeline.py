"""The in-process reference pipeline: video frames -> every requested task's arrays.

This is the path the exported and served models are checked against. It runs the same window loop
as the served entry model (processing.run_clip, over contract.windows' one windowing policy) with
the PyTorch modules: per model window, VAE-encode the clip once, run the core once for all requested
tasks (batched, one task prompt per batch row), decode the dense tasks' latents with the VAE
decoder, map everything back to the input's resolution, and stitch the windows in frame order.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .budget import output_resolution
from .checkpoint import Checkpoint, load_checkpoint
from .config import check_resolution, latent_frames, parse_tasks
from .processing import run_clip, validate_frames
from .contract.protocol import OUTPUT_SIZE_INPUT

logger = logging.getLogger(__name__)


class ThfmPipeline:
    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32):
        self.ck = checkpoint
        self.cfg = checkpoint.config
        self.dtype = dtype
        self.core = checkpoint.core().to(dtype)
        self.encoder = checkpoint.vae_encoder()
        self.decoder = checkpoint.vae_decoder()

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "ThfmPipeline":
        return cls(load_checkpoint(path, dtype=dtype), dtype=dtype)

    def resolve(self, height: int | None, width: int | None, window: int | None) -> tuple[int, int, int]:
        """Model resolution and window: the checkpoint's defaults, or explicit values checked (not
        silently snapped) against the model grid."""
        h, w = height or self.cfg.height, width or self.cfg.width
        check_resolution(h, w)
        window = window or self.cfg.frames
        latent_frames(window)
        return h, w, window

    def embeddings(self, tasks: list[str], prompts: dict[str, str] | None = None) -> torch.Tensor:
        """[len(tasks), text_len, text_dim]: cached per-task embeddings, or a free-form prompt's."""
        rows = []
        for t in tasks:
            if prompts and t in prompts:
                rows.append(self.ck.encode_prompt(prompts[t]))
            else:
                rows.append(self.ck.task_embedding(t))
        return torch.stack(rows)

    @torch.no_grad()
    def run_window(self, clip: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """clip [1,3,T,H,W] in [-1,1], text [N,L,D] -> latents [N,16,T',h,w], kp2d [N,T,K,2], kp3d [N,T,K,3]."""
        latent = self.encoder(clip)
        n = text.shape[0]
        pred, kp2d, kp3d = self.core(latent.expand(n, -1, -1, -1, -1).to(self.dtype), text.to(self.dtype))
        return pred.float(), kp2d, kp3d

    @torch.no_grad()
    def run(
        self,
        frames: np.ndarray,
        tasks: str | list[str],
        height: int | None = None,
        width: int | None = None,
        window: int | None = None,
        prompts: dict[str, str] | None = None,
        overlap: int | None = None,
        output_size: str = OUTPUT_SIZE_INPUT,
    ) -> dict[str, dict[str, np.ndarray]]:
        """frames: uint8 [F, H, W, 3] -> {task: {key: array}} at the input's frames; dense maps at the
        input's resolution, or at the model grid with output_size="model" (the served models' option).

        overlap: frames shared by neighbouring windows (None: the policy's default, as served)."""
        frames = validate_frames(frames)
        tasks = parse_tasks(tasks, self.ck.tasks)
        h, w, window = self.resolve(height, width, window)
        output_hw = output_resolution(output_size, frames.shape[1:3], (h, w))
        logger.info("%d frames at %dx%d in windows of %d", frames.shape[0], h, w, window)
        text = self.embeddings(tasks, prompts).float().numpy()

        def encode(clip: np.ndarray) -> np.ndarray:
            return self.encoder(torch.from_numpy(clip)).numpy()

        def core(latent: np.ndarray, txt: np.ndarray):
            pred, kp2d, kp3d = self.core(torch.from_numpy(latent).to(self.dtype), torch.from_numpy(txt).to(self.dtype))
            return pred.float().numpy(), kp2d.float().numpy(), kp3d.float().numpy()

        def decode(latent: np.ndarray) -> np.ndarray:
            return self.decoder(torch.from_numpy(latent)).numpy()

        return run_clip(frames, tasks, text, h, w, window, overlap, self.cfg.depth_code, self.cfg.joint_names,
                        encode, core, decode, output_hw)


def write_results(results: dict[str, dict[str, np.ndarray]], out_dir: str | Path) -> list[Path]:
    """One `<task>.npz` per task."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, arrays in results.items():
        path = out / f"{task}.npz"
        np.savez(path, **arrays)
        paths.append(path)
    return paths
