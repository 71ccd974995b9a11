"""The in-process reference pipeline and `thfm predict --checkpoint`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thfm_serve.cli import main
from thfm_serve.contract.geometry import snap_frames, snap_size
from thfm_serve.contract.windows import plan_windows
from thfm_serve.processing import fit_clip
from thfm_serve.clipgen import make_clip

EXPECTED = {  # task -> (key, trailing shape after [F, ...] given H, W, K)
    "depth": ("depth", lambda h, w, k: (h, w)),
    "normals": ("normals", lambda h, w, k: (h, w, 3)),
    "segmentation": ("alpha", lambda h, w, k: (h, w)),
    "densepose": ("iuv", lambda h, w, k: (h, w, 3)),
    "keypoints2d": ("keypoints", lambda h, w, k: (k, 2)),
    "keypoints3d": ("keypoints", lambda h, w, k: (k, 3)),
}


def check_outputs(out_dir, frames, height, width, tasks=tuple(EXPECTED), joints=24):
    for task in tasks:
        key, trailing = EXPECTED[task]
        with np.load(out_dir / f"{task}.npz") as data:
            arr = data[key]
            assert arr.dtype == np.float32
            assert arr.shape == (frames, *trailing(height, width, joints)), (task, arr.shape)
            assert np.isfinite(arr).all()
            if task == "segmentation":
                assert arr.min() >= 0 and arr.max() <= 1
            if task == "normals":
                assert np.allclose(np.linalg.norm(arr, axis=-1), 1, atol=1e-4)
            if task.startswith("keypoints"):
                assert len(data["joint_names"]) == joints
            if task == "keypoints2d":
                assert (arr[..., 0] >= 0).all() and (arr[..., 0] <= width).all()
                assert (arr[..., 1] >= 0).all() and (arr[..., 1] <= height).all()


@pytest.mark.parametrize("n,window", [(1, 9), (4, 9), (9, 9), (10, 9), (23, 9), (27, 9), (81, 81), (200, 81)])
def test_windows_cover_every_frame_once(n, window):
    wins = plan_windows(n, window, 0)
    kept = [f for w in wins for f in range(w.use_start, w.use_stop)]
    assert kept == list(range(n))
    for w in wins:
        assert (w.length - 1) % 4 == 0 and w.stop - w.start <= w.length <= window
        assert w.start <= w.use_start < w.stop


def test_snap_helpers():
    assert [snap_frames(n) for n in (1, 2, 5, 6, 9)] == [1, 5, 5, 9, 9]
    assert snap_size(70) == 64 and snap_size(8) == 16 and snap_size(480) == 480


def test_fit_clip_pads_with_last_frame_and_scales():
    frames = np.stack([np.full((20, 30, 3), v, np.uint8) for v in (0, 255)])
    clip = fit_clip(frames, 5, 16, 32)
    assert clip.shape == (1, 3, 5, 16, 32)
    assert torch.allclose(clip[0, :, 0], torch.tensor(-1.0)) and torch.allclose(clip[0, :, 1:], torch.tensor(1.0))


def test_pipeline_matches_core_on_a_single_window(tiny_pipeline):
    """The window path (fit -> encode -> core -> decode -> back to input size) applied by hand."""
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (9, 64, 64, 3), dtype=np.uint8)
    res = tiny_pipeline.run(frames, ["depth", "keypoints3d"])
    ck = tiny_pipeline.ck
    with torch.no_grad():
        latent = ck.vae_encoder()(fit_clip(frames, 9, 64, 64))
        pred, _, kp3d = ck.core()(latent, ck.task_embedding("depth")[None])
        _, _, kp3d_only = ck.core()(latent, ck.task_embedding("keypoints3d")[None])
        maps = ck.vae_decoder()(pred)[0].mean(0)  # [T, H, W]
    depth = torch.expm1(maps.clamp(0, 1) / ck.config.depth_log_scale).numpy()  # the log1p code
    assert np.allclose(res["depth"]["depth"], depth, atol=1e-4)
    assert np.allclose(res["keypoints3d"]["keypoints"], kp3d_only[0].numpy(), atol=1e-5)


def test_predict_cli_on_generated_clip(tmp_path, tiny_checkpoint):
    video = tmp_path / "clip.mp4"
    make_clip(video, frames=14, height=40, width=56)
    out = tmp_path / "out"
    rc = main(["predict", str(video), "--checkpoint", str(tiny_checkpoint), "--tasks", "all", "--out", str(out)])
    assert rc == 0
    check_outputs(out, 14, 40, 56)


def test_predict_single_frame_video(tmp_path, tiny_checkpoint):
    video = tmp_path / "one.mp4"
    make_clip(video, frames=1, height=32, width=48)
    out = tmp_path / "out"
    assert main(["predict", str(video), "--checkpoint", str(tiny_checkpoint), "--tasks", "depth,keypoints2d", "--out", str(out)]) == 0
    check_outputs(out, 1, 32, 48, tasks=("depth", "keypoints2d"))


def test_predict_on_real_footage(tmp_path, tiny_checkpoint, samples_dir):
    out = tmp_path / "out"
    rc = main(["predict", str(samples_dir / "bedroom_540p.mp4"), "--checkpoint", str(tiny_checkpoint),
               "--tasks", "all", "--out", str(out), "--height", "64", "--width", "112"])
    assert rc == 0
    check_outputs(out, 200, 540, 960)


def test_free_form_prompt_in_process(tmp_path, tiny_checkpoint):
    video = tmp_path / "clip.mp4"
    make_clip(video, frames=5, height=32, width=32)
    a, b = tmp_path / "a", tmp_path / "b"
    base = ["predict", str(video), "--checkpoint", str(tiny_checkpoint), "--tasks", "depth"]
    assert main(base + ["--out", str(a)]) == 0
    assert main(base + ["--out", str(b), "--prompt", "depth=estimate how far away the person is"]) == 0
    assert not np.allclose(np.load(a / "depth.npz")["depth"], np.load(b / "depth.npz")["depth"])


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "not found"),
        ("random", "video"),
        ("truncated", "video"),
        ("image", "image"),
        ("audio", "no video stream"),
        ("task", "unknown task"),
        ("ckpart", "missing"),
        ("small", "too small"),
    ],
)
def test_predict_bad_input_is_one_clear_error(tmp_path, tiny_checkpoint, capfd, case, expect):
    from thfm_serve.clipgen import make_audio_only

    good = tmp_path / "good.mp4"
    make_clip(good, frames=6, height=32, width=32)
    video, ck, tasks, extra = good, tiny_checkpoint, "depth", []
    if case == "missing":
        video = tmp_path / "nope.mp4"
    elif case == "random":
        video = tmp_path / "random.mp4"
        video.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "truncated":
        video = tmp_path / "trunc.mp4"
        video.write_bytes(good.read_bytes()[:200])
    elif case == "image":
        from PIL import Image

        video = tmp_path / "still.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(video)
    elif case == "audio":
        video = tmp_path / "sound.wav"
        make_audio_only(video)
    elif case == "task":
        tasks = "depth,pose"
    elif case == "ckpart":
        import shutil

        ck = tmp_path / "ck"
        shutil.copytree(tiny_checkpoint, ck)
        shutil.rmtree(ck / "vae")
    elif case == "small":
        extra = ["--height", "8", "--width", "8"]
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "thfm_serve.cli", "predict", str(video), "--checkpoint", str(ck), "--tasks", tasks,
         "--out", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and expect in errors[0].lower(), proc.stderr
