"""Accuracy per precision in task units against ground truth: `thfm eval`'s table for several engines,
side by side, on the same held-out clips.

    .venv/bin/python perf/precision_eval.py --checkpoint CK --gt GT_DIR --out DIR \
        [--served fp32=127.0.0.1:8001 --served int8=127.0.0.1:9001]

Columns: the in-process pipeline in fp32 and bf16 (`ThfmPipeline`, transformer in that precision,
the VAE fp32 as served), each served repository given as NAME=HOST:PORT (the gRPC client, exactly
what `thfm eval --url` runs; serve an fp32 and an int8 `--target cpu` export of the same checkpoint),
and the trivial baseline. Writes DIR/precision.md and DIR/precision.json; predictions stay under
DIR/<column>/<clip>/. With random weights every column is noise: run it on a trained checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

logger = logging.getLogger("precision_eval")


def predict_in_process(checkpoint: Path, gt_dir: Path, out: Path, tasks: list[str], dtype) -> None:
    from thfm_serve.pipeline import ThfmPipeline, write_results
    from thfm_serve.training.data import VIDEO_FILE, find_clips
    from thfm_serve.video import read_video

    pipe = ThfmPipeline.from_checkpoint(checkpoint, dtype=dtype)
    for clip in find_clips(gt_dir):
        write_results(pipe.run(read_video(clip / VIDEO_FILE).frames, tasks), out / clip.name)


def side_by_side(reports: dict, baseline: dict) -> str:
    """Markdown: one row per (task, metric), one column per engine, then the trivial baseline."""
    from thfm_serve.evaluation import METRICS, _fmt

    names = list(reports)
    lines = ["| task | metric | " + " | ".join(names) + " | trivial baseline |",
             "|---|---|" + "---:|" * (len(names) + 1)]
    for task, metrics in METRICS.items():
        if not any(task in r for r in reports.values()):
            continue
        for metric, higher in metrics:
            cells = [_fmt(reports[n].get(task, {}).get(metric)) for n in names]
            arrow = "higher is better" if higher else "lower is better"
            lines.append(f"| {task} | {metric} ({arrow}) | " + " | ".join(cells)
                         + f" | {_fmt(baseline.get(task, {}).get(metric))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--gt", type=Path, required=True, help="ground truth: GT/<clip>/video.mp4 + <task>.npz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default="all")
    p.add_argument("--served", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="a served repository of the same checkpoint (repeat)")
    p.add_argument("--no-bf16", action="store_true", help="skip the in-process bf16 column")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from thfm_serve.commands.evaluate import predict_set
    from thfm_serve.config import parse_tasks
    from thfm_serve.evaluation import evaluate_dirs

    tasks = parse_tasks(args.tasks)
    served = []
    for item in args.served:
        name, sep, url = item.partition("=")
        if not sep or not name or not url:
            p.error(f"--served expects NAME=HOST:PORT, got {item!r}")
        served.append((f"served {name}", url))
    columns = [("in-process fp32", torch.float32)] + ([] if args.no_bf16 else [("in-process bf16", torch.bfloat16)])
    reports, baseline = {}, {}
    for name, dtype in columns:
        out = args.out / name.replace(" ", "_")
        predict_in_process(args.checkpoint, args.gt, out, tasks, dtype)
        report = evaluate_dirs(out, args.gt, tasks)
        reports[name], baseline = report.overall, report.baselines.get("trivial", {})
    for name, url in served:
        out = args.out / name.replace(" ", "_")
        predict_set(args.gt, out, tasks, urls=[url])
        reports[name] = evaluate_dirs(out, args.gt, tasks, baselines=False).overall
    command = "python perf/precision_eval.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    md = f"Command: `{command}`\n\nCheckpoint: `{args.checkpoint}`; ground truth: `{args.gt}`\n\n" + side_by_side(reports, baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.md").write_text(md)
    (args.out / "precision.json").write_text(json.dumps({"command": command, "engines": reports, "baseline": baseline},
                                                        indent=1, sort_keys=True) + "\n")
    sys.stdout.write(md)  # the script's result
    return 0


if __name__ == "__main__":
    sys.exit(main())
