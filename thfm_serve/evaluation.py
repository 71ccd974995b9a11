"""Accuracy of THFM outputs against ground truth, in the metrics the paper reports.

Predictions and ground truth are the engine's `<task>.npz` layouts (processing.OUTPUT_KEYS), one
folder per clip (`thfm synth` writes ground truth that way, `thfm predict` predictions). Per task:

- depth: the prediction is relative, so per frame it is aligned to the metric ground truth by least
  squares scale and shift (MiDaS' protocol; `scale` alone with align='scale') on the ground truth's
  foreground (alpha >= 0.5), then abs-rel, RMSE (metres) and delta < 1.25 on that foreground;
- normals: angle between unit vectors on the foreground: mean, median, % within 11.25/22.5/30 deg;
- segmentation: MSE and MAD of the matte over all pixels, IoU of the mattes thresholded at 0.5;
- densepose: part accuracy on ground-truth body pixels (the I channel decoded as round(I * 24)), and
  UV error (Euclidean, v taken around the circle it is) on body pixels whose part is right;
- keypoints2d: mean pixel error over visible joints, PCK at 0.05 and 0.1 of the person's box size
  (the longer side of the box around the ground-truth joints);
- keypoints3d: MPJPE and PA-MPJPE (after a per-frame similarity Procrustes alignment) in millimetres.

Each metric function takes arrays and returns floats; evaluate_clip/evaluate_dirs assemble them into
per-clip and overall tables (overall = mean over clips of each clip's value). Trivial baselines
(constant depth, a camera-facing normal, an empty matte, background dense pose, the set's mean pose)
are scored with the same functions, so a reader sees what a good number is.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import SPARSE_TASKS, TASKS
from .errors import ShapeError, ThfmError
from .processing import OUTPUT_KEYS as KEYS
from .synth.body import NUM_PARTS  # DensePose's surface parts; the I channel holds part / NUM_PARTS

logger = logging.getLogger(__name__)

FOREGROUND = 0.5  # alpha at or above which a pixel is the person's


# --- metrics ------------------------------------------------------------------------------------


def align_depth(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, mode: str = "scale_shift") -> np.ndarray:
    """Least-squares s (and t) minimising |s * pred + t - gt|^2 over mask; returns s * pred + t."""
    p, g = pred[mask].astype(np.float64), gt[mask].astype(np.float64)
    if p.size == 0:
        raise ShapeError("depth alignment: empty mask")
    if mode == "scale_shift":
        a = np.stack([p, np.ones_like(p)], 1)
        (s, t), *_ = np.linalg.lstsq(a, g, rcond=None)
    elif mode == "scale":
        s, t = (p @ g) / max(p @ p, 1e-12), 0.0
    else:
        raise ValueError(f"unknown depth alignment {mode!r}; use 'scale_shift' or 'scale'")
    return s * pred + t


def depth_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray, align: str | None = "scale_shift") -> dict:
    """One frame [H, W]: abs-rel, RMSE and delta < 1.25 on mask (after alignment unless align=None)."""
    if not mask.any():
        return {}
    a = align_depth(pred, gt, mask, align) if align else pred.astype(np.float64)
    p, g = np.maximum(a[mask], 1e-6), gt[mask].astype(np.float64)
    return {"abs_rel": float(np.mean(np.abs(p - g) / g)), "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
            "delta1": float(np.mean(np.maximum(p / g, g / p) < 1.25))}


def angular_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[..., 3] normals -> angles in degrees (both normalised first)."""
    p = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    g = gt / np.maximum(np.linalg.norm(gt, axis=-1, keepdims=True), 1e-12)
    return np.degrees(np.arccos(np.clip(np.sum(p * g, axis=-1), -1.0, 1.0)))


