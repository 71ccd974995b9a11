"""Depth error on the person's interior and on its rim, for predictions written by `thfm eval`.

    python docs/training-run9/depth_rim.py PRED_DIR GT_DIR [--rim 2]

Per frame, as `thfm eval` scores depth: the prediction aligned to the ground truth by least squares
scale and shift on the person (alpha >= 0.5), then abs-rel on the interior (the person eroded by
--rim pixels) and on the rim, the correlation of prediction and truth on the interior, and the
constant-depth baseline on the whole person. Means over frames."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from thfm_serve.evaluation import FOREGROUND, align_depth

logger = logging.getLogger("depth_rim")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("pred")
    p.add_argument("gt")
    p.add_argument("--rim", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: dict[str, list[float]] = {}
    for clip in sorted(c for c in Path(args.pred).iterdir() if (c / "depth.npz").exists()):
        pred = np.load(clip / "depth.npz")["depth"]
        gt = np.load(Path(args.gt) / clip.name / "depth.npz")["depth"]
        alpha = np.load(Path(args.gt) / clip.name / "segmentation.npz")["alpha"]
        for f in range(gt.shape[0]):
            person = alpha[f] >= FOREGROUND
            inner = ndimage.binary_erosion(person, iterations=args.rim)
            if not inner.any():
                continue
            err = np.abs(np.maximum(align_depth(pred[f], gt[f], person), 1e-6) - gt[f]) / gt[f]
            const = np.abs(gt[f][person].mean() - gt[f]) / gt[f]
            for name, value in (("abs_rel_person", err[person].mean()), ("abs_rel_interior", err[inner].mean()),
                                ("abs_rel_rim", err[person & ~inner].mean()), ("constant_person", const[person].mean()),
                                ("corr_interior", np.corrcoef(pred[f][inner], gt[f][inner])[0, 1]),
                                ("rim_share", (person & ~inner).sum() / person.sum())):
                rows.setdefault(name, []).append(float(value))
    for name, values in rows.items():
        logger.info("%s %.4f (median %.4f, %d frames)", name, np.nanmean(values), np.nanmedian(values), len(values))


if __name__ == "__main__":
    main()
