"""Stage 1, only for a preset without pretrained VAE weights: the Wan VAE as an autoencoder.

A real Wan2.1 VAE stays frozen (THFM never trains it). A small preset starts from random weights, and
its decoder must be able to draw task maps as well as frames, so it is trained on both: each item is
a short random crop, in time and space, of a clip's frames or of one of its dense task maps, as a
3-channel image in [-1, 1]. The loss is L1 reconstruction plus a small KL term. The Wan VAE is
causal in time and fully convolutional, so crops of 4n+1 frames and a smaller size train the same
weights the full window uses, at a fraction of the cost (the VAE, not the transformer, is the
expensive part to train on a CPU).

After training, the per-channel latent mean and std over the training windows are written into the
VAE's config (`latents_mean`, `latents_std`, the fields Wan's pipelines normalise with), so the
transformer sees unit-scale latents as it does with the real Wan VAE.
"""

from __future__ import annotations

import logging

import torch

from ..config import DENSE_TASKS
from .data import Sample

logger = logging.getLogger(__name__)


def crop_origin(sample: Sample, t0: int, frames: int, crop: int, height: int, width: int,
                gen: torch.Generator, person_share: float, align: int = 1) -> tuple[int, int]:
    """Top-left corner of a crop: with probability person_share centred (with jitter) on a visible
    joint of the crop's frames, else uniform. The person covers a small part of a frame and is
    where the thin structures are (limbs a few pixels wide); uniform crops spend most of the loss
    on background that is easy to reconstruct. align snaps the corner down to a multiple of it
    (a crop of a latent must start on a latent cell)."""
    y0, x0 = _origin(sample, t0, frames, crop, height, width, gen, person_share)
    return y0 - y0 % align, x0 - x0 % align


def _origin(sample: Sample, t0: int, frames: int, crop: int, height: int, width: int,
            gen: torch.Generator, person_share: float) -> tuple[int, int]:
    u = float(torch.rand((), generator=gen))
    if sample.keypoints2d is not None and u < person_share:
        kp = sample.keypoints2d[t0 : t0 + frames].float().reshape(-1, 2)  # normalised x, y
        ok = (sample.visibility[t0 : t0 + frames].reshape(-1) > 0) & (kp >= 0).all(1) & (kp <= 1).all(1)
        if ok.any():
            idx = ok.nonzero().flatten()
            x, y = kp[idx[int(torch.randint(0, len(idx), (1,), generator=gen))]].tolist()
            jx, jy = ((torch.rand(2, generator=gen) - 0.5) * (crop / 2)).tolist()
            y0 = int(round(y * height + jy - crop / 2))
            x0 = int(round(x * width + jx - crop / 2))
            return min(max(y0, 0), height - crop), min(max(x0, 0), width - crop)
    return (int(torch.randint(0, height - crop + 1, (1,), generator=gen)),
            int(torch.randint(0, width - crop + 1, (1,), generator=gen)))


