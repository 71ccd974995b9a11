"""How many generated calibration clips an int8 core needs: task drift per clip count.

For each N in --clips, the core is exported int8 (`--target cpu`, N generated calibration clips, the
exporter's own path: export_repository) into its own repository under --out, and its task drift
against the fp32 PyTorch core is averaged over --drift-clips held-out procedural clips (seeds 1234+,
never a calibration clip), with export.validate.task_drift: depth abs-rel, normals angle, alpha MSE,
IUV error, keypoints in px and mm, all in the units users get. The export's own report measures one
drift clip; one clip is too noisy to compare clip counts.

    python perf/calibration_clips.py --checkpoint thfm_serve/weights/thfm-small --out runs/calib_clips \
        [--clips 2 4] [--drift-clips 6] [--frames 9 --height 192 --width 192] [--grid auto|export|half]

--grid export calibrates at the export grid itself, --grid half at half its side, instead of the
exporter's own choice (export.calibration.calibration_grid: half the side where the half keeps at least
128x128 pixels), to measure what the choice costs in drift; run each into its own --out.

Writes OUT/calibration_clips.json and .md (with the machine class: the calibration forwards' dtype
follows the CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from thfm_serve.checkpoint import load_checkpoint
from thfm_serve.contract.protocol import CORE, MODEL_VERSION, ONNX_FILE
from thfm_serve.contract.specs import Precision, build_specs
from thfm_serve.export import calibration, export_repository
from thfm_serve.export.build import DRIFT_SEED
from thfm_serve.export.calibration import procedural_clips
from thfm_serve.export.precision import lowered_core
from thfm_serve.export.validate import OrtRunner, task_drift, torch_runner
from thfm_serve.machine import read_cpu

logger = logging.getLogger("calibration_clips")

# The figure each task is summarised by (the mean over the drift clips).
SUMMARY = {"depth": "abs_rel", "normals": "mean_angle_deg", "segmentation": "alpha_mse", "densepose": "iuv_mae",
           "keypoints2d": "mean_px", "keypoints3d": "mean_mm"}


def measure(checkpoint: str, out: Path, clips: list[int], drift_clips: int, frames: int | None, height: int | None,
            width: int | None) -> dict:
    ck = load_checkpoint(checkpoint, text_encoder=False)
    cfg = ck.config
    frames, height, width = frames or cfg.frames, height or cfg.height, width or cfg.width
    spec = build_specs(cfg, frames, height, width, precision=Precision.FP32)[CORE]
    reference = torch_runner(lowered_core(ck.core(), Precision.FP32), spec)
    held_out = [procedural_clips(1, frames, height, width, seed=DRIFT_SEED + i)[0] for i in range(drift_clips)]
    rows = {}
    for n in clips:
        repo = out / f"repo_clips{n}"
        t0 = time.perf_counter()
        report = export_repository(checkpoint, repo, "cpu", "int8", frames, height, width, models=[CORE],
                                   calibration_clips=n, write_configs=False)
        export_s = time.perf_counter() - t0
        runner = OrtRunner(repo / CORE / MODEL_VERSION / ONNX_FILE)
        try:
            per_clip = [task_drift(ck, reference, runner, clip, height, width) for clip in held_out]
        finally:
            runner.close()
        q = report["models"][CORE].get("quantization", {})
        rows[n] = {"drift": {t: float(np.mean([d[t][m] for d in per_clip])) for t, m in SUMMARY.items() if t in per_clip[0]},
                   "export_s": round(export_s, 1), "calibrate_s": q.get("calibrate_s"),
                   "calibration_inputs_s": q.get("calibration_inputs_s"), "calibration_grid": q.get("calibration_grid")}
        logger.info("%d clips: %s", n, rows[n])
    cpu = read_cpu()
    return {"checkpoint": checkpoint, "window": [frames, height, width], "drift_clips": drift_clips,
            "drift_seeds": f"{DRIFT_SEED}..{DRIFT_SEED + drift_clips - 1}", "machine_class": cpu.machine_class,
            "results": rows}


def to_markdown(result: dict) -> str:
    f, h, w = result["window"]
    lines = [f"# int8 core drift by calibration clip count: {result['checkpoint']}, {f}x{h}x{w}", "",
             f"Machine class: {result['machine_class']}. Task drift against the fp32 PyTorch core, mean over "
             f"{result['drift_clips']} held-out procedural clips (seeds {result['drift_seeds']}).", "",
             "| clips | calibration grid | " + " | ".join(f"{t} {m}" for t, m in SUMMARY.items()) +
             " | calibrate s | export s |",
             "|---:|---|" + "---:|" * (len(SUMMARY) + 2)]
    for n, row in result["results"].items():
        vals = " | ".join(f"{row['drift'][t]:.3g}" if t in row["drift"] else "" for t in SUMMARY)
        lines.append(f"| {n} | {row.get('calibration_grid')} | {vals} | {row['calibrate_s']} | {row['export_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clips", type=int, nargs="+", default=[2, 4])
    p.add_argument("--drift-clips", type=int, default=6)
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--grid", choices=("auto", "export", "half"), default="auto",
                   help="calibration grid: the exporter's choice (auto), the export grid itself, or half its side")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.grid != "auto":  # calibration_grid then keeps every grid (export) or halves every one (half)
        calibration.CALIBRATION_MIN_PIXELS = math.inf if a.grid == "export" else 0
    result = measure(a.checkpoint, a.out, a.clips, a.drift_clips, a.frames, a.height, a.width)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "calibration_clips.json").write_text(json.dumps(result, indent=2) + "\n")
    (a.out / "calibration_clips.md").write_text(to_markdown(result))
    logger.info("wrote %s", a.out / "calibration_clips.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
