"""Geometry of the shared pre/post-processing against rendered ground truth, with the networks
replaced by stand-ins whose right answer is known (tests/geometry_oracle.py): maps and keypoints must
land on the ground truth's pixels after the trip to the model grid and back, for odd sizes, rotation
metadata, variable frame rate, single frames and many windows, through the same video decode
`thfm predict` uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from geometry_oracle import MARKED_IDX, blob_frames, encode_map, interior, oracle_pipeline, write_video
from thfm_serve.evaluation import NUM_PARTS, angular_errors
from thfm_serve.synth import render_clip
from thfm_serve.video import read_video


@dataclass(frozen=True)
class Case:
    name: str
    frames: int
    height: int  # as displayed
    width: int
    rotation: int = 0
    pts_ms: tuple[int, ...] | None = None
    model: tuple[int, int, int] = (5, 48, 64)  # window, height, width of the model grid


CASES = [
    Case("odd-size", 5, 45, 61),
    Case("downscale", 5, 72, 88, model=(5, 32, 48)),  # the model grid is smaller than the clip
    Case("rot90", 3, 64, 48, rotation=90),
    Case("rot180", 3, 48, 64, rotation=180),
    Case("rot270", 3, 64, 48, rotation=270),
    Case("vfr", 6, 48, 64, pts_ms=(0, 40, 50, 130, 140, 300)),
    Case("single-frame", 1, 48, 64),
    Case("many-windows", 23, 40, 56),  # five 5-frame windows, the last aligned to the end
]


@pytest.fixture(scope="module")
def oracle(tiny_checkpoint):
    from thfm_serve.pipeline import ThfmPipeline

    return oracle_pipeline(ThfmPipeline.from_checkpoint(tiny_checkpoint))


def _clip(case: Case):
    # The rendered person and their joints: one person so every marked joint is theirs.
    return render_clip(3, frames=case.frames, height=case.height, width=case.width, people=1)


def _run(oracle, tmp_path, case: Case, frames: np.ndarray, task: str) -> np.ndarray:
    path = tmp_path / f"{task}.mp4"
    write_video(frames, path, rotation=case.rotation, pts_ms=list(case.pts_ms) if case.pts_ms else None)
    video = read_video(path)
    assert video.frames.shape[:3] == (case.frames, case.height, case.width)
    window, h, w = case.model
    res = oracle.run(video.frames, [task], height=h, width=w, window=window)
    from thfm_serve.processing import OUTPUT_KEYS

    return res[task][OUTPUT_KEYS[task]]


def _shifts(a: np.ndarray) -> list[np.ndarray]:
    """The map moved one pixel right, left, down and up (edges repeated): what an off-by-one in the
    mapping would give."""
    return [np.concatenate([a[:, :, :1], a[:, :, :-1]], 2), np.concatenate([a[:, :, 1:], a[:, :, -1:]], 2),
            np.concatenate([a[:, :1], a[:, :-1]], 1), np.concatenate([a[:, 1:], a[:, -1:]], 1)]


def _centre(a: np.ndarray) -> np.ndarray:
    """[F, H, W] -> [F, 2] (x, y) centre of mass in continuous pixel coordinates."""
    ys, xs = np.mgrid[0:a.shape[1], 0:a.shape[2]] + 0.5
    m = a.sum(axis=(1, 2))
    return np.stack([(a * xs).sum(axis=(1, 2)) / m, (a * ys).sum(axis=(1, 2)) / m], -1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dense_maps_land_on_the_ground_truth(oracle, tmp_path, case):
    clip = _clip(case)
    part = np.round(clip.iuv[..., 0] * NUM_PARTS).astype(int)
    # Compare maps away from edges, where resampling blends neighbours: as far as one model pixel
    # reaches back into the input.
    r = max(1, int(np.ceil(max(case.height / case.model[1], case.width / case.model[2]))))
    inner = interior(part, r) & interior((clip.alpha > 0.5).astype(int), r)

    alpha = _run(oracle, tmp_path, case, encode_map("segmentation", clip, 1.0, 1.0), "segmentation")
    err = np.abs(alpha - clip.alpha).mean()
    assert err < 0.04, f"matte MAD {err:.4f}"
    # Resampling to the model grid and back blurs edges; it must not move them: per frame, the
    # matte's centre of mass stays within a fraction of a pixel (an off-by-one moves it by one).
    drift = np.abs(_centre(alpha) - _centre(clip.alpha)).max()
    assert drift < 0.25, f"matte centre moved by {drift:.3f} px"
    assert np.abs(_centre(_shifts(alpha)[0]) - _centre(clip.alpha)).max() > 0.75  # the check sees one pixel

    a = oracle.cfg.depth_log_scale
    unit = float(clip.depth.max()) / np.expm1(1.0 / a) * 1.05  # the squashed depth stays below 1
    depth = _run(oracle, tmp_path, case, encode_map("depth", clip, a, unit), "depth") * unit
    rel = np.abs(depth - clip.depth) / clip.depth
    assert np.median(rel[inner]) < 0.02, f"depth median abs-rel {np.median(rel[inner]):.4f}"

    normals = _run(oracle, tmp_path, case, encode_map("normals", clip, a, unit), "normals")
    ang = angular_errors(normals, clip.normals)
    assert np.median(ang[inner]) < 3.0, f"normals median error {np.median(ang[inner]):.2f} deg"

    iuv = _run(oracle, tmp_path, case, encode_map("densepose", clip, a, unit), "densepose")
    pred_part = np.round(iuv[..., 0] * NUM_PARTS).astype(int)
    body = inner & (part > 0)
    assert body.sum() > 20
    acc = np.mean(pred_part[body] == part[body])
    assert acc > 0.95, f"part accuracy {acc:.3f} on {body.sum()} interior body pixels"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_keypoints_land_on_the_ground_truth(oracle, tmp_path, case):
    clip = _clip(case)
    gt = clip.keypoints2d[:, MARKED_IDX]  # [F, 3, 2] input pixels
    margin = 4 * 2.0  # blobs cut by the border would move their centroid
    inside = (gt[..., 0] > margin) & (gt[..., 0] < case.width - margin) & (gt[..., 1] > margin) & (gt[..., 1] < case.height - margin)
    assert inside.mean() >= 0.5
    frames = blob_frames(clip)
    kp2d = _run(oracle, tmp_path, case, frames, "keypoints2d")[:, MARKED_IDX]
    err = np.linalg.norm(kp2d - gt, axis=-1)[inside]
    assert err.max() < 0.35, f"2D keypoints off by up to {err.max():.3f} px"
    kp3d = _run(oracle, tmp_path, case, frames, "keypoints3d")[:, MARKED_IDX]
    # frame order: each frame's 3D output carries that frame's blob positions (normalised)
    norm = gt / [case.width, case.height]
    assert np.abs(kp3d[..., :2] - norm)[inside].max() < 0.35 / min(case.width, case.height)
    assert np.array_equal(kp3d[..., 2], np.broadcast_to([0.0, 1.0, 2.0], kp3d.shape[:2]))