def normals_metrics(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> dict:
    err = angular_errors(pred[mask], gt[mask])
    if err.size == 0:
        return {}
    return {"mean_deg": float(err.mean()), "median_deg": float(np.median(err)),
            "within_11.25": float(np.mean(err < 11.25) * 100), "within_22.5": float(np.mean(err < 22.5) * 100),
            "within_30": float(np.mean(err < 30) * 100)}


def matte_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    d = pred.astype(np.float64) - gt
    p, g = pred >= FOREGROUND, gt >= FOREGROUND
    union = np.logical_or(p, g).sum()
    return {"mse": float(np.mean(d ** 2)), "mad": float(np.mean(np.abs(d))),
            "iou": float(np.logical_and(p, g).sum() / union) if union else 1.0}


def decode_parts(iuv: np.ndarray) -> np.ndarray:
    return np.clip(np.round(iuv[..., 0] * NUM_PARTS), 0, NUM_PARTS).astype(np.int64)


def densepose_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """[..., 3] IUV maps: part accuracy on ground-truth body pixels, UV error where the part is right."""
    gp, pp = decode_parts(gt), decode_parts(pred)
    body = gp > 0
    if not body.any():
        return {}
    right = body & (pp == gp)
    out = {"part_acc": float(right.sum() / body.sum())}
    if right.any():
        du = pred[right][:, 1] - gt[right][:, 1]
        dv = np.abs(pred[right][:, 2] - gt[right][:, 2]) % 1.0
        dv = np.minimum(dv, 1.0 - dv)  # v is an angle around the limb: 0.99 and 0.01 are close
        out["uv_error"] = float(np.mean(np.sqrt(du ** 2 + dv ** 2)))
    return out


def keypoints2d_metrics(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray | None = None) -> dict:
    """[F, K, 2] pixels: mean error and PCK over visible joints; the threshold is a fraction of the
    longer side of each frame's box around the ground-truth joints."""
    vis = np.ones(gt.shape[:2], bool) if visible is None else visible.astype(bool)
    if not vis.any():
        return {}
    err = np.linalg.norm(pred - gt, axis=-1)  # [F, K]
    size = np.ptp(gt, axis=1).max(axis=-1)  # [F]
    norm = err / np.maximum(size, 1e-6)[:, None]
    return {"mean_px": float(err[vis].mean()), "pck_0.05": float(np.mean(norm[vis] < 0.05) * 100),
            "pck_0.1": float(np.mean(norm[vis] < 0.1) * 100)}


def procrustes(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """[K, 3] -> pred mapped by the similarity (scale, rotation, translation) that best fits gt
    (Umeyama's least-squares solution, no reflections)."""
    mp, mg = pred.mean(0), gt.mean(0)
    p, g = pred - mp, gt - mg
    u, s, vt = np.linalg.svd(p.T @ g)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.diag([1.0, 1.0, d])
    rot = u @ fix @ vt  # p @ rot ~ g
    scale = (s * np.diag(fix)).sum() / max((p ** 2).sum(), 1e-12)
    return scale * p @ rot + mg


def keypoints3d_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """[F, K, 3] metres, root-relative -> MPJPE and PA-MPJPE in millimetres."""
    err = np.linalg.norm(pred - gt, axis=-1).mean()
    pa = np.mean([np.linalg.norm(procrustes(p, g) - g, axis=-1).mean() for p, g in zip(pred, gt)])
    return {"mpjpe_mm": float(err * 1000), "pa_mpjpe_mm": float(pa * 1000)}


# Metrics reported per task, in table order; `True` when larger is better.
METRICS = {
    "depth": (("abs_rel", False), ("rmse", False), ("delta1", True)),
    "normals": (("mean_deg", False), ("median_deg", False), ("within_11.25", True), ("within_22.5", True), ("within_30", True)),
    "segmentation": (("mse", False), ("mad", False), ("iou", True)),
    "densepose": (("part_acc", True), ("uv_error", False)),
    "keypoints2d": (("mean_px", False), ("pck_0.05", True), ("pck_0.1", True)),
    "keypoints3d": (("mpjpe_mm", False), ("pa_mpjpe_mm", False)),
}


def _mean_frames(rows: list[dict]) -> dict:
    keys = {k for r in rows for k in r}
    return {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}


def evaluate_clip(pred: dict[str, dict[str, np.ndarray]], gt: dict[str, dict[str, np.ndarray]],
                  tasks: list[str] | None = None, depth_align: str = "scale_shift") -> dict[str, dict[str, float]]:
    """{task: arrays} (the `<task>.npz` contents) -> {task: {metric: value}} for the tasks both have.
    The foreground for depth and normals comes from the ground truth's segmentation."""
    tasks = [t for t in (tasks or TASKS) if t in pred and t in gt]
    out: dict[str, dict[str, float]] = {}
    fg = gt["segmentation"]["alpha"] >= FOREGROUND if "segmentation" in gt else None
    for task in tasks:
        p, g = np.asarray(pred[task][KEYS[task]]), np.asarray(gt[task][KEYS[task]])
        if p.shape != g.shape:
            raise ShapeError(f"{task}: prediction has shape {list(p.shape)}, ground truth {list(g.shape)}")
        if task in ("depth", "normals"):
            if fg is None:
                raise ThfmError(f"{task} needs the ground truth's segmentation.npz for its foreground")
            rows = [depth_metrics(p[f], g[f], fg[f], depth_align) if task == "depth" else normals_metrics(p[f], g[f], fg[f])
                    for f in range(len(g))]
            out[task] = _mean_frames([r for r in rows if r])
        elif task == "segmentation":
            out[task] = matte_metrics(p, g)
        elif task == "densepose":
            out[task] = densepose_metrics(p, g)
        elif task == "keypoints2d":
            out[task] = keypoints2d_metrics(p, g, gt[task].get("visibility"))
        else:
            out[task] = keypoints3d_metrics(p, g)
    return out


# --- baselines ----------------------------------------------------------------------------------


def mean_poses(gts: list[dict]) -> dict[str, np.ndarray]:
    """The set's mean pose: 2D in coordinates normalised by each clip's frame size, 3D root-relative."""
    out = {}
    for task in SPARSE_TASKS:
        rows = []
        for gt in gts:
            if task not in gt:
                continue
            k = np.asarray(gt[task]["keypoints"], np.float64)
            if task == "keypoints2d":
                h, w = gt["_size"]
                k = k / [w, h]
            rows.append(k.reshape(-1, *k.shape[-2:]))
        if rows:
            out[task] = np.concatenate(rows).mean(0)
    return out


def baseline_predictions(gt: dict[str, dict[str, np.ndarray]], means: dict[str, np.ndarray]) -> dict[str, dict]:
    """Predictions that look at nothing: constant depth, every normal facing the camera (OpenCV frame:
    -z), an empty matte, background dense pose, the set's mean pose."""
    h, w = gt["_size"]
    frames = gt["_frames"]
    out: dict[str, dict[str, np.ndarray]] = {
        "depth": {"depth": np.ones((frames, h, w), np.float32)},
        "normals": {"normals": np.broadcast_to(np.array([0, 0, -1], np.float32), (frames, h, w, 3))},
        "segmentation": {"alpha": np.zeros((frames, h, w), np.float32)},
        "densepose": {"iuv": np.zeros((frames, h, w, 3), np.float32)},
    }
    if "keypoints2d" in means:
        out["keypoints2d"] = {"keypoints": np.broadcast_to(means["keypoints2d"] * [w, h], (frames,) + means["keypoints2d"].shape)}
    if "keypoints3d" in means:
        out["keypoints3d"] = {"keypoints": np.broadcast_to(means["keypoints3d"], (frames,) + means["keypoints3d"].shape)}
    return out


# --- folders ------------------------------------------------------------------------------------


def load_task_files(folder: Path, tasks: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for task in tasks or TASKS:
        path = folder / f"{task}.npz"
        if path.exists():
            try:
                with np.load(path) as z:
                    out[task] = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise ThfmError(f"{path} cannot be read as npz: {e}") from None
            if KEYS[task] not in out[task]:
                raise ThfmError(f"{path} has no {KEYS[task]!r} array (it has {sorted(out[task])})")
    return out


def _frame_geometry(gt: dict) -> tuple[int, tuple[int, int]]:
    for task in ("segmentation", "depth", "normals", "densepose"):
        if task in gt:
            a = gt[task][KEYS[task]]
            return a.shape[0], (a.shape[1], a.shape[2])
    raise ThfmError("ground truth has no dense task to take the frame size from")


@dataclass
class Report:
    """Per-clip and overall metrics of one prediction set and of the baselines."""

    clips: dict[str, dict[str, dict[str, float]]]  # clip -> task -> metric -> value
    overall: dict[str, dict[str, float]]
    baselines: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # name -> task -> metric

    def to_json(self) -> str:
        return json.dumps({"overall": self.overall, "baselines": self.baselines, "clips": self.clips}, indent=1,
                          sort_keys=True) + "\n"

    def to_markdown(self) -> str:
        names = list(self.baselines)
        lines = ["| task | metric | model | " + " | ".join(f"baseline: {n}" for n in names) + " |",
                 "|---|---|---:|" + "---:|" * len(names)]
        for task, metrics in METRICS.items():
            if task not in self.overall:
                continue
            for metric, higher in metrics:
                cells = [_fmt(self.overall[task].get(metric))]
                cells += [_fmt(self.baselines[n].get(task, {}).get(metric)) for n in names]
                arrow = "higher is better" if higher else "lower is better"
                lines.append(f"| {task} | {metric} ({arrow}) | " + " | ".join(cells) + " |")
        lines += ["", "Per clip:", ""]
        cols = [(t, m) for t, ms in METRICS.items() if t in self.overall for m, _ in ms[:2]]
        lines.append("| clip | " + " | ".join(f"{t} {m}" for t, m in cols) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        for clip, res in self.clips.items():
            lines.append(f"| {clip} | " + " | ".join(_fmt(res.get(t, {}).get(m)) for t, m in cols) + " |")
        return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}"


def _overall(per_clip: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for task in TASKS:
        rows = [res[task] for res in per_clip.values() if task in res and res[task]]
        if rows:
            out[task] = _mean_frames(rows)
    return out


def evaluate_dirs(pred_dir: str | Path, gt_dir: str | Path, tasks: list[str] | None = None,
                  depth_align: str = "scale_shift", baselines: bool = True) -> Report:
    """Compare PRED_DIR/<clip>/<task>.npz with GT_DIR/<clip>/<task>.npz for every clip in GT_DIR.
    A ground-truth folder that is a single clip (task files directly in it) is compared with
    PRED_DIR's own task files."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d in (pred_dir, gt_dir):
        if not d.is_dir():
            raise ThfmError(f"{d} is not a directory")
    if any(gt_dir.glob("*.npz")):
        pairs = [(gt_dir.name, pred_dir, gt_dir)]
    else:
        names = sorted(p.name for p in gt_dir.iterdir() if p.is_dir() and any(p.glob("*.npz")))
        if not names:
            raise ThfmError(f"{gt_dir} holds no ground truth (<clip>/<task>.npz)")
        pairs = [(n, pred_dir / n, gt_dir / n) for n in names]
    missing = [n for n, p, _ in pairs if not p.is_dir()]
    if missing:
        raise ThfmError(f"{pred_dir} has no predictions for {len(missing)} clip(s): {', '.join(missing[:5])}")
    gts, preds = {}, {}
    for name, p, g in pairs:
        gts[name] = load_task_files(g)  # all of it: the matte gives the foreground, any map the size
        gts[name]["_frames"], gts[name]["_size"] = _frame_geometry(gts[name])
        preds[name] = load_task_files(p, tasks)
        if not preds[name]:
            raise ThfmError(f"{p} holds no <task>.npz predictions")
    absent = sorted({t for n in gts for t in (tasks or TASKS) if t in gts[n] and t not in preds[n]})
    if absent:
        logger.warning("predictions lack %s for some clips: those are not scored there", ", ".join(absent))
    per_clip = {n: evaluate_clip(preds[n], gts[n], tasks, depth_align) for n in gts}
    report = Report(per_clip, _overall(per_clip))
    if baselines:
        means = mean_poses(list(gts.values()))
        base = {n: evaluate_clip(baseline_predictions(gts[n], means), gts[n], tasks, depth_align) for n in gts}
        report.baselines["trivial"] = _overall(base)
    return report
