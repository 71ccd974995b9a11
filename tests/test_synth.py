"""The synthetic human renderer: exact primitives, ground truth that agrees with itself and with the
camera, motions that do what they say, determinism, and the on-disk layout `thfm synth` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from thfm_serve.cli import main
from thfm_serve.config import SMPL_JOINTS, TASKS
from thfm_serve.processing import OUTPUT_KEYS
from thfm_serve.synth import render_clip, write_set
from thfm_serve.synth.body import J, NUM_PARTS, PART_NAMES, BodyShape, Motion, Person
from thfm_serve.synth.raycast import RayGrid, capsule, ellipsoid

H, W, F = 48, 64, 5


@pytest.fixture(scope="module")
def clip():
    return render_clip(7, frames=F, height=H, width=W)


def _march(d: np.ndarray, sdf, t_max: float = 20.0, step: float = 1e-3) -> float:
    """First zero crossing of sdf along the ray t*d, by dense sampling (independent of the
    analytic intersections)."""
    ts = np.arange(0.0, t_max, step)
    vals = sdf(ts[:, None] * d)
    inside = np.flatnonzero(vals <= 0)
    return float(ts[inside[0]]) if len(inside) else np.inf


@pytest.mark.parametrize("direction", [(0.0, 0.0, 1.0), (0.05, -0.03, 1.0), (0.12, 0.1, 1.0), (0.4, 0.0, 1.0)])
def test_capsule_matches_ray_marching(direction):
    d = np.array(direction) / np.linalg.norm(direction)
    pa, pb, r = np.array([-0.3, 0.1, 4.0]), np.array([0.4, 0.3, 4.5]), 0.35

    def sdf(p):
        ba = pb - pa
        s = np.clip(((p - pa) @ ba) / (ba @ ba), 0, 1)
        return np.linalg.norm(p - (pa + s[:, None] * ba), axis=1) - r

    t, n, _ = capsule(d[None], pa, pb, r)
    expected = _march(d, sdf)
    assert np.isfinite(t[0]) == np.isfinite(expected)
    if np.isfinite(expected):
        assert t[0] == pytest.approx(expected, abs=2e-3)
        assert np.linalg.norm(n[0]) == pytest.approx(1.0, abs=1e-9)
        assert n[0] @ d < 0  # the visible side faces the camera


@pytest.mark.parametrize("direction", [(0.0, 0.0, 1.0), (0.03, 0.05, 1.0), (0.09, -0.02, 1.0)])
def test_ellipsoid_matches_ray_marching(direction):
    d = np.array(direction) / np.linalg.norm(direction)
    c, radii = np.array([0.1, 0.0, 3.0]), np.array([0.2, 0.45, 0.3])
    a = 0.6
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])

    def sdf(p):  # the implicit function's sign is all ray marching needs
        local = (p - c) @ rot / radii
        return np.linalg.norm(local, axis=1) - 1.0

    t, n, _ = ellipsoid(d[None], c, rot, radii)
    expected = _march(d, sdf)
    assert np.isfinite(t[0]) == np.isfinite(expected)
    if np.isfinite(expected):
        assert t[0] == pytest.approx(expected, abs=2e-3)
        # the normal is the implicit function's gradient direction, by finite differences
        p = t[0] * d
        eps = 1e-5
        grad = np.array([(sdf((p + e)[None]) - sdf((p - e)[None]))[0] for e in np.eye(3) * eps])
        assert np.allclose(n[0], grad / np.linalg.norm(grad), atol=1e-4)


def test_ray_grid_pixel_convention():
    g = RayGrid.make(4, 6, fx=10.0, fy=10.0, cx=3.0, cy=2.0, samples=1)
    assert np.allclose(g.xs, np.arange(6) + 0.5) and np.allclose(g.ys, np.arange(4) + 0.5)
    g3 = RayGrid.make(4, 6, fx=10.0, fy=10.0, cx=3.0, cy=2.0, samples=3)
    assert np.allclose(g3.xs[1::3], g.xs)  # odd sampling keeps a ray at every pixel centre


def test_clip_shapes_and_ranges(clip):
    assert clip.frames.shape == (F, H, W, 3) and clip.frames.dtype == np.uint8
    assert clip.depth.shape == (F, H, W) and np.isfinite(clip.depth).all() and (clip.depth > 0).all()
    assert np.allclose(np.linalg.norm(clip.normals, axis=-1), 1.0, atol=1e-4)
    assert 0 <= clip.alpha.min() and clip.alpha.max() <= 1 and clip.alpha.max() == 1.0
    assert 0 <= clip.iuv.min() and clip.iuv.max() <= 1
    assert clip.keypoints2d.shape == (F, 24, 2) and clip.keypoints3d.shape == (F, 24, 3)
    assert np.allclose(clip.keypoints3d[:, 0], 0.0)  # root-relative


def test_ground_truth_agrees_with_the_camera(clip):
    """Back-project every pixel with depth and the intrinsics, move it to the world with the extrinsics
    in the camera record: surfaces whose normal is the world's up are on the floor (y = 0); the
    keypoints re-project to their 2D positions."""
    cam = clip.camera
    K = np.array(cam["K"])
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    for f in range(F):
        T = np.array(cam["world_to_camera"][f])
        R, t = T[:3, :3], T[:3, 3]
        z = clip.depth[f]
        pts = np.stack([(xs - K[0, 2]) / K[0, 0] * z, (ys - K[1, 2]) / K[1, 1] * z, z], -1)
        world = (pts - t) @ R  # R^T (X_c - t)
        n_world = clip.normals[f] @ R
        floor = n_world[..., 1] > 0.999
        assert floor.sum() > 0.05 * H * W
        assert np.abs(world[floor][:, 1]).max() < 1e-3
        # the normals face the camera everywhere
        assert (np.einsum("hwc,hwc->hw", clip.normals[f], pts) < 0).all()
        joints = clip.keypoints3d[f] + clip.root[f]
        proj = joints @ K.T
        assert np.allclose(proj[:, :2] / proj[:, 2:], clip.keypoints2d[f], atol=1e-3)


def test_visible_keypoints_land_on_the_person(clip):
    vis = clip.visibility
    assert vis.sum() > 0.4 * vis.size
    f, k = np.nonzero(vis)
    x, y = clip.keypoints2d[f, k, 0].astype(int), clip.keypoints2d[f, k, 1].astype(int)
    assert (clip.alpha[f, y, x] > 0).all()
    assert (clip.iuv[f, y, x, 0] > 0).all()


def test_matte_and_parts_agree(clip):
    part = np.round(clip.iuv[..., 0] * NUM_PARTS).astype(int)
    assert set(np.unique(part)) <= set(range(NUM_PARTS + 1))
    # The centre ray is one of the 3x3 sub-pixel rays: a body part at the centre means alpha > 0,
    # full coverage means the centre is on a body.
    assert (clip.alpha[part > 0] > 0).all()
    assert (part[clip.alpha == 1.0] > 0).all()
    assert (clip.iuv[part == 0] == 0).all()


def test_parts_are_where_the_skeleton_says():
    """Head parts above the feet, each hand's part around that hand's keypoint (a left/right or
    front/back mix-up would move them)."""
    c = render_clip(11, frames=3, height=96, width=96, motions=("wave",), people=1)
    part = np.round(c.iuv[..., 0] * NUM_PARTS).astype(int)
    for f in range(3):
        rows = np.nonzero(part[f])[0]
        head_rows = np.nonzero(np.isin(part[f], [23, 24]))[0]
        foot_rows = np.nonzero(np.isin(part[f], [5, 6]))[0]
        if len(head_rows) and len(foot_rows):
            assert head_rows.mean() < foot_rows.mean()
        for name, p in (("left_hand", PART_NAMES.index("left_hand") + 1), ("right_hand", PART_NAMES.index("right_hand") + 1)):
            ys, xs = np.nonzero(part[f] == p)
            if len(xs) < 3 or not c.visibility[f, J[name]]:
                continue
            centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
            other = J["right_hand" if name == "left_hand" else "left_hand"]
            d_own = np.linalg.norm(centre - c.keypoints2d[f, J[name]])
            d_other = np.linalg.norm(centre - c.keypoints2d[f, other])
            assert d_own < d_other
        assert len(rows)


@pytest.mark.parametrize("kind", ["walk", "squat", "jump", "turn", "wave"])
def test_motions(kind):
    rng = np.random.default_rng(0)
    person = Person(BodyShape(), Motion.sample(rng, (kind,)), (0.0, 0.0))
    t = np.arange(48) / 24.0
    pos, rot = person.animate(t)
    feet = [J["left_ankle"], J["right_ankle"], J["left_foot"], J["right_foot"]]
    low = pos[:, feet, 1].min(axis=1) - 0.045
    pelvis = pos[:, J["pelvis"]]
    if kind == "jump":
        assert low.max() > 0.1  # off the floor at some point
    else:
        assert np.allclose(low, 0.0, atol=1e-9)  # feet on the floor
    if kind == "walk":
        assert np.linalg.norm(pelvis[-1, [0, 2]] - pelvis[0, [0, 2]]) > 0.6
    if kind == "squat":
        assert pelvis[:, 1].max() - pelvis[:, 1].min() > 0.2
    if kind == "turn":
        facing = rot[:, 0] @ np.array([0.0, 0.0, 1.0])
        assert np.degrees(np.arccos(np.clip(facing[0] @ facing[-1], -1, 1))) > 60
    if kind == "wave":
        side = "right" if person.motion.wave_right else "left"
        assert (pos[:, J[f"{side}_wrist"], 1] > pos[:, J["head"], 1]).all()  # hand above the head
        assert np.ptp(pos[:, J[f"{side}_wrist"], 0]) > 0.05  # and moving


def test_scenes_vary_people_and_occluders():
    scenes = [render_clip(s, frames=1, height=16, width=16).camera["scene"] for s in range(30)]
    assert {s["people"] for s in scenes} == {1, 2}
    assert any(s["occluder"] for s in scenes) and any(not s["occluder"] for s in scenes)
    assert any(len(s["motions"][0]) == 2 for s in scenes)


def test_same_seed_same_clip_other_seed_other_clip(clip):
    again = render_clip(7, frames=F, height=H, width=W)
    for name in ("frames", "depth", "normals", "alpha", "iuv", "keypoints2d", "keypoints3d"):
        assert np.array_equal(getattr(clip, name), getattr(again, name)), name
    other = render_clip(8, frames=F, height=H, width=W)
    assert not np.array_equal(clip.frames, other.frames)


def test_thfm_synth_layout_and_determinism(tmp_path):
    from thfm_serve.video import read_video

    args = ["synth", "--clips", "2", "--frames", "3", "--height", "24", "--width", "40", "--seed", "5"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["clips"] == ["clip_00000", "clip_00001"]
    for name in index["clips"]:
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        files = sorted(p.name for p in a.iterdir())
        assert files == sorted(["video.mp4", "camera.json"] + [f"{t}.npz" for t in TASKS])
        for fname in files:
            assert (a / fname).read_bytes() == (b / fname).read_bytes(), fname
        for task in TASKS:
            with np.load(a / f"{task}.npz") as z:
                assert OUTPUT_KEYS[task] in z.files
                assert z[OUTPUT_KEYS[task]].dtype == np.float32
                if task.startswith("keypoints"):
                    assert list(z["joint_names"]) == list(SMPL_JOINTS)
        video = read_video(a / "video.mp4")
        assert video.frames.shape == (3, 24, 40, 3) and video.fps == pytest.approx(24.0)
        clip = render_clip(np.random.SeedSequence([5, int(name[-5:])]), frames=3, height=24, width=40)
        # near-lossless H.264; what error there is comes from 4:2:0 chroma at colour edges
        err = video.frames.astype(float) - clip.frames
        assert np.abs(err).mean() < 8 and np.abs(err.mean(axis=(1, 2, 3))).max() < 2
    # a set's clip does not depend on the set's size
    assert main(["synth", "--clips", "1", "--frames", "3", "--height", "24", "--width", "40", "--seed", "5",
                 "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c/clip_00000/depth.npz").read_bytes() == (tmp_path / "a/clip_00000/depth.npz").read_bytes()


def test_workers_give_the_same_files(tmp_path):
    write_set(tmp_path / "one", 2, frames=2, height=16, width=16, seed=1)
    write_set(tmp_path / "two", 2, frames=2, height=16, width=16, seed=1, workers=2)
    for name in ("clip_00000", "clip_00001"):
        for f in ("normals.npz", "video.mp4", "camera.json"):
            assert (tmp_path / "one" / name / f).read_bytes() == (tmp_path / "two" / name / f).read_bytes(), f


def test_read_clip_round_trip(tmp_path):
    from thfm_serve.synth import list_clips, read_clip
    from thfm_serve.synth.dataset import clip_seed

    write_set(tmp_path, 1, frames=3, height=24, width=32, seed=2)
    (folder,) = list_clips(tmp_path)
    back = read_clip(folder)
    clip = render_clip(clip_seed(2, 0), frames=3, height=24, width=32)
    assert back["frames"].shape == clip.frames.shape
    assert np.array_equal(back["depth"]["depth"], clip.depth)
    assert np.array_equal(back["keypoints2d"]["visibility"], clip.visibility)
    assert back["camera"]["K"] == clip.camera["K"]


def test_image_backgrounds(tmp_path):
    from PIL import Image

    bg = tmp_path / "bg"
    bg.mkdir()
    Image.fromarray(np.full((20, 30, 3), (10, 200, 30), np.uint8)).save(bg / "green.png")
    assert main(["synth", "--out", str(tmp_path / "out"), "--clips", "1", "--frames", "1", "--height", "32",
                 "--width", "32", "--backgrounds", str(bg), "--seed", "3"]) == 0
    cam = json.loads((tmp_path / "out" / "clip_00000" / "camera.json").read_text())
    assert cam["scene"]["background"] == "image"
    with np.load(tmp_path / "out" / "clip_00000" / "segmentation.npz") as z:
        alpha = z["alpha"][0]
    from thfm_serve.video import read_video

    frame = read_video(tmp_path / "out" / "clip_00000" / "video.mp4").frames[0].astype(int)
    top = frame[:6][alpha[:6] == 0]  # the top rows show the wall: green, shaded
    assert len(top) and (top[:, 1] > top[:, 0] + 40).mean() > 0.9
    (tmp_path / "empty").mkdir()
    assert main(["synth", "--out", str(tmp_path / "x"), "--clips", "1", "--backgrounds", str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize("bad", [["--clips", "0"], ["--motions", "dance"], ["--samples", "0"], ["--height", "4"]])
def test_bad_arguments_fail_clearly(tmp_path, bad, caplog):
    assert main(["synth", "--out", str(tmp_path / "x")] + bad) == 2


def test_preview_sheet(tmp_path):
    from PIL import Image

    assert main(["synth", "--out", str(tmp_path), "--clips", "1", "--frames", "4", "--height", "32", "--width", "40",
                 "--preview"]) == 0
    with Image.open(tmp_path / "clip_00000" / "preview.png") as im:
        assert im.size == (7 * 40, 3 * 32)  # 7 columns (video + 6 tasks), 3 frames
