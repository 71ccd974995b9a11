"""Stage 3, only for a preset without pretrained VAE weights: the VAE decoder adapted to the core.

Every dense output is the decoder's drawing of the latent the core predicts. Stage 2 trains the core
to land on the encoder's latent of the ground-truth map, and it lands near it, not on it; the decoder
only ever learned to draw the encoder's own latents (stage 1). This stage shows the decoder what the
core actually gives it: the trained core (frozen) predicts a task's latent for a training window, the
decoder draws a crop of it, and the L1 loss compares that with the same crop of the ground-truth map,
weighted towards the person like stage 1. Optional terms (`MetricTerms`) add what `thfm eval` scores
and the L1 does not see: the normals' angle, depth up to the per-frame scale and shift the depth
metric aligns away, and the matte's overlap.

The encoder and the core stay as they are, so the latent space, its statistics and every cached
latent keep their meaning; only the map drawn from a latent changes. A real Wan2.1 VAE is never
trained (THFM keeps it frozen): the trainer refuses this stage for one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..config import DENSE_TASKS
from ..contract.geometry import VAE_SPATIAL
from ..evaluation import FOREGROUND
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
    matte: torch.Tensor  # [B, 1, T, c, c] the ground-truth matte of the crop (zeros where the window has none)


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
        rows.append((task, lat.latent, prompt_embeds[task], (y0, x0), target, weight, matte))
    return AdaptBatch(
        tasks=[r[0] for r in rows],
        latent=torch.stack([r[1] for r in rows]),
        text=torch.stack([r[2] for r in rows]),
        origins=[r[3] for r in rows],
        target=torch.stack([r[4] for r in rows]),
        weight=torch.stack([r[5] for r in rows]),
        matte=torch.stack([r[6] for r in rows]),
    )


def crop_latents(latent: torch.Tensor, origins: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    """[B, z, T', h, w] -> the latent cells under each row's pixel crop of height x width."""
    ch, cw = height // VAE_SPATIAL, width // VAE_SPATIAL
    return torch.stack([latent[i, :, :, y0 // VAE_SPATIAL : y0 // VAE_SPATIAL + ch, x0 // VAE_SPATIAL : x0 // VAE_SPATIAL + cw]
                        for i, (y0, x0) in enumerate(origins)])


@dataclass(frozen=True)
class MetricTerms:
    """Weights of stage 3's terms in what `thfm eval` scores, added to the L1 of the rows they apply to.

    The L1 on the map's values is not what the metrics measure. Normals are scored by angle, and an L1
    that is as happy with a shorter vector as with a turned one leaves direction under-trained. Depth
    is scored after a least-squares scale and shift per frame, so the L1's pull towards the exact code
    spends capacity on an offset the metric ignores. The matte is scored by IoU at 0.5, which the L1
    reaches only through every pixel's value. Each term is computed on the ground truth's person
    (matte >= 0.5), as `thfm eval` is, and is 0 for a crop without one."""

    normals_angle: float = 0.0  # x mean angle (radians) between drawn and true normals
    depth_ssi: float = 0.0  # x mean |s * drawn + t - true| of the depth code ([-1, 1] units), s and t per frame
    matte_iou: float = 0.0  # x (1 - soft IoU) of the drawn matte

    def __post_init__(self) -> None:
        for name in ("normals_angle", "depth_ssi", "matte_iou"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"stage 3 metric term {name} = {value!r}: must be a finite number >= 0")

    def active(self) -> bool:
        return bool(self.normals_angle or self.depth_ssi or self.matte_iou)


MIN_PERSON_PIXELS = 16  # fewer ground-truth person pixels in a crop's frame than this: no metric term there


def normals_angle(drawn: torch.Tensor, target: torch.Tensor, person: torch.Tensor) -> torch.Tensor | None:
    """[3, T, h, w] normals in [-1, 1] (either length), [T, h, w] bool -> mean angle in radians over
    the person's pixels (atan2 of |a x b| and a.b: exact for unnormalised vectors, and its gradient stays
    finite where arccos of a normalised dot product's does not, at 0 and 180 degrees)."""
    if int(person.sum()) < MIN_PERSON_PIXELS:
        return None
    a, b = drawn[:, person], target[:, person]  # [3, N]
    cross = torch.sqrt((torch.linalg.cross(a, b, dim=0) ** 2).sum(0) + 1e-12)
    return torch.atan2(cross, (a * b).sum(0)).mean()


def depth_ssi(drawn: torch.Tensor, target: torch.Tensor, person: torch.Tensor) -> torch.Tensor | None:
    """[3, T, h, w] depth codes, [T, h, w] bool -> mean over frames of the L1 between the drawn code
    (channel mean) after its least-squares scale and shift onto the true code and the true code, on the
    person: the depth metric's own alignment, in code units (the code is log depth, so an error of e
    is about e / (2 a) relative depth in the [-1, 1] units used here)."""
    d, g = drawn.mean(0), target.mean(0)
    losses = []
    for f in range(d.shape[0]):
        m = person[f]
        if int(m.sum()) < MIN_PERSON_PIXELS:
            continue
        p, q = d[f][m], g[f][m]
        pc, qc = p - p.mean(), q - q.mean()
        scale = (pc * qc).sum() / ((pc * pc).sum() + 1e-6)  # a flat drawing gets scale ~0: the constant's error
        losses.append((scale * pc - qc).abs().mean())
    return torch.stack(losses).mean() if losses else None


def matte_soft_iou(drawn: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """[3, T, h, w] mattes in [-1, 1] -> 1 - soft IoU (the product for the intersection) of the drawn
    matte, clamped to [0, 1], and the true one; None when the crop holds no person."""
    g = (target.mean(0) + 1.0) / 2.0
    if float((g >= FOREGROUND).sum()) < MIN_PERSON_PIXELS:
        return None
    p = ((drawn.mean(0) + 1.0) / 2.0).clamp(0.0, 1.0)
    inter = (p * g).sum()
    return 1.0 - inter / (p.sum() + g.sum() - inter)


def adapt_loss(decoder, core, batch: AdaptBatch, device,
               terms: MetricTerms = MetricTerms()) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted L1 between the decoder's (unclamped) drawing of the core's predicted latent and the
    ground truth, over each row's crop, plus the `terms` of the rows they apply to; also the L1 per
    task and each metric term's mean (`normals_angle_deg`, `depth_ssi`, `matte_1-iou`). `decoder` is the
    model's VaeDecoder (its denormalisation is the served one); only its VAE's decoder half learns."""
    with torch.no_grad():
        pred = core(batch.latent.to(device), batch.text.to(device))[0].float()  # normalised latents
        z = crop_latents(decoder.denormalise(pred), batch.origins, batch.target.shape[-2], batch.target.shape[-1])
    recon = decode_unclamped(decoder.vae, z).float()
    target, weight = batch.target.to(device), batch.weight.to(device)
    err = (recon - target).abs() * weight
    per_row = err.flatten(1).mean(1) / weight.flatten(1).mean(1)
    per_task: dict[str, list[float]] = {}
    for t, v in zip(batch.tasks, per_row.detach().tolist()):
        per_task.setdefault(t, []).append(v)
    total = per_row.sum()
    if terms.active():
        person = batch.matte.to(device)[:, 0] >= FOREGROUND  # [B, T, c, c], as `thfm eval` counts the person
        for i, task in enumerate(batch.tasks):
            if task == "normals" and terms.normals_angle:
                name, weight_i, term = "normals_angle_deg", terms.normals_angle, normals_angle(recon[i], target[i], person[i])
            elif task == "depth" and terms.depth_ssi:
                name, weight_i, term = "depth_ssi", terms.depth_ssi, depth_ssi(recon[i], target[i], person[i])
            elif task == "segmentation" and terms.matte_iou:
                name, weight_i, term = "matte_1-iou", terms.matte_iou, matte_soft_iou(recon[i], target[i])
            else:
                continue
            if term is not None:
                total = total + weight_i * term
                shown = float(term.detach())
                per_task.setdefault(name, []).append(math.degrees(shown) if task == "normals" else shown)
    return total / len(batch.tasks), {t: sum(v) / len(v) for t, v in per_task.items()}


def decoder_parameters(vae) -> list[torch.nn.Parameter]:
    """What stage 3 trains: the decoder and the 1x1 convolution in front of it, nothing the encoder uses."""
    return list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
