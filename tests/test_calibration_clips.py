"""perf/calibration_clips.py on the tiny checkpoint: one int8 export per clip count, each recording
its clip count, and the drift it reports is the mean of the per-clip task drift."""

from __future__ import annotations

import json

import numpy as np

from perfscripts import load_perf_script

SHAPE = dict(frames=5, height=32, width=32)


def test_drift_per_clip_count_on_the_tiny_checkpoint(tiny_checkpoint, tmp_path):
    from thfm_serve.checkpoint import load_checkpoint
    from thfm_serve.contract.protocol import CORE
    from thfm_serve.contract.specs import Precision, build_specs
    from thfm_serve.export.calibration import procedural_clips
    from thfm_serve.export.precision import lowered_core
    from thfm_serve.export.validate import OrtRunner, task_drift, torch_runner

    script = load_perf_script("calibration_clips")
    assert script.main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--clips", "1", "2",
                        "--drift-clips", "2", "--frames", "5", "--height", "32", "--width", "32"]) == 0
    result = json.loads((tmp_path / "calibration_clips.json").read_text())
    assert set(result["results"]) == {"1", "2"}
    for n in (1, 2):
        manifest = json.loads((tmp_path / f"repo_clips{n}" / CORE / "1" / "manifest.json").read_text())
        assert manifest["report"]["quantization"]["calibration_clips"] == n
    assert "| 2 |" in (tmp_path / "calibration_clips.md").read_text()

    # The 2-clip row again, clip by clip, outside the script.
    ck = load_checkpoint(tiny_checkpoint, text_encoder=False)
    spec = build_specs(ck.config, precision=Precision.FP32, **SHAPE)[CORE]
    reference = torch_runner(lowered_core(ck.core(), Precision.FP32), spec)
    runner = OrtRunner(tmp_path / "repo_clips2" / CORE / "1" / "model.onnx")
    try:
        drifts = [task_drift(ck, reference, runner, procedural_clips(1, 5, 32, 32, seed=1234 + i)[0], 32, 32)
                  for i in range(2)]
    finally:
        runner.close()
    got = result["results"]["2"]["drift"]
    assert np.isclose(got["depth"], np.mean([d["depth"]["abs_rel"] for d in drifts]), rtol=1e-6)
    assert np.isclose(got["keypoints2d"], np.mean([d["keypoints2d"]["mean_px"] for d in drifts]), rtol=1e-6)
    assert got["depth"] > 0  # an int8 core is not the fp32 one
