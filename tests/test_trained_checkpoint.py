"""The small trained THFM shipped in the package sees people: on clips the renderer draws from a seed
that no training, validation or test set used, its in-process outputs are scored against the clips'
exact ground truth and set against the trivial baselines (docs/training.md has the full table).

The bounds sit below what this checkpoint measured on these four clips (docs/training.md): a matte
and 2D joints that find the person, and every task ahead of its baseline, most of them only just
(on these short clips the mean pose is already a strong guess). The recipe's
quality bar (matte IoU 0.75, normals under 35 degrees, depth abs-rel under half the baseline's) is
not met yet, and the README says so."""

from __future__ import annotations

import json

import pytest

from thfm_serve.checkpoint import TRAINED_SMALL, load_checkpoint, missing_parts
from thfm_serve.cli import main
from thfm_serve.synth.dataset import write_set

# Training used seeds 1, 5 (128x128), 11 and 12 (192x192); validation 2, the documented test set 3,
# the demo 9999.
UNSEEN_SEED = 4242


def test_the_trained_checkpoint_is_shipped_complete_and_small():
    assert missing_parts(TRAINED_SMALL) == []
    files = [p for p in TRAINED_SMALL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 32 * 2**20
    ck = load_checkpoint(TRAINED_SMALL)  # the path every checkpoint loads through
    assert (ck.config.frames, ck.config.height, ck.config.width) == (9, 192, 192)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("unseen")
    ck = load_checkpoint(TRAINED_SMALL, text_encoder=False)
    # One 9-frame window per clip keeps this under a minute on 2 cores.
    write_set(root / "gt", clips=4, frames=9, height=ck.config.height, width=ck.config.width, seed=UNSEEN_SEED)
    assert main(["eval", str(root / "pred"), str(root / "gt"), "--checkpoint", str(TRAINED_SMALL),
                 "--json", str(root / "eval.json")]) == 0
    return json.loads((root / "eval.json").read_text())


def test_the_matte_and_2d_joints_find_the_person(report):
    model = report["overall"]
    assert model["segmentation"]["iou"] >= 0.6  # the empty matte's IoU is 0
    assert model["keypoints2d"]["pck_0.1"] >= 85.0


def test_every_task_is_ahead_of_its_trivial_baseline(report):
    model, base = report["overall"], report["baselines"]["trivial"]
    # The baselines: the training set's mean 2D and 3D pose, every normal facing the camera, one
    # constant depth, no body part.
    assert model["keypoints2d"]["mean_px"] <= 0.85 * base["keypoints2d"]["mean_px"]
    assert model["keypoints3d"]["mpjpe_mm"] <= 0.9 * base["keypoints3d"]["mpjpe_mm"]
    assert model["normals"]["mean_deg"] <= base["normals"]["mean_deg"] - 1.5
    assert model["depth"]["abs_rel"] <= 0.8 * base["depth"]["abs_rel"]
    # Stage 3 (the decoder adapted to the core) doubled the parts labelled right: 0.057 here before it,
    # 0.116 after it, 0.149 for step 7, 0.156 for the shipped model (docs/training.md, step 8).
    assert model["densepose"]["part_acc"] >= base["densepose"]["part_acc"] + 0.08
