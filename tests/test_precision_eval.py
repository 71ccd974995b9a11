"""perf/precision_eval.py: its fp32 column is what `thfm eval --checkpoint` reports on the same clips
(an independent path: the eval command's own prediction loop), and bf16 gets a column of its own."""

from __future__ import annotations

import json

import pytest
from perfscripts import load_perf_script

from thfm_serve.synth.dataset import write_set


def _module():
    return load_perf_script("precision_eval")


def test_precision_table_matches_thfm_eval(tiny_checkpoint, tmp_path):
    from thfm_serve.cli import main

    gt = tmp_path / "gt"
    write_set(gt, clips=1, frames=9, height=64, width=64, seed=4)
    assert _module().main(["--checkpoint", str(tiny_checkpoint), "--gt", str(gt), "--out", str(tmp_path / "p")]) == 0
    table = json.loads((tmp_path / "p" / "precision.json").read_text())
    assert set(table["engines"]) == {"in-process fp32", "in-process bf16"}
    assert main(["eval", str(tmp_path / "e"), str(gt), "--checkpoint", str(tiny_checkpoint)]) == 0
    reference = json.loads((tmp_path / "e" / "eval.json").read_text())
    fp32 = table["engines"]["in-process fp32"]
    for task, metrics in reference["overall"].items():
        for metric, value in metrics.items():
            assert fp32[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)
    assert table["baseline"] == reference["baselines"]["trivial"]
    md = (tmp_path / "p" / "precision.md").read_text()
    assert "| segmentation | iou (higher is better) |" in md and "in-process bf16" in md
