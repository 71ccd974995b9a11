"""Export validation's task drift decodes through the exported VAE (onnxruntime, the server's
session options) instead of the PyTorch VAE, and decodes only the dense rows the report needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thfm_serve.contract.geometry import latent_size
from thfm_serve.contract.protocol import CORE, CORE_OUT, VAE_DECODER, VAE_ENCODER
from thfm_serve.contract.specs import Precision, Target
from thfm_serve.export import build, export_repository
from thfm_serve.export.calibration import procedural_clips
from thfm_serve.export.validate import OnnxVae, RowMemo, task_drift, torch_runner

from serverfix import HEIGHT, WIDTH, WINDOW

SHAPE = dict(frames=WINDOW, height=HEIGHT, width=WIDTH)  # the served tests' grid: their VAE export is reused
LATENT_HW = (latent_size(HEIGHT), latent_size(WIDTH))


@pytest.fixture(scope="module")
def vae_repo(request, tiny_checkpoint, tmp_path_factory):
    from serverfix import copy_export, exported_repo

    from thfm_serve.checkpoint import load_checkpoint

    # The fp32 VAE pair of the session's served export (the run below finds it matching and reuses it).
    repo = copy_export(exported_repo(request.config, tmp_path_factory, tiny_checkpoint, **SHAPE),
                       tmp_path_factory.mktemp("drift") / "model_repository", models=[VAE_ENCODER, VAE_DECODER])
    # No --precision: the CPU recipe of this machine (the VAE graphs stay fp32 whatever it is).
    report = export_repository(tiny_checkpoint, repo, "cpu", None, **SHAPE, models=[VAE_ENCODER, VAE_DECODER],
                               write_configs=False)
    ck = load_checkpoint(tiny_checkpoint, text_encoder=False)
    specs = build.build_specs(ck.config, precision=Precision.FP32, **SHAPE)
    vae = build._exported_vae(repo, specs, report["checkpoint_sha256"], Precision.FP32, [], None,
                              Target.CPU, SHAPE["frames"])
    return {"repo": repo, "ck": ck, "specs": specs, "vae": vae, "report": report}


def _noisy(run, scale: float, seed: int = 0):
    """A candidate core: the reference plus noise on its outputs (what a low precision does)."""
    rng = np.random.default_rng(seed)

    def call(feed):
        out = run(feed)
        return {k: v + scale * rng.standard_normal(v.shape).astype(np.float32) * np.abs(v).mean() for k, v in out.items()}

    return call


def test_cpu_export_without_precision_takes_the_machine_recipe(vae_repo):
    from thfm_serve.machine import cpu_recipe, read_cpu

    report, recipe = vae_repo["report"], cpu_recipe(read_cpu())
    assert report["precision"] == recipe.precision != "bf16"
    assert report["machine"]["class"] == recipe.machine_class and recipe.machine_class in report["precision_chosen_by"]
    manifest = json.loads((vae_repo["repo"] / VAE_DECODER / "1" / "manifest.json").read_text())
    assert manifest["machine"]["class"] == recipe.machine_class and manifest["spec"]["precision"] == "fp32"


def test_exported_vae_matches_pytorch_vae(vae_repo):
    vae, ck = vae_repo["vae"], vae_repo["ck"]
    assert isinstance(vae, OnnxVae)
    clip = procedural_clips(1, SHAPE["frames"], SHAPE["height"], SHAPE["width"], seed=3)[0]
    from thfm_serve.processing import fit_clip

    x = fit_clip(clip, SHAPE["frames"], SHAPE["height"], SHAPE["width"]).numpy()
    with torch.no_grad():
        ref_latent = ck.vae_encoder()(torch.from_numpy(x)).numpy()
    got_latent = vae.encode(x)
    np.testing.assert_allclose(got_latent, ref_latent, atol=1e-4, rtol=1e-3)
    rows = np.random.default_rng(1).standard_normal((3, *ref_latent.shape[1:])).astype(np.float32)
    with torch.no_grad():
        ref_maps = ck.vae_decoder()(torch.from_numpy(rows)).numpy()
    np.testing.assert_allclose(vae.decode(rows), ref_maps, atol=1e-4, rtol=1e-3)


def test_drift_through_the_exported_vae_agrees_with_the_pytorch_vae(vae_repo):
    ck, specs = vae_repo["ck"], vae_repo["specs"]
    core = torch_runner(ck.core(), specs[CORE])
    candidate = _noisy(core, 0.05)
    clip = procedural_clips(1, SHAPE["frames"], SHAPE["height"], SHAPE["width"], seed=build.DRIFT_SEED)[0]
    vae = OnnxVae(*(vae_repo["vae"]._parts[p] for p in ("encoder", "decoder")), SHAPE["frames"])
    onnx_drift = task_drift(ck, core, candidate, clip, SHAPE["height"], SHAPE["width"], vae=vae)
    torch_drift = task_drift(ck, core, _noisy(core, 0.05), clip, SHAPE["height"], SHAPE["width"])
    # Only the dense rows were decoded: 4 dense tasks for each of the two cores; one encode.
    assert vae.calls == {"encoder": 1, "decoder": 2 * 4}
    assert set(onnx_drift) == set(torch_drift) == set(ck.tasks)
    for task, metrics in torch_drift.items():
        for k, v in metrics.items():
            assert v > 0 or k == "valid_fraction", (task, k)  # the noise is measured, not lost
            # Same noise, same core; the decoders differ by float rounding only.
            assert onnx_drift[task][k] == pytest.approx(v, rel=1e-2, abs=1e-6), (task, k)
    # The same candidate against itself drifts by nothing through either VAE.
    zero = task_drift(ck, core, core, clip, SHAPE["height"], SHAPE["width"], vae=vae)
    # (normals: arccos near 1 of float32 unit vectors' dot product amplifies rounding to ~0.04 degrees)
    assert all(v == 0 for t, m in zero.items() if t != "normals" for k, v in m.items() if k != "valid_fraction"), zero
    assert zero["normals"]["max_angle_deg"] < 0.1, zero


def test_sparse_only_report_never_loads_the_decoder(vae_repo):
    ck, specs = vae_repo["ck"], vae_repo["specs"]
    core = torch_runner(ck.core(), specs[CORE])
    vae = OnnxVae(*(vae_repo["vae"]._parts[p] for p in ("encoder", "decoder")), SHAPE["frames"])
    clip = procedural_clips(1, SHAPE["frames"], SHAPE["height"], SHAPE["width"], seed=5)[0]
    drift = task_drift(ck, core, _noisy(core, 0.05), clip, SHAPE["height"], SHAPE["width"],
                       tasks=["keypoints2d", "keypoints3d"], vae=vae)
    assert drift["keypoints2d"]["mean_px"] > 0 and drift["keypoints3d"]["mean_mm"] > 0
    assert vae.calls["decoder"] == 0 and "decoder" not in vae._models


def test_no_matching_exported_vae_falls_back_to_pytorch(vae_repo, tmp_path):
    ck, specs, report = vae_repo["ck"], vae_repo["specs"], vae_repo["report"]
    args = (Precision.FP32, [], None, Target.CPU, SHAPE["frames"])
    assert build._exported_vae(tmp_path, specs, report["checkpoint_sha256"], *args) is None  # nothing exported
    assert build._exported_vae(vae_repo["repo"], specs, "0" * 64, *args) is None  # another checkpoint's VAE
    other = build.build_specs(ck.config, precision=Precision.FP32, frames=9, height=HEIGHT, width=WIDTH)
    assert build._exported_vae(vae_repo["repo"], other, report["checkpoint_sha256"], *args) is None  # another window
    assert "pytorch" in build._vae_note(None)


def test_drift_region_is_the_central_latent_cells():
    from thfm_serve.export.validate import DRIFT_DECODE_SIDE, describe_drift_region, drift_region

    assert DRIFT_DECODE_SIDE == 16
    assert drift_region(256, 256) == (slice(8, 24), slice(8, 24))  # 128x128 px of 256x256
    assert drift_region(256, 416) == (slice(8, 24), slice(18, 34))
    assert drift_region(32, 48) == (slice(0, 4), slice(0, 6))  # a smaller grid: all of it
    assert drift_region(32, 48, 2) == (slice(1, 3), slice(2, 4))
    assert drift_region(256, 256, None) == (slice(0, 32), slice(0, 32))
    assert describe_drift_region(256, 256) == ("dense tasks over the central 128x128 pixels of 256x256 "
                                               "(latent rows 8:24, columns 8:24)")
    assert describe_drift_region(32, 48) == "dense tasks over every pixel (48x32)"


def test_drift_decodes_only_the_region(vae_repo):
    ck, specs = vae_repo["ck"], vae_repo["specs"]
    core = torch_runner(ck.core(), specs[CORE])
    vae = OnnxVae(*(vae_repo["vae"]._parts[p] for p in ("encoder", "decoder")), SHAPE["frames"])
    seen = []
    decode = vae.decode
    vae.decode = lambda latent: seen.append(latent.shape) or decode(latent)
    clip = procedural_clips(1, SHAPE["frames"], SHAPE["height"], SHAPE["width"], seed=7)[0]
    cropped = task_drift(ck, core, _noisy(core, 0.05, seed=3), clip, SHAPE["height"], SHAPE["width"], vae=vae,
                         decode_side=2)
    assert seen and all(s[-2:] == (2, 2) for s in seen), seen  # 2x2 latent cells, not the whole grid
    full = task_drift(ck, core, _noisy(core, 0.05, seed=3), clip, SHAPE["height"], SHAPE["width"], vae=vae,
                      decode_side=None)
    assert seen[-1][-2:] == LATENT_HW
    for task in ("depth", "normals", "segmentation", "densepose"):
        assert all(np.isfinite(v) for v in cropped[task].values()) and cropped[task] != full[task], task
    # The keypoints never pass the decoder: the crop leaves them as they are.
    for task in ("keypoints2d", "keypoints3d"):
        assert cropped[task] == full[task]


def test_stale_staging_folders_are_removed(tmp_path):
    """A killed export leaves its staging folder in the repository, where tritonserver takes it for a
    model and refuses to start; the next export removes it and nothing else."""
    (tmp_path / ".export-k1ll3d" / "core").mkdir(parents=True)
    (tmp_path / ".export-k1ll3d" / "core" / "model.onnx").write_bytes(b"partial")
    (tmp_path / "core" / "1").mkdir(parents=True)
    (tmp_path / ".export-note").write_text("a file, not a staging folder")
    build._remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export-note", "core"]


def test_vae_drift_decodes_only_the_region_and_runs_the_core_once_per_latent(vae_repo, monkeypatch):
    from thfm_serve.export.validate import torch_vae, vae_drift

    ck = vae_repo["ck"]
    vae = OnnxVae(*(vae_repo["vae"]._parts[p] for p in ("encoder", "decoder")), SHAPE["frames"])
    ref_encode, ref_decode = torch_vae(ck)
    seen, core_calls = [], []

    def recording(decode):
        return lambda latent: seen.append(latent.shape[-2:]) or decode(latent)

    module = ck.core()
    monkeypatch.setattr(ck, "core", lambda: (lambda *a: core_calls.append(1) or module(*a)))
    clips = procedural_clips(2, SHAPE["frames"], SHAPE["height"], SHAPE["width"], seed=11)
    reference, candidate = (ref_encode, recording(ref_decode)), (ref_encode, recording(vae.decode))
    cropped = vae_drift(ck, reference, candidate, clips, SHAPE["height"], SHAPE["width"], decode_side=2)
    assert seen and set(seen) == {(2, 2)}, seen  # both decoders see 2x2 latent cells, not the whole grid
    # The candidate encodes as the reference does: one core run per clip serves both paths.
    assert len(core_calls) == len(clips)
    seen.clear()
    full = vae_drift(ck, reference, candidate, clips, SHAPE["height"], SHAPE["width"], decode_side=None)
    assert set(seen) == {LATENT_HW}
    assert set(cropped) == set(full) == {"depth", "normals", "segmentation", "densepose"}
    for task in cropped:
        assert all(np.isfinite(v) for v in cropped[task].values()), task
    # onnxruntime's fp32 decoder against PyTorch's: near-identical maps over either region.
    assert cropped["segmentation"]["iou"] > 0.99 and full["segmentation"]["iou"] > 0.99
    assert cropped["normals"]["mean_deg"] < 0.5 and full["normals"]["mean_deg"] < 0.5


def test_row_memo_runs_each_row_once_and_answers_like_the_runner():
    """The export-shape validation and the drift of a calibrated core share rows through RowMemo: a
    row seen before (or twice in one batch) is not run again, and every answer equals the runner's."""
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((1, 4, 2, 3, 3)).astype(np.float32)
    text = rng.standard_normal((3, 5, 8)).astype(np.float32)
    ran = []

    def runner(feed):  # a per-row function of both inputs, like the core
        ran.append(len(feed["latent"]))
        scale = feed["text"].mean(axis=(1, 2))[:, None, None, None, None]
        return {"pred_latent": feed["latent"] * scale, "kp2d": feed["text"][:, :2, :2].copy()}

    memo = RowMemo(runner)
    first = {"latent": latent, "text": text[:1]}
    got, want = memo(first), runner(first)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    ran.clear()
    batch = {"latent": np.repeat(latent, 4, axis=0), "text": text[[0, 1, 2, 1]]}  # row 0 seen, row 1 twice
    got = memo(batch)
    assert ran == [2]  # rows 1 and 2 only, each once
    want = runner(batch)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert memo.shared == 1
