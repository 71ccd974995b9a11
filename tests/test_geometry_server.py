"""The geometry checks of test_geometry.py through a real tritonserver: the exported repository with
its three networks replaced by ONNX stand-ins (tests/geometry_oracle.py), called by the project's
client on encoded videos, so the server's video decode (rotation, variable frame rate), the client's
windows and stitching and the served pre/post-processing are all on the path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from geometry_oracle import MARKED_IDX, blob_frames, encode_map, export_standins, write_video
from serverfix import HEIGHT, WIDTH, WINDOW, exported_repo, start_server
from test_geometry import Case, _centre
from thfm_serve.synth import render_clip

pytestmark = pytest.mark.server

CASES = [
    Case("odd-size", 5, 45, 61),
    Case("rot90", 3, 64, 48, rotation=90),
    Case("rot180", 3, 48, 64, rotation=180),
    Case("rot270", 3, 64, 48, rotation=270),
    Case("vfr", 6, 48, 64, pts_ms=(0, 40, 50, 130, 140, 300)),
    Case("single-frame", 1, 48, 64),
    Case("many-windows", 23, 40, 56),  # several overlapping client windows, stitched
]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory, tiny_checkpoint):
    src = exported_repo(request.config, tmp_path_factory, tiny_checkpoint)
    repo = tmp_path_factory.mktemp("standins") / "repo"
    shutil.copytree(src, repo)
    export_standins(repo, WINDOW, HEIGHT, WIDTH, num_joints=24)
    srv = start_server(repo, tmp_path_factory.mktemp("log"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from thfm_serve.client.sync import ThfmClient

    with ThfmClient(server.grpc_url) as c:
        yield c


def _predict(client, tmp_path, case: Case, frames: np.ndarray, tasks: list[str], name: str) -> dict:
    path = tmp_path / f"{name}.mp4"
    write_video(frames, path, rotation=case.rotation, pts_ms=list(case.pts_ms) if case.pts_ms else None)
    return client.predict(path, tasks).results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_served_geometry(client, tmp_path, case):
    clip = render_clip(3, frames=case.frames, height=case.height, width=case.width, people=1)

    # matte: the stand-in decoder draws a blob with the matte's moments measured on the model grid;
    # back at the input's size its centre of mass must be the ground-truth matte's
    res = _predict(client, tmp_path, case, encode_map("segmentation", clip, 1.0, 1.0), ["segmentation"], "matte")
    alpha = res["segmentation"]["alpha"]
    assert alpha.shape == clip.alpha.shape
    drift = np.abs(_centre(alpha) - _centre(clip.alpha))
    assert drift.max() < 0.3, f"matte centre off by {drift.max():.3f} px"

    # keypoints: the blob finder's centroids, mapped back to input pixels, in frame order
    gt = clip.keypoints2d[:, MARKED_IDX]
    margin = 8.0
    inside = (gt[..., 0] > margin) & (gt[..., 0] < case.width - margin) & (gt[..., 1] > margin) & (gt[..., 1] < case.height - margin)
    assert inside.mean() >= 0.5
    res = _predict(client, tmp_path, case, blob_frames(clip), ["keypoints2d", "keypoints3d"], "blobs")
    kp2d = res["keypoints2d"]["keypoints"][:, MARKED_IDX]
    err = np.linalg.norm(kp2d - gt, axis=-1)[inside]
    assert err.max() < 0.35, f"2D keypoints off by up to {err.max():.3f} px"
    kp3d = res["keypoints3d"]["keypoints"][:, MARKED_IDX]
    norm = gt / [case.width, case.height]
    assert np.abs(kp3d[..., :2] - norm)[inside].max() < 0.35 / min(case.width, case.height)
    assert np.allclose(kp3d[..., 2], [0.0, 1.0, 2.0])


def test_thfm_eval_through_the_server(server, tmp_path):
    """`thfm eval --url`: the engine runs on every clip of a rendered set through Triton, and the
    predictions are scored against the set's ground truth (the stand-ins' numbers mean nothing)."""
    import json

    from thfm_serve.cli import main

    gt, pred = tmp_path / "gt", tmp_path / "pred"
    assert main(["eval", str(pred), str(gt), "--url", server.grpc_url, "--tasks", "segmentation,keypoints2d",
                 "--clips", "2", "--frames", "3", "--clip-height", "40", "--clip-width", "48"]) == 0
    report = json.loads((pred / "eval.json").read_text())
    assert set(report["clips"]) == {"clip_00000", "clip_00001"}
    assert set(report["overall"]) == {"segmentation", "keypoints2d"}
    with np.load(pred / "clip_00001" / "segmentation.npz") as z:
        assert z["alpha"].shape == (3, 40, 48)
