"""How much of the person's depth relief a prediction carries: per frame, on the ground truth's
foreground (alpha >= 0.5), the correlation of predicted and true log depth (each minus its median),
the ratio of their spreads, and the abs-rel after the best affine fit in log space against a constant.

Usage: python depth_relief.py PRED_DIR GT_DIR OUT.json  (folders of <clip>/depth.npz, as `thfm eval`)
"""

import json
import sys
from pathlib import Path

import numpy as np


def frame_stats(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> tuple[float, float, float, float]:
    x, y = np.log(pred[mask]), np.log(gt[mask])
    x, y = x - np.median(x), y - np.median(y)
    a = np.stack([x, np.ones_like(x)], 1)
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    fit = float(np.mean(np.abs(np.exp(y - a @ coef) - 1)))
    const = float(np.mean(np.abs(np.exp(y - y.mean()) - 1)))
    return float(np.corrcoef(x, y)[0, 1]), float(x.std() / y.std()), fit, const


def main(pred_dir: str, gt_dir: str, out: str) -> None:
    rows = []
    for clip in sorted(p.name for p in Path(pred_dir).iterdir() if (p / "depth.npz").is_file()):
        with np.load(Path(pred_dir) / clip / "depth.npz") as p, np.load(Path(gt_dir) / clip / "depth.npz") as g, \
                np.load(Path(gt_dir) / clip / "segmentation.npz") as s:
            pred, gt, alpha = p[p.files[0]], g[g.files[0]], s[s.files[0]]
        rows += [frame_stats(pred[f], gt[f], alpha[f] >= 0.5) for f in range(gt.shape[0]) if (alpha[f] >= 0.5).sum() >= 50]
    r = np.array(rows)
    result = {"frames": len(rows), "corr_mean": r[:, 0].mean(), "corr_median": float(np.median(r[:, 0])),
              "spread_ratio_mean": r[:, 1].mean(), "abs_rel_affine_log_fit": r[:, 2].mean(), "abs_rel_constant": r[:, 3].mean()}
    Path(out).write_text(json.dumps({k: round(float(v), 4) for k, v in result.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
