"""Stage 3, only for a preset without pretrained VAE weights: the VAE decoder adapted to the core.

Every dense output is the decoder's drawing of the latent the core predicts. Stage 2 trains the core
to land on the encoder's latent of the ground-truth map, and it lands near it, not on it; the decoder
only ever learned to draw the encoder's own latents (stage 1). This stage shows the decoder what the
core actually gives it: the trained core (frozen) predicts a task's latent for a training window, the
decoder draws a crop of it, and the L1 loss compares that with the same crop of the ground-truth map,
weighted towards the person like stage 1.

The encoder and the core stay as they are, so the latent space, its statistics and every cached
latent keep their meaning; only the map drawn from a latent changes. A real Wan2.1 VAE is never
trained (THFM keeps it frozen): the trainer refuses this stage for one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import DENSE_TASKS
from ..contract.geometry import VAE_SPATIAL
from .core_stage import LatentSample
from .data import Sample
from .vae_stage import crop_origin, decode_unclamped

logger = logging.getLogger(__name__)


@dataclass
class AdaptBatch:
    tasks: list[str]  # per row: a dense task
    latent: torch.Tensor  # [B, 16, T', h, w] normalised video latents
    text: torch.Tensor  # [B, L, D] the rows' prompt embeddings
    origins: list[tuple[int, int]]  # per row: the crop's top-left pixel (a multiple of the latent cell)
    target: torch.Tensor  # [B, 3, T, c, c] the ground-truth crops in [-1, 1]
    weight: torch.Tensor  # [B, 1, T, c, c] per-pixel loss weight: 1 + person_weight * matte (1 for the matte)


def adapt_batch(windows: list[tuple[LatentSample, Sample]], prompt_embeds: dict[str, torch.Tensor],
                batch: int, crop: int | None, gen: torch.Generator, person_share: float = 0.0,
                person_weight: float = 0.0) -> AdaptBatch:
    """Rows of (window, dense task): the window's cached video latent and prompt for the core, and the
    crop of the task's ground-truth map the decoder should draw from the core's prediction."""
    rows = []
    for _ in range(batch):
        lat, s = windows[int(torch.randint(0, len(windows), (1,), generator=gen))]
        tasks = [t for t in DENSE_TASKS if t in s.maps and t in prompt_embeds]
        if not tasks:
            raise ValueError(f"window {s.clip}@{s.start} has no dense ground truth for the tasks being trained")
        task = tasks[int(torch.randint(0, len(tasks), (1,), generator=gen))]
        _, frames, height, width = s.maps[task].shape
        c = crop if crop and crop < min(height, width) else None
        y0, x0 = (crop_origin(s, 0, frames, c, height, width, gen, person_share, align=VAE_SPATIAL)
                  if c else (0, 0))
        ch, cw = (c, c) if c else (height, width)
        target = s.maps[task][:, :, y0 : y0 + ch, x0 : x0 + cw].float() * 2.0 - 1.0
        matte = (s.maps["segmentation"][:1, :, y0 : y0 + ch, x0 : x0 + cw].float() if "segmentation" in s.maps
                 else torch.zeros_like(target[:1]))
        # The matte's own rows are weighted evenly: weighting them by the ground-truth matte makes a
        # missed person pixel cost more than a false one, and the decoder learns to grow the silhouette.
        weight = torch.ones_like(matte) if task == "segmentation" else 1.0 + person_weight * matte
        rows.append((task, lat.latent, prompt_embeds[task], (y0, x0), target, weight))
    return AdaptBatch(
        tasks=[r[0] for r in rows],
        latent=torch.stack([r[1] for r in rows]),
        text=torch.stack([r[2] for r in rows]),
        origins=[r[3] for r in rows],
        target=torch.stack([r[4] for r in rows]),
        weight=torch.stack([r[5] for r in rows]),
    )


def crop_latents(latent: torch.Tensor, origins: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    """[B, z, T', h, w] -> the latent cells under each row's pixel crop of height x width."""
    ch, cw = height // VAE_SPATIAL, width // VAE_SPATIAL
    return torch.stack([latent[i, :, :, y0 // VAE_SPATIAL : y0 // VAE_SPATIAL + ch, x0 // VAE_SPATIAL : x0 // VAE_SPATIAL + cw]
                        for i, (y0, x0) in enumerate(origins)])


def adapt_loss(decoder, core, batch: AdaptBatch, device) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted L1 between the decoder's (unclamped) drawing of the core's predicted latent and the
    ground truth, over each row's crop; also the loss per task. `decoder` is the model's VaeDecoder
    (its denormalisation is the served one); only its VAE's decoder half learns."""
    with torch.no_grad():
        pred = core(batch.latent.to(device), batch.text.to(device))[0].float()  # normalised latents
        z = crop_latents(decoder.denormalise(pred), batch.origins, batch.target.shape[-2], batch.target.shape[-1])
    recon = decode_unclamped(decoder.vae, z)
    err = (recon.float() - batch.target.to(device)).abs() * batch.weight.to(device)
    per_row = err.flatten(1).mean(1) / batch.weight.to(device).flatten(1).mean(1)
    per_task: dict[str, list[float]] = {}
    for t, v in zip(batch.tasks, per_row.detach().tolist()):
        per_task.setdefault(t, []).append(v)
    return per_row.mean(), {t: sum(v) / len(v) for t, v in per_task.items()}


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """What stage 3 trains: the decoder and the 1x1 convolution in front of it, nothing the encoder uses."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
