"""scripts/gpu-check.sh up to the GPU boundary: its dry run (CPU, tiny shape) runs the same code as a
GPU run, writes the results files and records the TensorRT step as skipped with the reason. The
GPU figures themselves come only from a run on a GPU host (perf/results/gpu/)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from perfscripts import load_perf_script

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    return load_perf_script("gpu_check")


def test_dry_run_writes_results_and_says_what_was_skipped(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the dry run would build an engine")
    except ImportError:
        pass
    code = _gpu_check().main(["--dry-run", "--out", str(tmp_path)])
    assert code == 0
    (result_file,) = tmp_path.glob("gpu_check_*_dry.json")
    result = json.loads(result_file.read_text())
    core = result["core_bf16"]
    assert core["device"] == "cpu" and core["preset"] == "tiny" and core["runs"] == 2
    assert core["outputs_finite"] and core["median_s"] > 0 and core["min_s"] <= core["median_s"] <= core["max_s"]
    assert core["video_tokens"] == 2 * 2 * 3  # 5x32x48: 2 latent frames x 2 x 3 patches
    assert core["vs_genception"] is None  # only a GPU run at the real shape compares with 0.96 s
    assert result["tensorrt"]["status"].startswith("skipped: TensorRT is not installed")
    summary = result_file.with_suffix(".md").read_text()
    assert "not GPU figures" in summary and "tiny on cpu" in summary


def test_script_refuses_a_gpu_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert _gpu_check().main(["--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_shell_wrapper_reaches_the_python_entry_point():
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--dry-run" in out.stdout and "--skip-tensorrt" in out.stdout


@pytest.mark.slow
def test_gpu_train_script_runs_its_stages_on_the_cpu(tmp_path):
    """scripts/gpu-train.sh with DEVICE=cpu and a tiny checkpoint: synthesis, one training process
    through stage 2 and stage 3, a loadable final checkpoint; then a FINISH_BY already past stops the
    resumed run at once and the script still names the newest checkpoint it has."""
    from thfm_serve.checkpoint import init_checkpoint, load_checkpoint

    ck = init_checkpoint("tiny", tmp_path / "ck", seed=0)
    env = {"RUN": str(tmp_path / "run"), "CHECKPOINT": str(ck), "CLIPS": "2", "WORKERS": "2", "STEPS": "2",
           "BATCH": "2", "DECODER_STEPS": "1", "DECODER_WINDOWS": "2", "PRECISION": "fp32", "DEVICE": "cpu",
           "SAVE_EVERY": "1"}

    def run(**extra):
        return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-train.sh")], env={**os.environ, **env, **extra},
                              capture_output=True, text=True, timeout=900)

    done = run()
    assert done.returncode == 0, done.stderr[-3000:]
    final = tmp_path / "run" / "train" / "checkpoint"
    assert f"result: {final}" in done.stdout
    assert load_checkpoint(final).config.height == 192
    log = [json.loads(line) for line in (tmp_path / "run" / "train" / "train_log.jsonl").read_text().splitlines()]
    assert {r.get("stage") for r in log if "loss" in r} == {"core", "decoder"}
    # A longer schedule on the same run folder; a FINISH_BY already past stops it at once.
    cut = run(STEPS="50", FINISH_BY="0")
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert "stopped at its 1 s limit" in cut.stderr and f"result: {final}" in cut.stdout
