"""Depth error per clip, split by the number of people, with how much of the person the depth code can hold.

    python docs/training-run10/depth_clips.py PRED_DIR GT_DIR [--depth-scale 2]

Per clip, as `thfm eval` scores depth (per frame: least squares scale and shift on the ground
truth's foreground, alpha >= 0.5, then abs-rel; the mean over frames): the model's abs-rel, the
constant-depth baseline's, and the share of foreground pixels whose depth relative to the clip's
median foreground depth lies outside the centred log code's range (relative depth beyond
exp(+-0.5 / a)); those pixels reach the map clipped, so no model on that code can draw them. Then
the means over all clips, over one-person and over two-person clips."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from thfm_serve.evaluation import FOREGROUND, depth_metrics

logger = logging.getLogger("depth_clips")


def clip_row(pred_dir: Path, clip: Path, scale: float) -> dict:
    depth = np.load(clip / "depth.npz")["depth"]
    person = np.load(clip / "segmentation.npz")["alpha"] >= FOREGROUND
    pred = np.load(pred_dir / clip.name / "depth.npz")["depth"]
    relative = depth[person] / np.median(depth[person])
    reach = np.exp(0.5 / scale)
    frames = [f for f in range(len(depth)) if person[f].any()]
    model = [depth_metrics(pred[f], depth[f], person[f])["abs_rel"] for f in frames]
    constant = [depth_metrics(np.ones_like(depth[f]), depth[f], person[f])["abs_rel"] for f in frames]
    return {"clip": clip.name, "people": json.loads((clip / "camera.json").read_text())["scene"]["people"],
            "model": float(np.mean(model)), "constant": float(np.mean(constant)),
            "outside_code": float(np.mean((relative < 1 / reach) | (relative > reach)))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pred")
    p.add_argument("gt")
    p.add_argument("--depth-scale", type=float, default=2.0, help="the centred log code's gain a")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [clip_row(Path(args.pred), c, args.depth_scale) for c in sorted(Path(args.gt).glob("clip_*"))]
    logger.info("| clip | people | model abs-rel | constant abs-rel | foreground outside the code |")
    logger.info("|---|---:|---:|---:|---:|")
    for r in rows:
        logger.info("| %s | %d | %.4f | %.4f | %.1f%% |", r["clip"], r["people"], r["model"], r["constant"],
                    100 * r["outside_code"])
    for name, group in (("all", rows), ("one person", [r for r in rows if r["people"] == 1]),
                        ("two people", [r for r in rows if r["people"] == 2])):
        if group:
            logger.info("| mean, %s (%d clips) | | %.4f | %.4f | %.1f%% |", name, len(group),
                        np.mean([r["model"] for r in group]), np.mean([r["constant"] for r in group]),
                        100 * np.mean([r["outside_code"] for r in group]))


if __name__ == "__main__":
    main()
