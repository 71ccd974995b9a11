"""The VAE's ceiling in task units: ground-truth task maps encoded and decoded by a checkpoint's VAE.

A dense task's output is the VAE decoding of the core's latent, so no core can do better than the
VAE's own round trip of the ground-truth map. This measures that round trip on held-out clips in the
units `thfm eval` reports (matte IoU, normals angle on the person, depth map error, dense pose part
accuracy), for a trained VAE (is it good enough to train the core on?) and for an exported one.

    python perf/vae_roundtrip.py --checkpoint RUN/step-0004000 --gt data/synth/val [--windows 8] \
        [--depth-encoding log --depth-scale 2] [--tasks depth]

Depth is also scored as `thfm eval` scores it: the decoded map un-squashed to relative depth,
aligned per frame by scale and shift on the person, abs-rel against the ground truth's relative depth
(inside the code's range), next to the constant-depth baseline on the same pixels. --depth-encoding
and --depth-scale try another depth code (contract.depth) through the same VAE.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np
import torch

from thfm_serve.checkpoint import load_checkpoint
from thfm_serve.contract.depth import DEPTH_ENCODINGS, DepthCode
from thfm_serve.evaluation import FOREGROUND, angular_errors, decode_parts, depth_metrics
from thfm_serve.model import VaeDecoder, VaeEncoder
from thfm_serve.training.data import load_samples

logger = logging.getLogger("vae_roundtrip")


@torch.no_grad()
def roundtrip(checkpoint: str, gt: str, windows: int, depth: DepthCode | None = None,
              tasks: list[str] | None = None) -> dict[str, float]:
    ck = load_checkpoint(checkpoint)
    cfg = ck.config
    code = depth or cfg.depth_code
    encoder, decoder = VaeEncoder(ck.vae).eval(), VaeDecoder(ck.vae).eval()
    samples = load_samples(gt, cfg.frames, cfg.height, cfg.width, cfg.num_joints, code)[:windows]
    sums: dict[str, list[float]] = {}
    for s in samples:
        video = s.video.float()[None]
        rec_video = decoder(encoder(video))[0] * 2.0 - 1.0
        sums.setdefault("video/psnr_db", []).append(float(10 * torch.log10(4.0 / ((rec_video - video[0]) ** 2).mean())))
        alpha = s.maps["segmentation"][0].float().numpy() if "segmentation" in s.maps else None
        for task, want in s.maps.items():
            if tasks and task not in tasks:
                continue
            want = want.float()
            got = decoder(encoder(want[None] * 2.0 - 1.0))[0]  # [3, T, H, W] in [0, 1]
            sums.setdefault(f"{task}/map_mae", []).append(float((got - want).abs().mean()))
            g, w = got.numpy(), want.numpy()
            if task == "segmentation":
                p, t = g.mean(0) >= FOREGROUND, w[0] >= FOREGROUND
                union = np.logical_or(p, t).sum()
                if union:
                    sums.setdefault("segmentation/iou", []).append(float(np.logical_and(p, t).sum() / union))
            elif task == "normals" and alpha is not None and (alpha > 0.5).any():
                mask = alpha > 0.5
                err = angular_errors(np.moveaxis(g * 2 - 1, 0, -1)[mask], np.moveaxis(w * 2 - 1, 0, -1)[mask])
                sums.setdefault("normals/mean_deg_on_person", []).append(float(err.mean()))
            elif task == "densepose" and alpha is not None and (alpha > 0.5).any():
                mask = alpha > 0.5
                ok = decode_parts(np.moveaxis(g, 0, -1))[mask] == decode_parts(np.moveaxis(w, 0, -1))[mask]
                sums.setdefault("densepose/part_acc_on_person", []).append(float(ok.mean()))
            elif task == "depth" and alpha is not None and (alpha > 0.5).any():
                mask = alpha > 0.5
                sums.setdefault("depth/map_mae_on_person", []).append(float(np.abs(g[0] - w[0])[mask].mean()))
                inside = mask & (w[0] > 0) & (w[0] < 1)  # where the code holds the true depth
                truth, got_rel = code.decode(w.mean(0)), code.decode(g.mean(0))
                for f in range(truth.shape[0]):
                    if inside[f].sum() >= 16:
                        sums.setdefault("depth/abs_rel_on_person", []).append(
                            depth_metrics(got_rel[f], truth[f], inside[f])["abs_rel"])
                        sums.setdefault("depth/abs_rel_constant_baseline", []).append(
                            depth_metrics(np.ones_like(truth[f]), truth[f], inside[f])["abs_rel"])
    return {k: round(sum(v) / len(v), 5) for k, v in sorted(sums.items())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--gt", required=True, help="clips with ground truth (thfm synth layout)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--depth-encoding", choices=DEPTH_ENCODINGS, help="depth code to try (default: the checkpoint's)")
    p.add_argument("--depth-scale", type=float, help="its gain a (default: the checkpoint's)")
    p.add_argument("--tasks", help="comma-separated dense tasks to round-trip (default: all)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.threads:
        torch.set_num_threads(a.threads)
    depth = None
    if a.depth_encoding or a.depth_scale:
        cfg = load_checkpoint(a.checkpoint, text_encoder=False).config
        depth = DepthCode(a.depth_encoding or cfg.depth_encoding, a.depth_scale or cfg.depth_log_scale)
    result = roundtrip(a.checkpoint, a.gt, a.windows, depth, a.tasks.split(",") if a.tasks else None)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
