"""Each metric against a case worked out by hand, and `thfm eval` over folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from thfm_serve import evaluation as ev
from thfm_serve.cli import main


def test_depth_metrics_by_hand():
    g = np.array([[1.0, 2.0]])
    m = ev.depth_metrics(np.array([[1.3, 2.0]]), g, np.ones_like(g, bool), align=None)
    # abs-rel (0.3/1 + 0/2)/2; RMSE sqrt(0.09/2); only the second pixel within 1.25
    assert m == pytest.approx({"abs_rel": 0.15, "rmse": np.sqrt(0.045), "delta1": 0.5})
    # least squares of g = [1,2,3] on p = [0,0,1]: s = cov/var = 1/(2/3) = 1.5, t = 2 - 1.5/3 = 1.5,
    # aligned [1.5, 1.5, 3]: errors [0.5, 0.5, 0]
    g3, p3 = np.array([[1.0, 2.0, 3.0]]), np.array([[0.0, 0.0, 1.0]])
    assert ev.align_depth(p3, g3, np.ones_like(g3, bool)) == pytest.approx(np.array([[1.5, 1.5, 3.0]]))
    m = ev.depth_metrics(p3, g3, np.ones_like(g3, bool))
    assert m == pytest.approx({"abs_rel": (0.5 + 0.25) / 3, "rmse": np.sqrt(0.5 / 3), "delta1": 1 / 3})


def test_depth_alignment_removes_scale_and_shift_only():
    rng = np.random.default_rng(0)
    g = rng.uniform(2, 5, (8, 8))
    mask = np.ones_like(g, bool)
    assert ev.depth_metrics(3.0 * g - 1.0, g, mask)["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert ev.depth_metrics(g / 2, g, mask, "scale")["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert ev.depth_metrics(3.0 * g - 1.0, g, mask, "scale")["abs_rel"] > 0.01  # a shift is not a scale
    mask[:4] = False  # only the masked pixels count
    bad = g.copy()
    bad[:4] = 100.0
    assert ev.depth_metrics(bad, g, mask)["abs_rel"] == pytest.approx(0.0, abs=1e-9)


def _tilted(deg):
    a = np.radians(deg)
    return np.array([np.sin(a), 0.0, np.cos(a)])


def test_normals_metrics_by_hand():
    gt = np.tile([0.0, 0.0, 1.0], (1, 5, 1))
    pred = np.stack([_tilted(d) for d in (0, 10, 20, 90, 45)])[None] * 3.0  # unnormalised on purpose
    mask = np.array([[True, True, True, True, False]])  # the 45 degree pixel is background
    m = ev.normals_metrics(pred, gt, mask)
    assert m == pytest.approx({"mean_deg": 30.0, "median_deg": 15.0, "within_11.25": 50.0, "within_22.5": 75.0,
                               "within_30": 75.0})


def test_matte_metrics_by_hand():
    m = ev.matte_metrics(np.array([0.0, 0.5, 1.0, 0.2]), np.array([0.0, 1.0, 1.0, 0.0]))
    assert m == pytest.approx({"mse": (0.25 + 0.04) / 4, "mad": 0.7 / 4, "iou": 1.0})
    m = ev.matte_metrics(np.array([0.6, 0.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0, 0.0]))
    assert m["iou"] == pytest.approx(1 / 3)


def test_densepose_metrics_by_hand():
    n = ev.NUM_PARTS
    gt = np.array([[0, 0, 0], [1 / n, 0.5, 0.5], [2 / n, 0.1, 0.98], [2 / n, 0.1, 0.1]])
    pred = np.array([[3 / n, 0.2, 0.2], [1 / n, 0.8, 0.9], [2 / n, 0.1, 0.02], [5 / n, 0.1, 0.1]])
    m = ev.densepose_metrics(pred, gt)
    # background pixel ignored; parts right on 2 of 3 body pixels; UV: |(0.3, 0.4)| = 0.5, and v
    # 0.98 vs 0.02 is 0.04 apart around the circle
    assert m == pytest.approx({"part_acc": 2 / 3, "uv_error": (0.5 + 0.04) / 2})


def test_keypoints2d_metrics_by_hand():
    gt = np.array([[[0.0, 0.0], [100.0, 0.0], [0.0, 50.0]]])  # box 100 x 50: size 100
    pred = gt + np.array([[[3.0, 4.0], [0.0, 0.0], [0.0, 20.0]]])  # errors 5, 0, 20 px
    m = ev.keypoints2d_metrics(pred, gt)
    assert m == pytest.approx({"mean_px": 25 / 3, "pck_0.05": 100 / 3, "pck_0.1": 200 / 3})
    m = ev.keypoints2d_metrics(pred, gt, np.array([[True, True, False]]))
    assert m == pytest.approx({"mean_px": 2.5, "pck_0.05": 50.0, "pck_0.1": 100.0})


def test_keypoints3d_metrics_by_hand():
    gt = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    m = ev.keypoints3d_metrics(gt + [0.01, 0.0, 0.0], gt)
    assert m == pytest.approx({"mpjpe_mm": 10.0, "pa_mpjpe_mm": 0.0}, abs=1e-6)
    # a rotated, scaled, shifted copy: far off before alignment, exact after
    a = np.radians(40)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = ev.keypoints3d_metrics(1.7 * gt @ rot.T + [0.2, -0.1, 0.3], gt)
    assert m["pa_mpjpe_mm"] == pytest.approx(0.0, abs=1e-6) and m["mpjpe_mm"] > 300
    # a reflection is not a rotation: Procrustes must not undo it
    mirrored = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    m = ev.keypoints3d_metrics(mirrored * [1, 1, -1], mirrored)
    assert m["pa_mpjpe_mm"] > 100


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    from thfm_serve.synth import write_set

    root = tmp_path_factory.mktemp("gt")
    write_set(root, 2, frames=3, height=32, width=48, seed=4)
    return root


def test_eval_ground_truth_against_itself_and_a_shifted_copy(synth_set, tmp_path):
    rep = ev.evaluate_dirs(synth_set, synth_set)
    assert rep.overall["segmentation"]["mse"] == 0 and rep.overall["densepose"]["part_acc"] == 1
    assert rep.overall["keypoints2d"]["mean_px"] == 0 and rep.overall["keypoints3d"]["mpjpe_mm"] == 0
    assert rep.overall["depth"]["abs_rel"] == pytest.approx(0, abs=1e-6)
    # the baselines are scored too, and are worse
    assert rep.baselines["trivial"]["segmentation"]["iou"] == 0.0
    assert rep.baselines["trivial"]["normals"]["mean_deg"] > 10
    # keypoints moved 3 px right: the error is exactly 3 px
    pred = tmp_path / "pred"
    shutil.copytree(synth_set, pred)
    for clip in ("clip_00000", "clip_00001"):
        path = pred / clip / "keypoints2d.npz"
        with np.load(path) as z:
            arrays = dict(z)
        arrays["keypoints"] = arrays["keypoints"] + np.float32([3.0, 0.0])
        np.savez(path, **arrays)
    rep = ev.evaluate_dirs(pred, synth_set, ["keypoints2d"], baselines=False)
    assert rep.overall["keypoints2d"]["mean_px"] == pytest.approx(3.0, abs=1e-4)


def test_thfm_eval_command_writes_tables(synth_set, tmp_path, capsys):
    pred = tmp_path / "pred"
    shutil.copytree(synth_set, pred)
    assert main(["eval", str(pred), str(synth_set), "--tasks", "segmentation,keypoints3d"]) == 0
    report = json.loads((pred / "eval.json").read_text())
    assert set(report["overall"]) == {"segmentation", "keypoints3d"}
    assert set(report["clips"]) == {"clip_00000", "clip_00001"}
    md = (pred / "eval.md").read_text()
    assert "| segmentation | iou (higher is better) | 1 | 0 |" in md
    assert md in capsys.readouterr().out


def test_thfm_eval_refuses_missing_predictions(synth_set, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), str(synth_set)]) == 2
    wrong = tmp_path / "wrong" / "clip_00000"
    wrong.mkdir(parents=True)
    (tmp_path / "wrong" / "clip_00001").mkdir()
    np.savez(wrong / "segmentation.npz", alpha=np.zeros((3, 16, 16), np.float32))
    np.savez(tmp_path / "wrong" / "clip_00001" / "segmentation.npz", alpha=np.zeros((3, 32, 48), np.float32))
    assert main(["eval", str(tmp_path / "wrong"), str(synth_set), "--tasks", "segmentation"]) == 2


def test_thfm_eval_runs_the_engine_in_process(tiny_checkpoint, tmp_path):
    """--checkpoint: render a set, run the random-weight engine on it, score it. The numbers mean
    nothing (random weights); the prediction files must line up with the ground truth's."""
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    assert main(["eval", str(pred), str(gt), "--checkpoint", str(tiny_checkpoint), "--clips", "1", "--frames", "3",
                 "--clip-height", "40", "--clip-width", "56", "--height", "32", "--width", "32", "--window", "5"]) == 0
    report = json.loads((pred / "eval.json").read_text())
    assert set(report["overall"]) == set(ev.METRICS)
    with np.load(pred / "clip_00000" / "depth.npz") as z:
        assert z["depth"].shape == (3, 40, 56)