def vae_item(sample: Sample, source: str, frames: int, crop: int | None, gen: torch.Generator,
             person_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A random crop of the window's video or of one task map, [3, frames, c, c] in [-1, 1], and the
    same crop of the person's matte ([1, frames, c, c] in [0, 1]; None without segmentation truth)."""
    x = sample.video.float() if source == "video" else sample.maps[source].float() * 2.0 - 1.0
    matte = sample.maps["segmentation"][:1].float() if "segmentation" in sample.maps else None
    _, length, height, width = x.shape
    frames = min(frames, length)
    t0 = int(torch.randint(0, length - frames + 1, (1,), generator=gen))
    x = x[:, t0 : t0 + frames]
    matte = matte[:, t0 : t0 + frames] if matte is not None else None
    if crop and crop < min(height, width):
        y0, x0 = crop_origin(sample, t0, frames, crop, height, width, gen, person_share)
        x = x[:, :, y0 : y0 + crop, x0 : x0 + crop]
        matte = matte[:, :, y0 : y0 + crop, x0 : x0 + crop] if matte is not None else None
    return x, matte


def vae_batch(samples: list[Sample], batch: int, frames: int, crop: int | None, gen: torch.Generator,
              person_share: float = 0.0, video_share: float = 0.5,
              person_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch mixing frames and every dense task's maps, and its per-pixel loss weight.

    round(batch * video_share) rows are video (at least one while video_share > 0: the encoder must
    still learn to encode it), the rest task maps. The weight is 1 + person_weight * matte: every
    dense metric is taken on the person, a small part of the frame, so the loss can lean there."""
    n_video = max(1, round(batch * video_share)) if video_share > 0 else 0
    rows, weights = [], []
    for i in range(batch):
        s = samples[int(torch.randint(0, len(samples), (1,), generator=gen))]
        maps = [t for t in DENSE_TASKS if t in s.maps]
        if i < n_video or not maps:
            source = "video"
        else:
            source = maps[int(torch.randint(0, len(maps), (1,), generator=gen))]
        x, matte = vae_item(s, source, frames, crop, gen, person_share)
        rows.append(x)
        weights.append(1.0 + person_weight * matte if matte is not None else torch.ones_like(x[:1]))
    return torch.stack(rows), torch.stack(weights)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """The Wan decoder's output before AutoencoderKLWan.decode clamps it to [-1, 1].

    The clamp has no gradient where the output is past the range, so a loss on the clamped frames
    leaves every pixel the decoder overshoots stuck there (whole regions settle on a saturated colour
    and stop learning). decode() runs the decoder once per latent frame; a forward hook collects
    those chunks, unclamped."""
    if vae.config.patch_size is not None:
        raise ValueError("decode_unclamped: patchified Wan VAEs (Wan2.2) are not trained here")
    chunks: list[torch.Tensor] = []
    handle = vae.decoder.register_forward_hook(lambda _module, _inputs, out: chunks.append(out))
    try:
        vae.decode(z)
    finally:
        handle.remove()
    return torch.cat(chunks, 2)


def vae_loss(vae, x: torch.Tensor, kl_weight: float, gen: torch.Generator | None = None,
             sample: bool = True, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 reconstruction of a posterior sample (or, with sample=False, of the posterior mean: what
    THFM's encoder path uses), weighted per pixel by `weight` ([B, 1, T, H, W]; normalised so the
    loss stays a mean absolute error), + kl_weight * KL (per element)."""
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=gen) if sample else posterior.mode()
    recon = decode_unclamped(vae, z)
    err = (recon.float() - x.float()).abs()
    l1 = err.mean() if weight is None else (err * weight).mean() / weight.mean()
    kl = posterior.kl().mean() / z[0].numel()
    loss = l1 + kl_weight * kl
    return loss, {"vae_l1": float(l1.detach()), "vae_kl": float(kl.detach())}


@torch.no_grad()
def latent_stats(vae, samples: list[Sample], max_items: int = 16) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw (unnormalised) posterior means over video and task maps."""
    z_sum = z_sq = None
    count = 0
    vae.eval()
    for s in samples[:max_items]:
        for x in [s.video.float()] + [m.float() * 2.0 - 1.0 for m in s.maps.values()]:
            mu = vae.encode(x[None].to(next(vae.parameters()).device)).latent_dist.mode().double()  # [1, z, t, h, w]
            flat = mu.transpose(0, 1).flatten(1)  # [z, N]
            z_sum = flat.sum(1) if z_sum is None else z_sum + flat.sum(1)
            z_sq = (flat**2).sum(1) if z_sq is None else z_sq + (flat**2).sum(1)
            count += flat.shape[1]
    mean = z_sum / count
    std = (z_sq / count - mean**2).clamp_min(1e-8).sqrt()
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def set_latent_stats(vae, samples: list[Sample]) -> None:
    """Write the measured latent statistics into the VAE config (saved with save_pretrained)."""
    mean, std = latent_stats(vae, samples)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    logger.info("VAE latent statistics: mean %s, std %s", [round(m, 3) for m in mean], [round(s, 3) for s in std])
