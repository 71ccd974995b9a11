"""Stage 2: the transformer fine-tune at timestep 0 (THFM's recipe).

The VAE is frozen here, so each window's video latent and dense target latents are computed once
(`cache_latents`) and the transformer trains on them. A batch mixes tasks: each row is (window
latent, the task's cached prompt embedding, the task's target). The core runs once per batch:

* dense rows: L2 between the core's latent (-v) and the VAE latent of the 3-channel target image;
* keypoints2d rows: L1 on normalised image coordinates (occluded joints at half weight);
* keypoints3d rows: L1 in metres on root-relative joints.
Per-task weights scale the rows (GenCeption reports that joint training hurts 3D keypoints most).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DENSE_TASKS, TASKS
from .data import Sample

logger = logging.getLogger(__name__)


@dataclass
class LatentSample:
    """A window with its frozen-VAE latents: what stage 2 trains on."""

    clip: str
    start: int
    latent: torch.Tensor  # [16, T', h, w] normalised video latent
    targets: dict[str, torch.Tensor] = field(default_factory=dict)  # dense task -> [16, T', h, w]
    keypoints2d: torch.Tensor | None = None  # [T, K, 2]
    visibility: torch.Tensor | None = None  # [T, K]
    keypoints3d: torch.Tensor | None = None  # [T, K, 3]
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # ground-truth maps, kept for validation

    @property
    def tasks(self) -> list[str]:
        out = [t for t in DENSE_TASKS if t in self.targets]
        if self.keypoints2d is not None:
            out.append("keypoints2d")
        if self.keypoints3d is not None:
            out.append("keypoints3d")
        return out


def _encoder_inputs(s: Sample) -> list[torch.Tensor]:
    """What the encoder sees for one window: the video, then each dense target map as a 3-channel
    image in [-1, 1] (the way RGB video is encoded), in DENSE_TASKS order."""
    return [s.video.float()] + [s.maps[t].float() * 2.0 - 1.0 for t in DENSE_TASKS if t in s.maps]


DECODE_ONLY = {"decoder", "post_quant_conv"}  # Wan VAE modules that encoding never runs


def latent_key(encoder, samples: list[Sample]) -> str:
    """Names one set of cached latents: a digest of what encoding uses (the encoder's weights and its
    latent statistics) and of every pixel it is given, so a store written for other weights, clips or
    windows never matches. The decoder's weights are left out: stage 3 changes only those, so a
    stage 3 continued in a new run reads the latents of the one before it instead of encoding again."""
    h = hashlib.sha256()
    # named_buffers: the latent statistics are non-persistent buffers, absent from state_dict()
    tensors = {**dict(encoder.named_parameters()), **dict(encoder.named_buffers())}
    for name, t in sorted(tensors.items()):
        if DECODE_ONLY.intersection(name.split(".")):
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    for s in samples:
        h.update(f"{s.clip}:{s.start}:{sorted(s.maps)}".encode())
        for x in [s.video] + [s.maps[t] for t in sorted(s.maps)]:  # as held (fp16), before the [-1, 1] shift
            h.update(f"{tuple(x.shape)}{x.dtype}".encode())
            h.update(x.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def cache_latents(encoder, samples: list[Sample], device: torch.device | str = "cpu",
                  keep_maps: bool = False, store: Path | None = None) -> list[LatentSample]:
    """Encode every window's video and dense target maps with the frozen VAE encoder
    (`model.VaeEncoder`: distribution mode, Wan's latent normalisation). keep_maps keeps the
    ground-truth maps too (validation compares the decoded prediction with them).

    With `store` (a path prefix, e.g. RUN/latents/train), the latents are kept in STORE-<key>.pt
    (`latent_key`) and read back by a later call with the same encoder and inputs: on a CPU the
    encoding takes longer than many core steps, and a resumed run would otherwise repeat it on every
    start. A new store replaces the prefix's older ones."""
    encoder.eval()
    lats: list[torch.Tensor] | None = None
    path = None
    if store is not None:
        store = Path(store)
        path = store.parent / f"{store.name}-{latent_key(encoder, samples)}.pt"
        if path.is_file():
            lats = torch.load(path, map_location="cpu", weights_only=True)
            if len(lats) != len(samples):
                raise ValueError(f"latent store {path} holds {len(lats)} windows, expected {len(samples)}")
            logger.info("read %d windows' latents from %s", len(lats), path)
    if lats is None:
        lats = []
        started = time.monotonic()
        every = max(1, len(samples) // 10)
        for i, s in enumerate(samples, 1):
            lats.append(encoder(torch.stack(_encoder_inputs(s)).to(device)).float().cpu())
            if i % every == 0 or i == len(samples):
                # on a CPU this takes minutes to an hour before the first step: say how far it is
                spent = time.monotonic() - started
                logger.info("latents: %d of %d windows encoded in %.0f s (about %.0f s left)",
                            i, len(samples), spent, spent / i * (len(samples) - i))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(lats, tmp)
            os.replace(tmp, path)  # a run stopped mid-write leaves no half store under the real name
            for old in path.parent.glob(f"{store.name}-*.pt"):
                if old != path:
                    old.unlink()
    out = []
    for s, lat in zip(samples, lats):  # lat: [1 + n_dense, 16, T', h, w]
        dense = [t for t in DENSE_TASKS if t in s.maps]
        out.append(LatentSample(
            clip=s.clip, start=s.start, latent=lat[0],
            targets={t: lat[1 + i] for i, t in enumerate(dense)},
            keypoints2d=s.keypoints2d, visibility=s.visibility, keypoints3d=s.keypoints3d,
            maps=dict(s.maps) if keep_maps else {},
        ))
    return out


@dataclass
class Batch:
    tasks: list[str]  # per row
    latent: torch.Tensor  # [B, 16, T', h, w]
    text: torch.Tensor  # [B, L, D]
    rows: list[LatentSample]


def sample_batch(data: list[LatentSample], prompt_embeds: dict[str, torch.Tensor], tasks: list[str],
                 batch: int, gen: torch.Generator) -> Batch:
    """Rows with tasks drawn in turn from a shuffled task list (every task in every batch of at least
    len(tasks) rows), each paired with a random window that has ground truth for it."""
    by_task = {t: [s for s in data if t in s.tasks] for t in tasks}
    usable = [t for t in tasks if by_task[t]]
    if not usable:
        raise ValueError("no window has ground truth for any of the tasks being trained")
    order = [usable[i] for i in torch.randperm(len(usable), generator=gen).tolist()]
    row_tasks = [order[i % len(order)] for i in range(batch)]
    rows = [by_task[t][int(torch.randint(0, len(by_task[t]), (1,), generator=gen))] for t in row_tasks]
    return Batch(
        tasks=row_tasks,
        latent=torch.stack([r.latent for r in rows]),
        text=torch.stack([prompt_embeds[t] for t in row_tasks]),
        rows=rows,
    )


def row_losses(batch: Batch, pred: torch.Tensor, kp2d: torch.Tensor, kp3d: torch.Tensor) -> list[torch.Tensor]:
    """One scalar loss per batch row, for that row's task."""
    device = pred.device
    out = []
    for i, (task, row) in enumerate(zip(batch.tasks, batch.rows)):
        if task in DENSE_TASKS:
            out.append(((pred[i].float() - row.targets[task].to(device)) ** 2).mean())
        elif task == "keypoints2d":
            vis = row.visibility.to(device)[..., None]  # [T, K, 1]
            err = (kp2d[i].float() - row.keypoints2d.to(device)).abs() * vis
            out.append(err.sum() / (vis.sum() * 2).clamp_min(1.0))
        elif task == "keypoints3d":
            out.append((kp3d[i].float() - row.keypoints3d.to(device)).abs().mean())
        else:
            raise ValueError(f"unknown task {task!r}")
    return out


def batch_loss(core, batch: Batch, weights: dict[str, float], device, autocast_dtype: torch.dtype | None):
    """(weighted mean loss, {task: mean unweighted loss over its rows})."""
    latent = batch.latent.to(device)
    text = batch.text.to(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
        pred, kp2d, kp3d = core(latent, text)
    losses = row_losses(batch, pred, kp2d, kp3d)
    total = torch.stack([weights.get(t, 1.0) * loss for t, loss in zip(batch.tasks, losses)]).mean()
    per_task: dict[str, list[float]] = {}
    for t, loss in zip(batch.tasks, losses):
        per_task.setdefault(t, []).append(float(loss.detach()))
    return total, {t: sum(v) / len(v) for t, v in per_task.items()}


@torch.no_grad()
def validate(core, decoder, data: list[LatentSample], prompt_embeds: dict[str, torch.Tensor], tasks: list[str],
             device, height: int, width: int, decode: bool = True) -> dict[str, float]:
    """Held-out monitors per task, on the model grid: latent L2 (the training loss) and, with `decode`
    and ground-truth maps, the mean absolute error of the decoded map in [0, 1] (and the matte's IoU
    at 0.5); keypoints2d mean error in model pixels and PCK at 0.1 of the image size; keypoints3d
    MPJPE in mm (root-relative). The paper's metrics at the input resolution are `thfm eval`'s."""
    core.eval()
    sums: dict[str, list[float]] = {}
    for s in data:
        for t in [t for t in tasks if t in s.tasks]:
            pred, kp2d, kp3d = core(s.latent[None].to(device), prompt_embeds[t][None].to(device))
            if t in DENSE_TASKS:
                sums.setdefault(f"{t}/latent_l2", []).append(float(((pred[0].float().cpu() - s.targets[t]) ** 2).mean()))
                if decode and t in s.maps:
                    got = decoder(pred.float()).cpu()[0]  # [3, T, H, W] in [0, 1]
                    want = s.maps[t].float()
                    sums.setdefault(f"{t}/map_mae", []).append(float((got - want).abs().mean()))
                    if t == "segmentation":
                        a, b = got.mean(0) > 0.5, want.mean(0) > 0.5
                        union = (a | b).sum()
                        if union > 0:
                            sums.setdefault(f"{t}/iou", []).append(float((a & b).sum() / union))
            elif t == "keypoints2d":
                scale = torch.tensor([width, height], dtype=torch.float32)
                err = ((kp2d[0].cpu() - s.keypoints2d) * scale).norm(dim=-1)  # [T, K] pixels
                vis = s.visibility >= 1.0  # visible joints only, as `thfm eval` counts them
                if vis.any():
                    sums.setdefault(f"{t}/px", []).append(float(err[vis].mean()))
                    sums.setdefault(f"{t}/pck@0.1img", []).append(float((err[vis] < 0.1 * max(height, width)).float().mean()))
            elif t == "keypoints3d":
                sums.setdefault(f"{t}/mpjpe_mm", []).append(float((kp3d[0].cpu() - s.keypoints3d).norm(dim=-1).mean() * 1000))
    core.train()
    return {k: sum(v) / len(v) for k, v in sorted(sums.items())}


def parse_task_weights(items: list[str]) -> dict[str, float]:
    """['keypoints3d=2', ...] -> {task: weight}."""
    out = {}
    for item in items:
        task, sep, value = item.partition("=")
        task = task.strip()
        if not sep or task not in TASKS:
            raise ValueError(f"task weight {item!r}: expected TASK=NUMBER with TASK one of {', '.join(TASKS)}")
        try:
            out[task] = float(value)
        except ValueError:
            raise ValueError(f"task weight {item!r}: {value!r} is not a number") from None
        if out[task] < 0:
            raise ValueError(f"task weight {item!r} is negative")
    return out
